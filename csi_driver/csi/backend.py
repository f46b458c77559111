"""The narrow interface between the CSI servicers and the FlashCopy engine, in storage terms.

`Backend` lists only what the services need. `EmbeddedBackend` implements it over an Engine opened in this
process. The node data path issue adds a second implementation that talks to the node engine process over
proto/engine.proto; the servicers only ever see `Backend`, so they do not change.

Contract for every implementation:
- errors are csi_driver.engine.errors classes (NotFound, AlreadyExists, OutOfRange, NoSpace, ...), which
  csi_driver.csi.errors maps to gRPC codes; a remote implementation translates its transport errors back;
- records are immutable snapshots of state, safe to keep after the call;
- attrs are opaque string maps stored verbatim with a volume and survive restarts (the CSI layer keeps its
  bookkeeping there: the engine is the only state).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from csi_driver.engine import errors
from csi_driver.engine.model import MappingInfo, MappingState, VolumeInfo

if TYPE_CHECKING:
    from csi_driver.datapath.node import DataPath

log = logging.getLogger("csi_flashcopy.backend")


@dataclass(frozen=True)
class Volume:
    """A visible volume. Snapshots are volumes too (the CSI layer tells them apart by attrs)."""

    id: str
    name: str
    size: int
    grain_size: int
    attrs: Mapping[str, str] = field(default_factory=dict)
    #: creation instant; for a point-in-time copy, the instant its content was frozen
    created_at: float = 0.0
    #: "" when healthy, else why its data (or the copy it reads through) is unusable
    condition: str = ""
    #: volume this one still reads through (snapshot/clone source), None once independent
    source_id: str | None = None
    #: percent of its grains it owns (100 = independent of its source)
    copy_progress: float = 100.0
    allocated_bytes: int = 0


@dataclass(frozen=True)
class SnapshotItem:
    """One member of a group snapshot request."""

    source_id: str
    name: str
    attrs: Mapping[str, str]
    volume_id: str | None = None


@runtime_checkable
class Backend(Protocol):
    def is_ready(self) -> bool:
        """True while the engine answers (Probe)."""

    def close(self) -> None:
        """Flush and release the engine (or the connection to it)."""

    def capacity(self) -> tuple[int, int]:
        """(total_bytes, free_bytes) of the storage holding the volumes."""

    def create_volume(self, name: str, size: int, *, grain_size: int, attrs: Mapping[str, str],
                      volume_id: str | None = None) -> Volume:
        """An empty (zero-filled, thin) volume; size is rounded up to the grain size."""

    def get_volume(self, volume_id: str) -> Volume:
        """NotFound when unknown or deleted."""

    def find_volume(self, name: str) -> Volume | None: ...

    def find_volumes(self, attrs: Mapping[str, str]) -> list[Volume]:
        """Visible volumes whose attrs hold every given key/value ({} = all), in creation order."""

    def delete_volume(self, volume_id: str) -> None:
        """Succeeds at once even while others read through it (storage reclaimed later). NotFound if unknown."""

    def resize_volume(self, volume_id: str, new_size: int) -> Volume:
        """Grow only (OutOfRange when smaller)."""

    def snapshot(self, source_id: str, name: str, *, copy_rate: int, attrs: Mapping[str, str],
                 volume_id: str | None = None) -> Volume:
        """A point-in-time copy of source, usable at once (copy_rate 0: no background copy)."""

    def clone(self, source_id: str, name: str, *, size: int, copy_rate: int, clean_rate: int,
              attrs: Mapping[str, str], volume_id: str | None = None) -> Volume:
        """A new writable volume with source's current data, usable at once; size >= source size."""

    def snapshot_group(self, group_name: str, items: Sequence[SnapshotItem], *, copy_rate: int) -> list[Volume]:
        """Point-in-time copies of several volumes at one instant (consistency group); all or none."""

    def delete_group(self, group_name: str) -> None:
        """Forget the consistency group (its member volumes are deleted separately). NotFound if unknown."""


@dataclass(frozen=True)
class NodeStats:
    """Usage of a staged/published volume as the node sees it (NodeGetVolumeStats)."""

    block: bool
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int = 0
    used_inodes: int = 0
    available_inodes: int = 0
    abnormal: bool = False
    message: str = ""


@runtime_checkable
class NodeBackend(Protocol):
    """The node data path (stage/publish), implemented with the node data path issue.

    Kept apart from Backend so controller-only deployments need none of it. Every call is idempotent and
    raises engine error classes: NotFound (unknown volume; path not staged/published), InvalidState (publish
    before stage), AlreadyExists (staged/published with another fs or access type), InvalidArgument.
    Request validation stays in the Node servicer.
    """

    def node_stage(self, volume_id: str, staging_path: str, *, block: bool, fs_type: str,
                   mount_flags: Sequence[str], read_only: bool) -> None: ...

    def node_unstage(self, volume_id: str, staging_path: str) -> None: ...

    def node_publish(self, volume_id: str, staging_path: str, target_path: str, *, block: bool,
                     read_only: bool, mount_flags: Sequence[str], single_writer: bool = False) -> None:
        """single_writer (SINGLE_NODE_SINGLE_WRITER): InvalidState if published at another target already."""

    def node_unpublish(self, volume_id: str, target_path: str) -> None: ...

    def node_stats(self, volume_id: str, volume_path: str) -> NodeStats: ...

    def node_expand(self, volume_id: str, volume_path: str, required_bytes: int) -> int:
        """Capacity in bytes after the device was refreshed and its filesystem grown."""


# ---------------------------------------------------------------------------------------------------------------


class EmbeddedBackend:
    """Backend (and NodeBackend) over an Engine in this process (`serve --engine embedded`).

    The node side is an in-process DataPath (FUSE export + loop devices), started when first used or at
    once with `node=True` (serve --mode all|node, so staged volumes are re-adopted before any snapshot).
    Snapshots pass its quiesce hook to the engine: staged filesystems are frozen, block devices flushed.
    In this mode the FUSE export lives and dies with the server process.
    """

    #: how far up a cascade of copies we look for a broken ancestor
    MAX_CHAIN = 64
    #: up to this many records are built with point look-ups instead of one full listing
    FEW = 32

    def __init__(self, engine: object) -> None:
        from csi_driver.engine import Engine

        assert isinstance(engine, Engine)
        self.engine: Engine = engine
        self._closed = False
        self._node_mu = threading.Lock()
        self._datapath: DataPath | None = None

    @classmethod
    def open(cls, state_dir: str, *, node: bool = False) -> EmbeddedBackend:
        from csi_driver.engine import Engine

        backend = cls(Engine.open(state_dir))
        if node:
            try:
                backend.start_node()
            except BaseException:
                backend.close()
                raise
        return backend

    # -- node side

    def start_node(self) -> DataPath:
        """The in-process data path, mounted and re-adopting earlier stagings on first use."""
        with self._node_mu:
            if self._closed:
                raise errors.EngineClosed("the backend is closed")
            if self._datapath is None:
                from csi_driver.datapath.node import DataPath

                dp = DataPath(self.engine, self.engine.state_dir)
                dp.start()
                self._datapath = dp
            return self._datapath

    def _quiesce(self, source_ids: list[str]) -> contextlib.AbstractContextManager[None]:
        # only a started data path can have staged (and so freezable) volumes in this process
        dp = self._datapath
        return dp.quiesce(source_ids) if dp is not None else contextlib.nullcontext()

    def node_stage(self, volume_id: str, staging_path: str, *, block: bool, fs_type: str,
                   mount_flags: Sequence[str], read_only: bool) -> None:
        self.start_node().node_stage(volume_id, staging_path, block=block, fs_type=fs_type,
                                     mount_flags=mount_flags, read_only=read_only)

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        self.start_node().node_unstage(volume_id, staging_path)

    def node_publish(self, volume_id: str, staging_path: str, target_path: str, *, block: bool,
                     read_only: bool, mount_flags: Sequence[str], single_writer: bool = False) -> None:
        self.start_node().node_publish(volume_id, staging_path, target_path, block=block, read_only=read_only,
                                       mount_flags=mount_flags, single_writer=single_writer)

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        self.start_node().node_unpublish(volume_id, target_path)

    def node_stats(self, volume_id: str, volume_path: str) -> NodeStats:
        return self.start_node().node_stats(volume_id, volume_path)  # type: ignore[return-value]

    def node_expand(self, volume_id: str, volume_path: str, required_bytes: int) -> int:
        return self.start_node().node_expand(volume_id, volume_path, required_bytes)

    # -- records

    def _record(self, info: VolumeInfo, vols: Mapping[str, VolumeInfo] | None = None,
                maps: Mapping[str, MappingInfo] | None = None) -> Volume:
        """One record; with vols/maps (bulk listings) no further engine call is made."""
        get_map = maps.get if maps is not None else self._mapping_or_none
        get_vol = vols.get if vols is not None else self._volume_or_none
        source_id = None
        progress = 100.0
        m = get_map(info.source_mapping_id) if info.source_mapping_id else None
        if m is not None and m.state != MappingState.IDLE_OR_COPIED:
            source_id, progress = m.source_id, m.progress
        return Volume(
            id=info.id, name=info.name, size=info.size, grain_size=info.grain_size, attrs=dict(info.attrs),
            created_at=info.created_at, condition=self._condition(info, get_vol, get_map),
            source_id=source_id, copy_progress=progress, allocated_bytes=info.allocated_bytes,
        )

    def _records(self, infos: list[VolumeInfo], every: list[VolumeInfo] | None = None) -> list[Volume]:
        if not infos:
            return []
        if len(infos) <= self.FEW and every is None:
            return [self._record(i) for i in infos]  # a few point look-ups beat listing everything
        vols = {i.id: i for i in (every if every is not None else self.engine.list_volumes())}
        maps = {m.id: m for m in self.engine.list_mappings()}
        return [self._record(i, vols, maps) for i in infos]

    def _mapping_or_none(self, mapping_id: str) -> MappingInfo | None:
        try:
            return self.engine.get_mapping(mapping_id)
        except errors.NotFound:
            return None

    def _volume_or_none(self, volume_id: str) -> VolumeInfo | None:
        try:
            return self.engine.get_volume(volume_id)
        except errors.NotFound:
            return None  # hidden (deleted while others read through it) or reclaimed

    def _condition(self, info: VolumeInfo, get_vol: Callable[[str], VolumeInfo | None],
                   get_map: Callable[[str], MappingInfo | None]) -> str:
        """Abnormal when this volume, or any volume whose data it still reads through, is broken."""
        seen: set[str] = set()
        current: VolumeInfo | None = info
        while current is not None and len(seen) < self.MAX_CHAIN and current.id not in seen:
            seen.add(current.id)
            if current.status != "online" or current.error:
                why = current.error or current.status
                return why if current.id == info.id else f"source {current.id} of this copy is broken: {why}"
            m = get_map(current.source_mapping_id) if current.source_mapping_id else None
            if m is None or m.state == MappingState.IDLE_OR_COPIED:
                return ""  # independent (fully copied, or never a copy)
            if m.error:
                return f"copy mapping {m.id} failed: {m.error}"
            if m.state == MappingState.STOPPED:
                return f"copy mapping {m.id} stopped before completing"
            current = get_vol(m.source_id)  # None: hidden upstream, the engine keeps what we read through
        return ""

    # -- Backend

    def is_ready(self) -> bool:
        return not self._closed

    def close(self) -> None:
        if self._closed:
            return
        with self._node_mu:
            self._closed = True
            dp, self._datapath = self._datapath, None
        try:
            if dp is not None:
                staged = dp.staged()
                if staged:
                    # the export dies with this process: I/O on these devices fails from now on
                    log.warning("closing with %d volume(s) still staged: %s", len(staged),
                                ", ".join(r.volume_id for r in staged))
                dp.stop()  # before the engine closes: FUSE threads write into it
        finally:
            try:
                self.engine.flush()
            finally:
                self.engine.close()

    def capacity(self) -> tuple[int, int]:
        return self.engine.capacity()

    def create_volume(self, name: str, size: int, *, grain_size: int, attrs: Mapping[str, str],
                      volume_id: str | None = None) -> Volume:
        info = self.engine.create_volume(name, size, grain_size=grain_size, attrs=dict(attrs), volume_id=volume_id)
        return self._record(info)

    def get_volume(self, volume_id: str) -> Volume:
        return self._record(self.engine.get_volume(volume_id))

    def find_volume(self, name: str) -> Volume | None:
        info = self.engine.find_volume(name)
        return self._record(info) if info is not None else None

    def find_volumes(self, attrs: Mapping[str, str]) -> list[Volume]:
        every = self.engine.list_volumes()
        wanted = list(attrs.items())
        return self._records([i for i in every if all(i.attrs.get(k) == v for k, v in wanted)], every)

    def delete_volume(self, volume_id: str) -> None:
        self.engine.delete_volume(volume_id)

    def resize_volume(self, volume_id: str, new_size: int) -> Volume:
        return self._record(self.engine.resize_volume(volume_id, new_size))

    def snapshot(self, source_id: str, name: str, *, copy_rate: int, attrs: Mapping[str, str],
                 volume_id: str | None = None) -> Volume:
        info, _ = self.engine.snapshot(source_id, name, copy_rate=copy_rate, attrs=dict(attrs), volume_id=volume_id,
                                       quiesce=self._quiesce)
        return self._record(info)

    def clone(self, source_id: str, name: str, *, size: int, copy_rate: int, clean_rate: int,
              attrs: Mapping[str, str], volume_id: str | None = None) -> Volume:
        info, _ = self.engine.clone(source_id, name, size=size, copy_rate=copy_rate, clean_rate=clean_rate,
                                    attrs=dict(attrs), volume_id=volume_id, quiesce=self._quiesce)
        return self._record(info)

    def snapshot_group(self, group_name: str, items: Sequence[SnapshotItem], *, copy_rate: int) -> list[Volume]:
        _, pairs = self.engine.snapshot_group(
            [(it.source_id, it.name, dict(it.attrs), it.volume_id) for it in items],
            group_name=group_name, copy_rate=copy_rate, quiesce=self._quiesce,
        )
        return self._records([info for info, _ in pairs])

    def delete_group(self, group_name: str) -> None:
        for g in self.engine.list_groups():
            if g.name == group_name:
                self.engine.delete_group(g.id)
                return
        raise errors.NotFound(f"group {group_name!r} not found")


def make_backend(args: object) -> Backend:
    """Choose the Backend from `serve` arguments.

    - `--engine embedded`: the engine opened in this process on --state-dir;
    - `--engine process`: a client of the node engine process at --engine-endpoint, which something else
      runs (the chart's engine container). It is never started from here; Probe answers ready and calls
      succeed once it answers, UNAVAILABLE until then;
    - `--engine auto`: with the node service (--mode all|node) and a usable kernel data path, the node
      engine process, started detached when none answers; otherwise embedded.
    """
    check_engine_mode(args)
    state_dir: str = args.state_dir  # type: ignore[attr-defined]
    mode = resolved_engine_mode(args)
    if mode == "embedded":
        # serving the node here: start the data path now, so staged volumes are re-adopted and a snapshot
        # taken before the first Node call is frozen too (where the host has no data path, it stays lazy)
        from csi_driver.datapath.launcher import datapath_unavailable

        node = getattr(args, "mode", "all") in ("all", "node") and not datapath_unavailable()
        return EmbeddedBackend.open(state_dir, node=node)
    endpoint = engine_endpoint(args)
    if mode == "process":
        from csi_driver.datapath.client import RemoteBackend

        backend = RemoteBackend(endpoint)
        if not backend.is_ready():
            log.warning("the node engine process does not answer yet; not ready until it does",
                        extra={"fields": {"engine_endpoint": endpoint}})
        return backend
    from csi_driver.datapath.launcher import ensure_engine

    return ensure_engine(state_dir, endpoint)


def engine_endpoint(args: object) -> str:
    """--engine-endpoint, default unix://<state-dir>/engine.sock."""
    import os

    return getattr(args, "engine_endpoint", "") or f"unix://{os.path.abspath(args.state_dir)}/engine.sock"  # type: ignore[attr-defined]


def resolved_engine_mode(args: object) -> str:
    """"embedded", "process" (use, never start) or "auto" (use, start when none answers)."""
    mode = getattr(args, "engine", "auto")
    if mode != "auto":
        return str(mode)
    if getattr(args, "mode", "all") not in ("all", "node"):
        return "embedded"  # a controller alone has no data path to keep alive
    from csi_driver.datapath.launcher import datapath_unavailable

    why = datapath_unavailable()
    if why:
        log.warning("no kernel data path (%s): the engine runs embedded, volumes cannot be staged here", why)
        return "embedded"
    return "auto"


def check_engine_mode(args: object) -> None:
    """Refuse, before anything is bound or opened, an engine setting that cannot work."""
    if getattr(args, "engine", "auto") == "embedded":
        return
    endpoint = engine_endpoint(args)
    if not endpoint.startswith(("unix:", "/")):
        raise ValueError(f"--engine-endpoint must be a unix socket (unix:///path), not {endpoint!r}")
