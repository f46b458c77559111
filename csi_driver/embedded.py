"""EmbeddedBackend: the api.Backend and api.NodeBackend over an Engine in this process.

Turns engine records into api records (a copy's condition walks the cascade of copies it reads through). Its
node side is injected (a factory of api.NodeDataPath, in practice csi_driver.datapath.DataPath), so this module
knows nothing of FUSE or loop devices. Used by `serve --engine embedded` and, behind proto/engine.proto, by the
node engine process (csi_driver.remote.service).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from csi_driver.api import (
    MAX_EXTENTS_PAGE,
    CopyStatus,
    ExtentPage,
    GroupStatus,
    NodeDataPath,
    NodeInfo,
    NodeStats,
    Report,
    SnapshotItem,
    Volume,
    VolumeStatus,
)
from csi_driver.engine import Engine, errors
from csi_driver.engine.groups import GroupStart
from csi_driver.engine.model import CopyItem, MappingInfo, MappingState, VolumeInfo

#: builds the node data path over the engine (called once, when the node side is first used)
DataPathFactory = Callable[[Engine], NodeDataPath]

log = logging.getLogger("csi_flashcopy.backend")


class EmbeddedBackend:
    """Backend (and NodeBackend) over an Engine in this process.

    The node side is the data path `datapath` builds over the engine, started when first used or at once with
    `node=True` (serve --mode all|node, so staged volumes are re-adopted before any snapshot). Without a
    factory the backend is controller-only and Node calls fail with InvalidState. Snapshots pass the data
    path's quiesce hook to the engine: staged filesystems are frozen, block devices flushed.
    """

    #: how far up a cascade of copies we look for a broken ancestor
    MAX_CHAIN = 64
    #: up to this many records are built with point look-ups instead of one full listing
    FEW = 32

    def __init__(self, engine: Engine, datapath: DataPathFactory | None = None) -> None:
        self.engine = engine
        self._closed = False
        self._node_mu = threading.Lock()
        self._factory = datapath
        self._datapath: NodeDataPath | None = None
        self._starts: dict[str, GroupStart] = {}  # phased group starts by group name (remote coordinator)
        self._starts_mu = threading.Lock()

    @classmethod
    def open(cls, state_dir: str, *, datapath: DataPathFactory | None = None, node: bool = False
             ) -> EmbeddedBackend:
        backend = cls(Engine.open(state_dir), datapath)
        if node:
            try:
                backend.start_node()
            except BaseException:
                backend.close()
                raise
        return backend

    # -- node side

    def start_node(self) -> NodeDataPath:
        """The in-process data path, mounted and re-adopting earlier stagings on first use."""
        with self._node_mu:
            if self._closed:
                raise errors.EngineClosed("the backend is closed")
            if self._datapath is None:
                if self._factory is None:
                    raise errors.InvalidState("this backend serves no node data path")
                dp = self._factory(self.engine)
                dp.start()
                self._datapath = dp
            return self._datapath

    def staged_ids(self) -> list[str]:
        dp = self._datapath
        return dp.staged_ids() if dp is not None else []

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
        return self.start_node().node_stats(volume_id, volume_path)

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
        with self._starts_mu:
            starts = list(self._starts.values())
        for gs in starts:
            gs.release(abort=True)  # a start left unfinished would hold writes and freezes
        with self._node_mu:
            self._closed = True
            dp, self._datapath = self._datapath, None
        try:
            if dp is not None:
                staged = dp.staged_ids()
                if staged:
                    # the export dies with this process: I/O on these devices fails from now on
                    log.warning("closing with %d volume(s) still staged: %s", len(staged), ", ".join(staged))
                dp.stop()  # before the engine closes: FUSE threads write into it
        finally:
            try:
                self.engine.flush()
            finally:
                self.engine.close()

    def capacity(self) -> tuple[int, int]:
        return self.engine.capacity()

    def nodes(self) -> list[NodeInfo]:
        total, free = self.engine.capacity()
        return [NodeInfo(id="", live=not self._closed, total_bytes=total, free_bytes=free)]

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
        dp = self._datapath
        # CSI's "volume in use": kubelet may still have it staged (a force-deleted Pod's containers run on for a
        # while); deleting it would drop the data from under a mounted filesystem. The provisioner retries.
        if dp is not None and volume_id in dp.staged_ids():
            raise errors.InvalidState(f"volume {volume_id} is in use: staged on this node; unstage it first")
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
        # incremental: the mapping stays and tracks both sides' writes, so the clone can be refreshed later
        info, _ = self.engine.clone(source_id, name, size=size, copy_rate=copy_rate, clean_rate=clean_rate,
                                    attrs=dict(attrs), volume_id=volume_id, incremental=True,
                                    quiesce=self._quiesce)
        return self._record(info)

    def snapshot_group(self, group_name: str, items: Sequence[SnapshotItem], *, copy_rate: int) -> list[Volume]:
        _, pairs = self.engine.snapshot_group(_copy_items(items), group_name=group_name, copy_rate=copy_rate,
                                              quiesce=self._quiesce)
        return self._records([info for info, _ in pairs])

    # -- a group start in phases, driven by a controller for members on several nodes (engine.groups.GroupStart)

    def prepare_group(self, group_name: str, items: Sequence[SnapshotItem], *, copy_rate: int,
                      watchdog: float) -> None:
        with self._starts_mu:
            old = self._starts.get(group_name)
            if old is not None and old.phase in ("prepared", "started"):
                raise errors.AlreadyExists(f"group {group_name!r} is being started already ({old.phase})")
        gs = self.engine.begin_group_start(_copy_items(items), group_name=group_name, copy_rate=copy_rate,
                                           quiesce=self._quiesce, watchdog=watchdog)
        with self._starts_mu:
            # finished starts are kept only until the next one: a retried release still finds its answer
            self._starts = {k: v for k, v in self._starts.items() if v.phase in ("prepared", "started")}
            self._starts[group_name] = gs

    def _group_start(self, group_name: str) -> GroupStart:
        with self._starts_mu:
            gs = self._starts.get(group_name)
        if gs is None:
            raise errors.NotFound(f"no group start {group_name!r} is prepared here")
        return gs

    def start_group(self, group_name: str) -> list[Volume]:
        return self._records([info for info, _ in self._group_start(group_name).start()])

    def release_group(self, group_name: str, *, abort: bool) -> float:
        return self._group_start(group_name).release(abort=abort)

    def delete_group(self, group_name: str) -> None:
        for g in self.engine.list_groups():
            if g.name == group_name:
                self.engine.delete_group(g.id)
                return
        raise errors.NotFound(f"group {group_name!r} not found")


    # -- operations

    def report(self) -> Report:
        vols, maps, groups = self.engine.inspect()
        staged = set(self.staged_ids())
        by_vol = {v.id: v for v in vols}
        by_map = {m.id: m for m in maps}
        volumes = tuple(
            VolumeStatus(id=v.id, name=v.name, size=v.size, allocated_bytes=v.allocated_bytes, attrs=dict(v.attrs),
                         condition="" if v.deleted else self._condition(v, by_vol.get, by_map.get),
                         created_at=v.created_at, hidden=v.deleted, staged=v.id in staged, dependents=v.dependents)
            for v in vols)
        return Report(volumes=volumes, mappings=tuple(copy_status(m) for m in maps),
                      groups=tuple(GroupStatus(id=g.id, name=g.name, state=g.state.value, mapping_ids=g.mapping_ids,
                                               start_time=g.start_time) for g in groups))

    def modify_copies(self, volume_id: str, *, copy_rate: int | None, clean_rate: int | None) -> list[CopyStatus]:
        return [copy_status(m) for m in self.engine.modify_copies(volume_id, copy_rate=copy_rate,
                                                                   clean_rate=clean_rate)]

    def _refuse_staged(self, volume_id: str, what: str) -> None:
        if volume_id in self.staged_ids():
            raise errors.InvalidState(f"volume {volume_id} is staged on this node: {what} would change the data "
                                      "under its mounted filesystem or running device; stop the Pods using it "
                                      "(unstage) first")

    def restore_volume(self, volume_id: str, snapshot_id: str, *, copy_rate: int) -> CopyStatus:
        self._refuse_staged(volume_id, "a restore")
        return copy_status(self.engine.restore(snapshot_id, volume_id, copy_rate=copy_rate))

    def refresh_volume(self, volume_id: str, source_id: str, *, copy_rate: int) -> tuple[CopyStatus, int]:
        self._refuse_staged(volume_id, "a refresh")
        m, grains = self.engine.refresh(volume_id, source_id, copy_rate=copy_rate)
        return copy_status(m), grains

    def allocated_extents(self, volume_id: str, *, start: int, limit: int) -> ExtentPage:
        ext = self.engine.allocated_extents(volume_id, start=start, limit=_page_limit(limit))
        return ExtentPage(size=self.engine.get_volume(volume_id).size, extents=tuple(ext))

    def delta_extents(self, base_id: str, target_id: str, *, start: int, limit: int) -> ExtentPage:
        ext = self.engine.delta_extents(base_id, target_id, start=start, limit=_page_limit(limit))
        return ExtentPage(size=self.engine.get_volume(target_id).size, extents=tuple(ext))


def _page_limit(limit: int) -> int:
    return MAX_EXTENTS_PAGE if limit <= 0 else min(limit, MAX_EXTENTS_PAGE)


def copy_status(m: MappingInfo) -> CopyStatus:
    return CopyStatus(id=m.id, source_id=m.source_id, target_id=m.target_id, state=m.state.value,
                      copy_rate=m.copy_rate, clean_rate=m.clean_rate, progress=m.progress,
                      bytes_to_copy=m.bytes_to_copy, bytes_to_clean=m.bytes_to_clean, error=m.error,
                      incremental=m.incremental, restore=m.restore, group_id=m.group_id or "",
                      start_time=m.start_time)


def _copy_items(items: Sequence[SnapshotItem]) -> list[CopyItem]:
    return [CopyItem(source_id=it.source_id, name=it.name, attrs=dict(it.attrs), volume_id=it.volume_id)
            for it in items]
