"""The narrow interfaces between the CSI servicers and whatever holds the volumes, in storage terms.

`Backend` (controller side) and `NodeBackend` (stage/publish) list only what the CSI services need, and the
records they return. Implementations: csi_driver.embedded.EmbeddedBackend (an Engine in this process, its node
side injected) and csi_driver.remote.RemoteBackend (the node engine process over proto/engine.proto). The
servicers in csi_driver.csi only ever see these protocols, so they cannot tell which one serves them; mypy
checks that each implementation satisfies them.

Contract for every implementation:
- errors are csi_driver.engine.errors classes (NotFound, AlreadyExists, OutOfRange, NoSpace, ...) or subclasses
  of them, which csi_driver.status maps to gRPC codes; a remote implementation raises the same classes again;
- records are immutable snapshots of state, safe to keep after the call;
- attrs are opaque string maps stored verbatim with a volume and survive restarts (the CSI layer keeps its
  bookkeeping there: the engine is the only state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


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
class CopyStatus:
    """A FlashCopy mapping (source -> target) as operators see it."""

    id: str
    source_id: str
    target_id: str
    #: FlashCopy state: idle_or_copied, preparing, prepared, copying, stopping, stopped
    state: str
    copy_rate: int
    clean_rate: int
    #: percent of the target's grains the target owns
    progress: float
    bytes_to_copy: int = 0
    bytes_to_clean: int = 0
    #: why it stopped, or what its background copy waits for; "" when healthy
    error: str = ""
    incremental: bool = False
    restore: bool = False
    group_id: str = ""
    start_time: float = 0.0
    #: node holding it ("" = this node)
    node: str = ""


@dataclass(frozen=True)
class VolumeStatus:
    """A volume, snapshot or hidden node (deleted, kept for the copies that read through it)."""

    id: str
    name: str
    size: int
    allocated_bytes: int
    attrs: Mapping[str, str] = field(default_factory=dict)
    condition: str = ""
    created_at: float = 0.0
    hidden: bool = False
    #: staged on its node now (operations that rewrite it in place are refused then)
    staged: bool = False
    #: for a hidden node: the volumes that still read some of its grains
    dependents: tuple[str, ...] = ()
    node: str = ""


@dataclass(frozen=True)
class GroupStatus:
    """A consistency group (its members' mappings start at one instant)."""

    id: str
    name: str
    state: str
    mapping_ids: tuple[str, ...] = ()
    start_time: float = 0.0
    node: str = ""


@dataclass(frozen=True)
class Report:
    """Everything FlashCopy holds, at one instant per node."""

    volumes: tuple[VolumeStatus, ...] = ()
    mappings: tuple[CopyStatus, ...] = ()
    groups: tuple[GroupStatus, ...] = ()
    #: nodes that did not answer (their objects are missing from this report)
    missing_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SnapshotItem:
    """One member of a group snapshot request."""

    source_id: str
    name: str
    attrs: Mapping[str, str]
    volume_id: str | None = None


@dataclass(frozen=True)
class NodeInfo:
    """A node that holds volumes, as the Backend sees it (topology, GetCapacity, placement)."""

    #: "" = the node this process serves (a one-node backend does not know its name)
    id: str
    live: bool
    total_bytes: int = 0
    free_bytes: int = 0
    #: why it is not live
    detail: str = ""


# -- ids that name their node: `<node key>.<local id>`, so a multi-node backend routes a call with no lookup.

#: node names longer than this are named by a digest in ids (CSI ids are at most 128 bytes)
MAX_NODE_IN_ID = 96
_NODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


def node_key(node: str) -> str:
    """How an id names a node: the node name itself when short and plain, else `h-` and a digest of it."""
    if node and len(node) <= MAX_NODE_IN_ID and set(node) <= _NODE_CHARS and node[0].isalnum():
        return node
    import hashlib

    return "h-" + hashlib.sha256(node.encode()).hexdigest()[:24]


def placed_id(node: str, local: str) -> str:
    """The id of a new object on node; local is `<kind>-<hex>` (no dot)."""
    assert "." not in local
    return f"{node_key(node)}.{local}"


def id_node_key(object_id: str) -> str | None:
    """The node key an id names, None for an id of a one-node install made before ids named nodes."""
    key, dot, local = object_id.rpartition(".")
    return key if dot and key and local else None


class Backend(Protocol):
    def is_ready(self) -> bool:
        """True while the engine answers (Probe)."""

    def close(self) -> None:
        """Flush and release the engine (or the connection to it)."""

    def capacity(self) -> tuple[int, int]:
        """(total_bytes, free_bytes) of the storage holding the volumes."""

    def nodes(self) -> list[NodeInfo]:
        """Every node holding volumes: one ("" = this node) for a one-node backend; with several, the new
        volume's id (placed_id) says which one it is made on, and a copy is made on its source's node."""

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

    # -- operations (status, rates, restore in place, refresh)

    def report(self) -> Report:
        """Every volume (hidden nodes too), mapping and group, with progress and staging."""

    def modify_copies(self, volume_id: str, *, copy_rate: int | None, clean_rate: int | None) -> list[CopyStatus]:
        """Change the rates of the mappings that copy into volume_id, at once (None = keep)."""

    def restore_volume(self, volume_id: str, snapshot_id: str, *, copy_rate: int) -> CopyStatus:
        """Reverse FlashCopy in place: volume_id shows snapshot_id's data at once; every snapshot is kept.
        InvalidState while the volume is staged (a filesystem mounted over it would be corrupted)."""

    def refresh_volume(self, volume_id: str, source_id: str, *, copy_rate: int) -> tuple[CopyStatus, int]:
        """Incremental refresh of a clone to source_id's data: only grains changed on either side since its
        last start are copied (their count is returned). InvalidState while staged."""

    # -- changed-block tracking (from the bitmaps; no data is read)

    def allocated_extents(self, volume_id: str, *, start: int, limit: int) -> ExtentPage:
        """The grains of volume_id holding data (every byte written and not discarded; nothing never written),
        from the extent holding byte `start` (cut to the start of its grain), `limit` extents at most
        (1..MAX_EXTENTS_PAGE). NotFound, OutOfRange (start past the end), InvalidState (offline)."""

    def delta_extents(self, base_id: str, target_id: str, *, start: int, limit: int) -> ExtentPage:
        """The grains where target may differ from base (covering every changed byte, reporting no grain the
        same by construction), paged as allocated_extents. InvalidState when tracking is not possible (no
        common cascade, offline) or base is not older than target; InvalidState too for ids on different
        nodes."""


@dataclass(frozen=True)
class ExtentPage:
    """A page of changed-block extents: (offset, length) byte ranges, ascending, merged, grain granular.

    size: the volume's size (of the target, for a delta). The page holds at most the limit asked for; when it
    is full, the next page is asked for from the end of its last extent.
    """

    size: int
    extents: tuple[tuple[int, int], ...]


MAX_EXTENTS_PAGE = 16384  # extents per page at most: a page stays well under gRPC's 4 MiB message limit


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


class NodeBackend(Protocol):
    """The node data path (stage/publish): csi_driver.datapath.DataPath in this process, or the node engine
    process through csi_driver.remote.RemoteBackend.

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


class StorageBackend(Backend, NodeBackend, Protocol):
    """Both sides: what `serve` hands the servicers (the Node servicer is registered only with --mode all|node)."""


class NodeDataPath(NodeBackend, Protocol):
    """What an in-process backend needs of the node data path it is given (csi_driver.datapath.DataPath)."""

    def start(self) -> None:
        """Mount the export and re-adopt the volumes the staging records name."""

    def stop(self) -> None: ...

    def staged_ids(self) -> list[str]:
        """Volumes staged on this node now."""

    def quiesce(self, source_ids: list[str]) -> contextlib.AbstractContextManager[None]:
        """Freeze the staged filesystems among source_ids (flush block devices) until the context exits."""
