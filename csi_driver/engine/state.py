"""The engine's in-memory records (volumes as cascade nodes, mappings, groups) and the state every part shares.

`EngineState` declares every attribute the engine's parts work on (cascade.py, durability.py, volumes.py,
mappings.py, groups.py, jobs.py are layers over it that `engine.Engine` combines), plus lookups and the public
records (model.VolumeInfo, ...) made from the in-memory ones. Every method here expects the engine lock held.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from csi_driver.engine import errors
from csi_driver.engine.bitmap import Bitmap
from csi_driver.engine.fileio import FileIO
from csi_driver.engine.journal import Journal
from csi_driver.engine.model import (
    DEFAULT_CLEAN_RATE,
    DEFAULT_COPY_RATE,
    MAX_NAME,
    GroupInfo,
    GroupState,
    MappingInfo,
    MappingState,
    VolumeInfo,
    valid_rate,
)
from csi_driver.engine.store import Changes, Store

#: a quiesce hook: called with the source ids of a start, holds their I/O still (a filesystem freeze)
Quiesce = Callable[[list[str]], AbstractContextManager[Any]]


class Vol:
    """In-memory state of one volume (a cascade node)."""

    __slots__ = ("id", "seq", "name", "size", "grain", "attrs", "created", "deleted", "file", "fd",
                 "upstream", "downstream", "bits", "pending", "offline", "clean_rate", "trackers")

    def __init__(self, vid: str, seq: int, name: str, size: int, grain: int, attrs: dict[str, str],
                 created: float, file: str) -> None:
        self.id = vid
        self.seq = seq
        self.name = name
        self.size = size
        self.grain = grain
        self.attrs = attrs
        self.created = created
        self.deleted = False
        self.file = file
        self.fd = -1
        self.upstream: Vol | None = None
        self.downstream: Vol | None = None
        #: grains this node owns; None for a node that was never a target (it owns everything)
        self.bits: Bitmap | None = None
        #: grain -> full new grain image held back until the next commit (I5)
        self.pending: dict[int, bytearray] = {}
        self.offline = ""
        self.clean_rate = 0
        #: incremental mappings this volume is a side of (their difference bitmaps record its writes)
        self.trackers: list[Map] = []

    @property
    def ngrains(self) -> int:
        return self.size // self.grain

    def owns(self, g: int) -> bool:
        # grains past a node's end are nobody's business: count them as owned
        return self.upstream is None or self.bits is None or g >= self.bits.n or self.bits.get(g)

    def owns_durably(self, g: int) -> bool:
        return self.upstream is None or self.bits is None or g >= self.bits.n or self.bits.durable(g)


class Map:
    """In-memory state of one mapping."""

    __slots__ = ("id", "seq", "name", "source", "target", "state", "copy_rate", "clean_rate", "grain",
                 "incremental", "autodelete", "group_id", "start_time", "error", "restore", "copied", "diff")

    def __init__(self, mid: str, seq: int, name: str, source: str, target: str, grain: int) -> None:
        self.id = mid
        self.seq = seq
        self.name = name
        self.source = source
        self.target = target
        self.state = MappingState.IDLE_OR_COPIED
        self.copy_rate = DEFAULT_COPY_RATE
        self.clean_rate = DEFAULT_CLEAN_RATE
        self.grain = grain
        self.incremental = False
        self.autodelete = False
        self.group_id: str | None = None
        self.start_time = 0.0
        self.error = ""
        self.restore = False
        #: True once a start reached 100 % (incremental restarts may then copy only differences)
        self.copied = False
        self.diff: Bitmap | None = None


class Group:
    """In-memory state of one consistency group (its members are the mappings naming it)."""

    __slots__ = ("id", "seq", "name", "start_time")

    def __init__(self, gid: str, seq: int, name: str) -> None:
        self.id = gid
        self.seq = seq
        self.name = name
        self.start_time = 0.0


def check_rate(name: str, rate: int) -> int:
    """A copy or clean rate argument (model.valid_rate), else InvalidArgument naming it."""
    if not valid_rate(rate):
        raise errors.InvalidArgument(f"{name} must be an integer 0-150, got {rate!r}")
    return rate


class EngineState:
    """Everything the engine's parts share. Set up by engine.Engine.__init__; guarded by `_lock`."""

    state_dir: str
    data_dir: str
    _io: FileIO
    _store: Store
    _commit_interval: float
    #: the one engine lock (re-entrant); `_work` is its condition, notified when background work may exist
    _lock: threading.RLock
    _work: threading.Condition
    #: volumes whose host writes wait (a group start's prepare phase, `groups.GroupStart`): id -> holders;
    #: `_gate` is the lock's condition notified when a hold ends
    _held: dict[str, int]
    _gate: threading.Condition
    _closed: bool
    _vols: dict[str, Vol]
    _maps: dict[str, Map]
    #: target id -> feeding mapping, None when it must be rebuilt (see _incoming)
    _feeds: dict[str, Map] | None
    _groups: dict[str, Group]
    _seq: itertools.count[int]
    # what the next commit must write (durability.py)
    _ch: Changes
    #: files with copied/filled grains whose bits are undurable (I4)
    _copy_dirty: set[Vol]
    #: files with host writes not yet fdatasync'ed (every file, after an open: an earlier process may have left
    #: acknowledged writes in the page cache that the next flush must sync)
    _host_dirty: set[Vol]
    #: host writes acknowledged while their effect lives only in memory (journal.J1-J4)
    _journal: Journal
    _bits_dirty: dict[str, tuple[Bitmap, Vol | Map]]
    _pending_bytes: int
    _last_commit: float
    #: volumes whose files go once the metadata no longer names them
    _unlink_later: list[Vol]
    #: data files replaced by a start, dropped after its commit without the engine lock
    _stale_files: list[Vol]
    #: how long the last start held host I/O (the FlashCopy start pause), for metrics and benchmarks
    last_start_hold: float
    _reserve_released: bool
    _reserve_checked: float
    #: when the copier last checked that every open data file is whole (volumes._check_files)
    _files_checked: float
    #: grain buffers for held writes, reused: a fresh 256 KiB allocation costs page faults on every write
    _pool: dict[int, list[bytearray]]

    # ------------------------------------------------------------------ lookups

    def _check_open(self) -> None:
        if self._closed:
            raise errors.EngineClosed("engine is closed")

    def _vol(self, vid: str) -> Vol:
        v = self._vols.get(vid)
        if v is None or v.deleted:
            raise errors.NotFound(f"volume {vid!r} not found")
        return v

    def _map(self, mid: str) -> Map:
        m = self._maps.get(mid)
        if m is None:
            raise errors.NotFound(f"mapping {mid!r} not found")
        return m

    def _group(self, gid: str) -> Group:
        g = self._groups.get(gid)
        if g is None:
            raise errors.NotFound(f"group {gid!r} not found")
        return g

    def _members(self, g: Group) -> list[Map]:
        return sorted((m for m in self._maps.values() if m.group_id == g.id), key=lambda m: m.seq)

    def _group_state(self, g: Group) -> GroupState:
        return GroupState.of(m.state for m in self._members(g))

    def _new_id(self, prefix: str) -> str:
        while True:
            vid = f"{prefix}-{secrets.token_hex(8)}"
            if vid not in self._vols and vid not in self._maps and vid not in self._groups:
                return vid

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise errors.InvalidArgument(f"name must be 1-{MAX_NAME} characters")

    def _incoming(self, v: Vol) -> Map | None:
        """The mapping that feeds v: of the mappings with v as target, the one started last."""
        if self._feeds is None:
            feeds: dict[str, Map] = {}
            for m in self._maps.values():
                cur = feeds.get(m.target)
                if cur is None or m.start_time > cur.start_time:
                    feeds[m.target] = m
            self._feeds = feeds
        return self._feeds.get(v.id)

    def _attach_trackers(self) -> None:
        for v in self._vols.values():
            v.trackers = []
        for m in self._maps.values():
            if m.diff is not None:
                for vid in (m.source, m.target):
                    t = self._vols.get(vid)
                    if t is not None:
                        t.trackers.append(m)

    # ------------------------------------------------------------------ data files

    def _fd(self, v: Vol) -> int:
        if v.fd < 0:
            # never create: only _create_file makes a data file (a missing one is a broken volume, datafiles.py)
            v.fd = self._io.open(os.path.join(self.data_dir, v.file))
        return v.fd

    def _create_file(self, v: Vol, file: str | None = None) -> None:
        """Make v's data file (named file: v.file becomes it once made), full size. A create intent is durable
        first (the next open may delete the file if no commit names it, datafiles.py), and the size is durable
        before any commit names the file: a file shorter than its volume is never a crash's doing, so it is
        never re-extended."""
        file = file or v.file
        path = os.path.join(self.data_dir, file)
        self._io.commit_metadata(self._store, Changes(intents={file}))
        fd = self._io.open(path, create=True)
        try:
            self._io.truncate(fd, v.size)
            self._io.fdatasync(fd)
            _fsync_dir(self.data_dir)
        except BaseException as e:
            self._io.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(e, errors.OutOfRange):
                raise errors.OutOfRange(f"{v.size} bytes is more than the state dir's filesystem allows") from e
            raise
        v.file, v.fd = file, fd

    def _drop_file(self, v: Vol) -> None:
        if v.fd >= 0:
            self._io.close(v.fd)
            v.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.data_dir, v.file))

    # ------------------------------------------------------------------ public records

    def _vinfo(self, v: Vol) -> VolumeInfo:
        m = self._incoming(v)
        status = "offline" if v.offline else "online"
        try:
            alloc = self._io.allocated(self._fd(v)) if v.fd >= 0 or not v.deleted else 0
        except FileNotFoundError:  # a broken volume (its file missing, datafiles.py): offline, says why
            alloc = 0
        return VolumeInfo(
            id=v.id, name=v.name, size=v.size, grain_size=v.grain, attrs=dict(v.attrs), created_at=v.created,
            allocated_bytes=alloc, status=status, error=v.offline or (m.error if m else ""),
            source_mapping_id=m.id if m else None, deleted=v.deleted,
            # only a hidden node's dependents are news (they are why it stays); a walk per listing otherwise
            dependents=tuple(x.id for x in self._dependents(v)) if v.deleted and v.downstream else (),
        )

    def _dependents(self, v: Vol) -> list[Vol]:
        """The nodes below v that read some grain v serves (v's own grains, through nodes that lack them)."""
        out: list[Vol] = []
        served = v.bits.as_int() if (v.bits is not None and v.upstream is not None) else (1 << v.ngrains) - 1
        e = v.downstream
        while e is not None and served:
            mine = e.bits.as_int() if e.bits is not None else (1 << e.ngrains) - 1
            if served & ~mine & ((1 << e.ngrains) - 1):
                out.append(e)
            served &= ~mine
            e = e.downstream
        return out

    def _minfo(self, m: Map) -> MappingInfo:
        t = self._vols.get(m.target)
        if m.state == MappingState.IDLE_OR_COPIED:
            progress = 100.0 if m.copied or m.start_time else 0.0
        elif t is not None and t.bits is not None and t.ngrains:
            progress = 100.0 * t.bits.count() / t.ngrains
        else:
            progress = 0.0
        to_copy = to_clean = 0
        if t is not None and t.bits is not None and m.state == MappingState.COPYING:
            to_copy = (t.ngrains - t.bits.count()) * t.grain
        elif t is not None and m.state == MappingState.STOPPING and t.downstream is not None:
            d = t.downstream
            mine = t.bits.as_int() if t.bits is not None else (1 << t.ngrains) - 1
            theirs = d.bits.as_int() if d.bits is not None else (1 << d.ngrains) - 1
            to_clean = (mine & ~theirs & ((1 << d.ngrains) - 1)).bit_count() * t.grain
        return MappingInfo(
            id=m.id, name=m.name, source_id=m.source, target_id=m.target, state=m.state,
            copy_rate=m.copy_rate, clean_rate=m.clean_rate, grain_size=m.grain, progress=round(progress, 2),
            incremental=m.incremental, autodelete=m.autodelete, group_id=m.group_id,
            start_time=m.start_time, error=m.error, restore=m.restore, bytes_to_copy=to_copy,
            bytes_to_clean=to_clean,
        )

    def _ginfo(self, g: Group) -> GroupInfo:
        return GroupInfo(id=g.id, name=g.name, state=self._group_state(g),
                         mapping_ids=tuple(m.id for m in self._members(g)), start_time=g.start_time)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
