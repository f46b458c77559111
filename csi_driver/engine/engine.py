"""The FlashCopy engine: volumes as sparse files, mappings in linear cascades, crash-safe metadata.

Model
-----
Every volume is a node in a *cascade*, a linear chain ``head -> v1 -> v2 -> ...``. The head owns every grain. Any
other node has a per-grain bitmap of the grains it owns; for a grain it does not own it shows its upstream
neighbour's view. Starting a mapping S -> T inserts T directly below S with an empty bitmap, so T shows S at that
instant, and the newest target sits next to its source (FlashCopy's cascade): a source write copies a grain into
one target at most, however many targets exist.

Invariants (each kept where the code says so):

I1 (view)       the data a node shows for grain g is its own grain if it owns g, else its upstream's view of g.
I2 (cow)        before a node's view of g changes, its downstream neighbour owns g (``_write_grain`` copies
                the old view down first), so every other node's view is unchanged by a write.
I3 (range)      a non-head node owns every grain at or past its upstream's end, so views never read past a file.
I4 (durable)    a bit is committed only after the grain data it vouches for is on disk (``_commit`` fdatasyncs
                the files that received copies before the metadata transaction).
I5 (ordering)   data another node's view depends on is never overwritten on disk while the bit that takes the
                dependency away is undurable: such writes wait in ``pending`` until the next commit.
I6 (atomic)     each metadata change is one SQLite transaction; a crash leaves the state before or after it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import resource
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

from csi_driver.engine import errors
from csi_driver.engine.bitmap import Bitmap, set_grains
from csi_driver.engine.fileio import NOSPACE_ERRNOS, FileIO
from csi_driver.engine.model import (
    DEFAULT_CLEAN_RATE,
    DEFAULT_COPY_RATE,
    DEFAULT_GRAIN,
    GRAIN_SIZES,
    GroupInfo,
    MappingInfo,
    MappingState,
    VolumeInfo,
)
from csi_driver.engine.store import Changes, Store, dump_attrs

log = logging.getLogger(__name__)

ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
MAX_NAME = 256
PENDING_LIMIT = 64 * 1024 * 1024  # held source writes (bytes) before a commit is forced
_ZERO = bytes(max(GRAIN_SIZES))
METADATA_RESERVE = 4 * 1024 * 1024  # disk space held back so metadata commits work on a full filesystem
Quiesce = Callable[[list[str]], AbstractContextManager[Any]]


def valid_id(value: str) -> bool:
    return (
        0 < len(value) <= 128 and value[0].isalnum() and value.isascii() and set(value) <= ID_CHARS
    )


class _Vol:
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
        self.upstream: _Vol | None = None
        self.downstream: _Vol | None = None
        #: grains this node owns; None for a node that was never a target (it owns everything)
        self.bits: Bitmap | None = None
        #: grain -> full new grain image held back until the next commit (I5)
        self.pending: dict[int, bytearray] = {}
        self.offline = ""
        self.clean_rate = 0
        #: incremental mappings this volume is a side of (their difference bitmaps record its writes)
        self.trackers: list[_Map] = []

    @property
    def ngrains(self) -> int:
        return self.size // self.grain

    def owns(self, g: int) -> bool:
        # grains past a node's end are nobody's business: count them as owned
        return self.upstream is None or self.bits is None or g >= self.bits.n or self.bits.get(g)

    def owns_durably(self, g: int) -> bool:
        return self.upstream is None or self.bits is None or g >= self.bits.n or self.bits.durable(g)


class _Map:
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


class _Group:
    __slots__ = ("id", "seq", "name", "start_time")

    def __init__(self, gid: str, seq: int, name: str) -> None:
        self.id = gid
        self.seq = seq
        self.name = name
        self.start_time = 0.0


def _check_rate(name: str, rate: int) -> int:
    if not isinstance(rate, int) or isinstance(rate, bool) or not 0 <= rate <= 150:
        raise errors.InvalidArgument(f"{name} must be an integer 0-150, got {rate!r}")
    return rate


class Engine:
    """One node's FlashCopy engine over a state directory. Thread-safe; one process per state dir."""

    def __init__(self, state_dir: str, *, io: FileIO | None = None, commit_interval: float = 0.05,
                 background: bool = True) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.data_dir = os.path.join(self.state_dir, "volumes")
        self._io = io or FileIO()
        self._commit_interval = commit_interval
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._closed = False
        self._vols: dict[str, _Vol] = {}
        self._maps: dict[str, _Map] = {}
        self._feeds: dict[str, _Map] | None = None  # target id -> feeding mapping (see _incoming)
        self._groups: dict[str, _Group] = {}
        self._seq = itertools.count(1)
        # what the next commit must write
        self._ch = Changes()
        self._copy_dirty: set[_Vol] = set()  # files with copied/filled grains whose bits are undurable
        self._host_dirty: set[_Vol] = set()  # files with host writes not yet fdatasync'ed
        self._bits_dirty: dict[str, tuple[Bitmap, _Vol | _Map]] = {}
        self._pending_bytes = 0
        self._last_commit = time.monotonic()
        self._unlink_later: list[_Vol] = []
        self.last_start_hold = 0.0
        self._reserve_released = False
        self._reserve_checked = 0.0
        # grain buffers for held writes, reused: a fresh 256 KiB allocation costs page faults on every write
        self._pool: dict[int, list[bytearray]] = {}
        os.makedirs(self.data_dir, exist_ok=True)
        self._lockfd = os.open(os.path.join(self.state_dir, "engine.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        import fcntl

        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lockfd)
            raise errors.EngineLocked(f"state dir {self.state_dir} is held by another process") from e
        _raise_fd_limit()
        try:
            self._store = Store(os.path.join(self.state_dir, "meta.db"))
            self._load()
            self._ensure_reserve()
        except BaseException:
            os.close(self._lockfd)
            raise
        self._copier: threading.Thread | None = None
        if background:
            from csi_driver.engine.copier import run_copier

            self._copier = threading.Thread(target=run_copier, args=(self,), name="flashcopy-copier",
                                            daemon=True)
            self._copier.start()

    @classmethod
    def open(cls, state_dir: str, **kw: Any) -> Engine:
        return cls(state_dir, **kw)

    # ------------------------------------------------------------------ loading and recovery

    def _load(self) -> None:
        vols, maps, groups, bitmaps = self._store.load()
        maxseq = 0
        for r in vols:
            v = _Vol(r["id"], r["seq"], r["name"], r["size"], r["grain"], r["attrs"], r["created"], r["file"])
            v.deleted = bool(r["deleted"])
            v.offline = r["offline"]
            v.clean_rate = r["clean_rate"]
            bm = bitmaps.get("v:" + v.id)
            if bm is not None:
                v.bits = Bitmap(bm[0], bm[1])
            self._vols[v.id] = v
            maxseq = max(maxseq, v.seq)
        for r in vols:
            if r["upstream"]:
                v, up = self._vols[r["id"]], self._vols[r["upstream"]]
                v.upstream, up.downstream = up, v
        for r in maps:
            m = _Map(r["id"], r["seq"], r["name"], r["source"], r["target"], r["grain"])
            m.state = MappingState(r["state"])
            for k in ("copy_rate", "clean_rate", "group_id", "start_time", "error"):
                setattr(m, k, r[k])
            m.incremental, m.autodelete = bool(r["incremental"]), bool(r["autodelete"])
            m.restore, m.copied = bool(r["restore"]), bool(r["copied"])
            bm = bitmaps.get("d:" + m.id)
            if m.incremental and bm is not None:
                m.diff = Bitmap(bm[0], bm[1])
            # a prepare interrupted by the crash never started: back to where it can be prepared again
            if m.state in (MappingState.PREPARING, MappingState.PREPARED):
                m.state = MappingState.STOPPED if m.start_time else MappingState.IDLE_OR_COPIED
                self._dirty_map(m)
            self._maps[m.id] = m
            maxseq = max(maxseq, m.seq)
        for r in groups:
            g = _Group(r["id"], r["seq"], r["name"])
            g.start_time = r["start_time"]
            self._groups[g.id] = g
            maxseq = max(maxseq, g.seq)
        self._seq = itertools.count(maxseq + 1)
        self._attach_trackers()
        # data files: make sizes match the metadata, drop orphans of interrupted creates
        known = {v.file for v in self._vols.values()}
        for fname in os.listdir(self.data_dir):
            if fname not in known:
                os.unlink(os.path.join(self.data_dir, fname))
        for v in self._vols.values():
            path = os.path.join(self.data_dir, v.file)
            if not os.path.exists(path):
                fd = self._io.open(path, create=True)
                self._io.close(fd)
            fd = self._fd(v)
            if self._io.size(fd) != v.size:
                self._io.truncate(fd, v.size)
        if self._ch:
            self._commit()

    def _attach_trackers(self) -> None:
        for v in self._vols.values():
            v.trackers = []
        for m in self._maps.values():
            if m.diff is not None:
                for vid in (m.source, m.target):
                    v = self._vols.get(vid)
                    if v is not None:
                        v.trackers.append(m)

    def _fd(self, v: _Vol) -> int:
        if v.fd < 0:
            v.fd = self._io.open(os.path.join(self.data_dir, v.file), create=True)
        return v.fd

    # ------------------------------------------------------------------ persistence

    def _dirty_vol(self, v: _Vol) -> None:
        self._ch.volumes[v.id] = (
            v.id, v.seq, v.name, v.size, v.grain, dump_attrs(v.attrs), v.created, int(v.deleted), v.file,
            v.upstream.id if v.upstream else None, v.offline, v.clean_rate,
        )

    def _dirty_map(self, m: _Map) -> None:
        self._feeds = None  # a mapping changed: rebuild the target -> mapping index on next use
        self._ch.mappings[m.id] = (
            m.id, m.seq, m.name, m.source, m.target, m.state.value, m.copy_rate, m.clean_rate, m.grain,
            int(m.incremental), int(m.autodelete), m.group_id, m.start_time, m.error, int(m.restore),
            int(m.copied),
        )
        if m.diff is not None:
            self._bits_dirty["d:" + m.id] = (m.diff, m)

    def _dirty_group(self, g: _Group) -> None:
        self._ch.groups[g.id] = (g.id, g.seq, g.name, g.start_time)

    def _mark_bit(self, key: str, bm: Bitmap, owner: _Vol | _Map) -> None:
        self._bits_dirty[key] = (bm, owner)

    def _commit_data(self) -> None:
        """Commit only if bits or held writes are waiting; metadata rows wait for the caller's commit."""
        ch, self._ch = self._ch, Changes()
        try:
            self._commit()
        finally:
            self._ch = ch

    def _commit(self) -> None:
        """Make every in-memory change durable (I4, I5, I6). Caller holds the lock."""
        io = self._io
        # I4: grains that new bits vouch for reach the disk first
        for v in list(self._copy_dirty):
            if v.fd >= 0:
                io.fdatasync(v.fd)
        self._copy_dirty.clear()
        ch = self._ch
        for key, (bm, _owner) in self._bits_dirty.items():
            ch.bitmaps[key] = (bm.n, bytes(bm.bits))
        if ch:
            try:
                self._io.commit_metadata(self._store, ch)
            except OSError as e:
                # the space kept for metadata is given up so that state changes (a stopped mapping) still land
                if e.errno not in NOSPACE_ERRNOS or not self._release_reserve():
                    raise
                self._io.commit_metadata(self._store, ch)
        self._ch = Changes()
        for v in self._unlink_later:
            self._drop_file(v)
        self._unlink_later.clear()
        for bm, _owner in self._bits_dirty.values():
            bm.undurable.clear()
        self._bits_dirty.clear()
        # I5: writes held back behind those bits may now reach the disk
        for v in [v for v in self._vols.values() if v.pending]:
            fd = self._fd(v)
            pool = self._pool.setdefault(v.grain, [])
            for g, img in sorted(v.pending.items()):
                self._store_grain(v, g, img, fd=fd, track=False)
                if len(img) == v.grain and len(pool) * v.grain < PENDING_LIMIT:
                    pool.append(img)
            v.pending.clear()
            self._host_dirty.add(v)
        self._pending_bytes = 0
        self._last_commit = time.monotonic()

    def _reserve_path(self) -> str:
        return os.path.join(self.state_dir, "metadata.reserve")

    def _ensure_reserve(self) -> None:
        """Keep METADATA_RESERVE bytes allocated for metadata, freed when the filesystem fills up."""
        path = self._reserve_path()
        with contextlib.suppress(OSError):
            if os.path.exists(path) and os.stat(path).st_blocks * 512 >= METADATA_RESERVE:
                self._reserve_released = False
                return
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, METADATA_RESERVE)
                self._reserve_released = False
            except OSError:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)

    def _release_reserve(self) -> bool:
        path = self._reserve_path()
        if not os.path.exists(path) or os.stat(path).st_size == 0:
            return False
        log.warning("state dir %s is full: releasing the metadata reserve", self.state_dir)
        os.truncate(path, 0)
        self._reserve_released = True
        return True

    def _check_copy_space(self) -> None:
        """Once the metadata reserve is given up, copies must leave its worth of space for metadata commits."""
        if self._reserve_released:
            st = os.statvfs(self.state_dir)
            if st.f_bavail * st.f_frsize < METADATA_RESERVE:
                raise OSError(errno.ENOSPC, "No space left on device (kept for metadata)")

    def _maybe_commit(self) -> None:
        if self._pending_bytes >= PENDING_LIMIT:
            self._commit()

    # ------------------------------------------------------------------ grain primitives

    def _store_grain(self, v: _Vol, g: int, data: bytes | bytearray, *, fd: int | None = None,
                     track: bool = True) -> None:
        """Write a whole grain into v's file; an all-zero grain becomes a hole (thin stays thin)."""
        if fd is None:
            fd = self._fd(v)
        off = g * v.grain
        n = min(v.grain, v.size - off)
        if data[:16] == _ZERO[:16] and data == _ZERO[:len(data)]:  # memcmp, stops at the first non-zero
            self._io.punch(fd, off, n)
        else:
            self._io.pwrite(fd, memoryview(data)[:n], off)
        if track:
            self._copy_dirty.add(v)

    def _source_of(self, v: _Vol, g: int) -> _Vol:
        """The node whose own grain g is v's view (I1)."""
        while not v.owns(g):
            up = v.upstream
            assert up is not None
            v = up
        return v

    def _read_own(self, v: _Vol, g: int) -> bytes:
        img = v.pending.get(g)
        if img is not None:
            return bytes(img)
        off = g * v.grain
        return self._io.pread(self._fd(v), min(v.grain, v.size - off), off)

    def _read_view(self, v: _Vol, g: int) -> bytes:
        return self._read_own(self._source_of(v, g), g)

    def _push_down(self, v: _Vol, g: int, view: Callable[[], bytes]) -> None:
        """I2: give v's downstream neighbour its own copy of g before v's view of g changes."""
        d = v.downstream
        if d is None or d.owns(g):
            return
        try:
            src = self._source_of(v, g)
            if g in src.pending:
                self._check_copy_space()
                self._store_grain(d, g, view())
            else:
                self._copy_grain(src, d, g)  # in the kernel; a hole stays a hole
        except OSError as e:
            if e.errno not in NOSPACE_ERRNOS:
                raise
            # the copy cannot be stored: the target (and whatever reads through it) stops; the write goes on
            self._stop_dependents(d, f"out of space copying grain {g} from {v.id}: {e.strerror}")
            return
        d.bits.set(g)
        self._bits_dirty["v:" + d.id] = (d.bits, d)

    def _can_write_in_place(self, v: _Vol, g: int) -> bool:
        """I5: may v's own grain g be overwritten on disk right now?"""
        if g in v.pending or not v.owns(g):
            return False
        for m in v.trackers:
            if m.diff is not None and not m.diff.durable(g):
                return False
        if v.bits is not None and v.upstream is not None and g in v.bits.undurable:
            return True  # nobody can depend on a grain v took this epoch: a crash forgets both
        d = v.downstream
        return d is None or d.bits is None or d.owns_durably(g)

    def _write_grain(self, v: _Vol, g: int, goff: int, piece: bytes | memoryview) -> None:
        """Write `piece` at offset `goff` inside grain g of v, keeping every other view (I2, I5)."""
        grain = v.grain
        glen = min(grain, v.size - g * grain)
        cache: list[bytes] = []

        def view() -> bytes:
            if not cache:
                cache.append(self._read_view(v, g))
            return cache[0]

        self._push_down(v, g, view)
        for m in v.trackers:
            if m.diff is not None and m.diff.set(g):
                self._bits_dirty["d:" + m.id] = (m.diff, m)
        if v.owns(g):
            img = v.pending.get(g)
            if img is not None:
                img[goff:goff + len(piece)] = piece
            elif self._can_write_in_place(v, g):
                self._io.pwrite(self._fd(v), piece, g * grain + goff)
                self._host_dirty.add(v)
            else:
                pool = self._pool.get(grain)
                img = pool.pop() if pool and glen == grain else bytearray(glen)
                if goff == 0 and len(piece) == glen:
                    img[:] = piece
                else:
                    img[:] = view()
                    img[goff:goff + len(piece)] = piece
                v.pending[g] = img
                self._pending_bytes += len(img)
        else:
            # a target that does not own g: fill the grain from upstream, write it whole, then own it
            if goff == 0 and len(piece) == glen:
                img = bytearray(piece)
            else:
                img = bytearray(view())
                img[goff:goff + len(piece)] = piece
            self._store_grain(v, g, img)
            assert v.bits is not None
            v.bits.set(g)
            self._bits_dirty["v:" + v.id] = (v.bits, v)

    # ------------------------------------------------------------------ host I/O

    def _vol(self, vid: str) -> _Vol:
        v = self._vols.get(vid)
        if v is None or v.deleted:
            raise errors.NotFound(f"volume {vid!r} not found")
        return v

    def _io_vol(self, vid: str, offset: int, length: int) -> _Vol:
        self._check_open()
        v = self._vol(vid)
        if v.offline:
            raise errors.VolumeOffline(f"volume {vid} is offline: {v.offline}")
        if offset < 0 or length < 0 or offset + length > v.size:
            raise errors.OutOfRange(f"range {offset}+{length} outside volume {vid} of {v.size} bytes")
        return v

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        with self._lock:
            v = self._io_vol(volume_id, offset, length)
            if v.upstream is None and not v.pending:
                return self._io.pread(self._fd(v), length, offset)
            grain = v.grain
            end = offset + length
            first, last = offset // grain, (end - 1) // grain if length else offset // grain
            src = self._range_source(v, first, last)
            if src is not None and not src.pending:
                return self._io.pread(self._fd(src), length, offset)  # one node serves it all
            out = bytearray(length)
            view = memoryview(out)
            pos = offset
            while pos < end:
                g = pos // grain
                src = self._source_of(v, g)
                stop = min(end, (g + 1) * grain)
                img = src.pending.get(g)
                if img is None:
                    # extend the run while the same node serves the next grains from its file
                    while stop < end:
                        g2 = stop // grain
                        if g2 in src.pending or self._source_of(v, g2) is not src:
                            break
                        stop = min(end, (g2 + 1) * grain)
                    view[pos - offset:stop - offset] = self._io.pread(self._fd(src), stop - pos, pos)
                else:
                    goff = pos - g * grain
                    view[pos - offset:stop - offset] = img[goff:goff + stop - pos]
                pos = stop
            return bytes(out)

    def _range_source(self, v: _Vol, first: int, last: int) -> _Vol | None:
        """The node serving every grain in [first, last] for v, or None when several do."""
        n = last - first + 1
        mask = (1 << n) - 1
        x = v
        while x.upstream is not None and x.bits is not None:
            b0 = first >> 3
            word = int.from_bytes(x.bits.bits[b0:(last >> 3) + 1], "little") >> (first - (b0 << 3))
            owned = word & mask
            if owned == mask:
                return x
            if owned:
                return None
            x = x.upstream
        return x

    def write(self, volume_id: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data)
        with self._lock:
            v = self._io_vol(volume_id, offset, len(data))
            if not data:
                return
            grain = v.grain
            first, last = offset // grain, (offset + len(data) - 1) // grain
            try:
                if all(self._can_write_in_place(v, g) for g in range(first, last + 1)):
                    self._io.pwrite(self._fd(v), data, offset)  # the common case: one syscall
                    self._host_dirty.add(v)
                    return
                pos = 0
                for g in range(first, last + 1):
                    goff = offset + pos - g * grain
                    n = min(grain - goff, len(data) - pos)
                    self._write_grain(v, g, goff, data[pos:pos + n])
                    pos += n
            except OSError as e:
                if e.errno in NOSPACE_ERRNOS:
                    raise errors.NoSpace(f"no space left writing volume {volume_id}: {e.strerror}") from e
                raise
            self._maybe_commit()

    def discard(self, volume_id: str, offset: int, length: int) -> None:
        """Discard (TRIM): the range reads as zeros; whole grains become holes where no one needs them."""
        with self._lock:
            v = self._io_vol(volume_id, offset, length)
            grain = v.grain
            pos, end = offset, offset + length
            while pos < end:
                g = pos // grain
                stop = min(end, (g + 1) * grain)
                goff = pos - g * grain
                whole = goff == 0 and stop - pos == min(grain, v.size - g * grain)
                if whole and self._can_write_in_place(v, g):
                    self._io.punch(self._fd(v), pos, stop - pos)
                    self._host_dirty.add(v)
                else:
                    self._write_grain(v, g, goff, bytes(stop - pos))
                pos = stop
            self._maybe_commit()

    def flush(self, volume_id: str | None = None) -> None:
        """Everything written before the call (to that volume, or to any) survives a crash once it returns."""
        with self._lock:
            self._check_open()
            if volume_id is None:
                self._flush_all()
                return
            v = self._vol(volume_id)
            self._commit()  # bits and held writes of every volume: one transaction is all there is
            if v in self._host_dirty:
                self._host_dirty.discard(v)
                self._io.fdatasync(self._fd(v))

    def _flush_all(self) -> None:
        self._commit()
        for v in list(self._host_dirty):
            if v.fd >= 0:
                self._io.fdatasync(v.fd)
        self._host_dirty.clear()

    # ------------------------------------------------------------------ volumes

    def _check_open(self) -> None:
        if self._closed:
            raise errors.EngineClosed("engine is closed")

    def _new_id(self, prefix: str) -> str:
        while True:
            vid = f"{prefix}-{secrets.token_hex(8)}"
            if vid not in self._vols and vid not in self._maps and vid not in self._groups:
                return vid

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise errors.InvalidArgument(f"name must be 1-{MAX_NAME} characters")

    def _new_volume(self, name: str, size: int, grain: int, attrs: dict[str, str] | None,
                    volume_id: str | None) -> _Vol:
        self._check_name(name)
        if grain not in GRAIN_SIZES:
            raise errors.InvalidArgument(f"grain size must be one of {GRAIN_SIZES}, got {grain}")
        if not isinstance(size, int) or size <= 0:
            raise errors.InvalidArgument(f"size must be a positive integer, got {size!r}")
        if self.find_volume(name) is not None:
            raise errors.AlreadyExists(f"a volume named {name!r} exists")
        if volume_id is None:
            volume_id = self._new_id("vol")
        elif not valid_id(volume_id):
            raise errors.InvalidArgument(f"invalid volume id {volume_id!r}")
        elif volume_id in self._vols:
            raise errors.AlreadyExists(f"volume id {volume_id!r} exists")
        attrs = dict(attrs or {})
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in attrs.items()):
            raise errors.InvalidArgument("attrs must map strings to strings")
        size = -(-size // grain) * grain
        v = _Vol(volume_id, next(self._seq), name, size, grain, attrs, time.time(),
                 f"{volume_id}.{secrets.token_hex(4)}.img")
        self._create_file(v)
        return v

    def _create_file(self, v: _Vol) -> None:
        path = os.path.join(self.data_dir, v.file)
        fd = self._io.open(path, create=True)
        try:
            self._io.truncate(fd, v.size)
        except BaseException as e:
            self._io.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(e, OSError) and e.errno == errno.EFBIG:
                raise errors.OutOfRange(f"{v.size} bytes is more than the state dir's filesystem allows") from e
            raise
        v.fd = fd

    def create_volume(self, name: str, size: int, *, grain_size: int = DEFAULT_GRAIN,
                      attrs: dict[str, str] | None = None, volume_id: str | None = None) -> VolumeInfo:
        with self._lock:
            self._check_open()
            v = self._new_volume(name, size, grain_size, attrs, volume_id)
            self._vols[v.id] = v
            self._dirty_vol(v)
            self._commit_or_forget([v])
            return self._vinfo(v)

    def _commit_or_forget(self, new_vols: list[_Vol]) -> None:
        try:
            self._commit()
        except BaseException:
            for v in new_vols:
                self._vols.pop(v.id, None)
                self._drop_file(v)
            raise

    def _drop_file(self, v: _Vol) -> None:
        if v.fd >= 0:
            self._io.close(v.fd)
            v.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.data_dir, v.file))

    def get_volume(self, volume_id: str) -> VolumeInfo:
        with self._lock:
            return self._vinfo(self._vol(volume_id))

    def find_volume(self, name: str) -> VolumeInfo | None:
        with self._lock:
            for v in self._vols.values():
                if v.name == name and not v.deleted:
                    return self._vinfo(v)
            return None

    def list_volumes(self) -> list[VolumeInfo]:
        with self._lock:
            vols = sorted((v for v in self._vols.values() if not v.deleted), key=lambda v: v.seq)
            return [self._vinfo(v) for v in vols]

    def set_volume_attrs(self, volume_id: str, attrs: dict[str, str]) -> VolumeInfo:
        with self._lock:
            v = self._vol(volume_id)
            v.attrs = dict(attrs)
            self._dirty_vol(v)
            self._commit()
            return self._vinfo(v)

    def _incoming(self, v: _Vol) -> _Map | None:
        """The mapping that feeds v: of the mappings with v as target, the one started last."""
        if self._feeds is None:
            feeds: dict[str, _Map] = {}
            for m in self._maps.values():
                cur = feeds.get(m.target)
                if cur is None or m.start_time > cur.start_time:
                    feeds[m.target] = m
            self._feeds = feeds
        return self._feeds.get(v.id)

    def _vinfo(self, v: _Vol) -> VolumeInfo:
        m = self._incoming(v)
        status = "offline" if v.offline else "online"
        alloc = self._io.allocated(self._fd(v)) if v.fd >= 0 or not v.deleted else 0
        return VolumeInfo(
            id=v.id, name=v.name, size=v.size, grain_size=v.grain, attrs=dict(v.attrs), created_at=v.created,
            allocated_bytes=alloc, status=status, error=v.offline or (m.error if m else ""),
            source_mapping_id=m.id if m else None, deleted=v.deleted,
        )

    def resize_volume(self, volume_id: str, new_size: int) -> VolumeInfo:
        with self._lock:
            self._check_open()
            v = self._vol(volume_id)
            if not isinstance(new_size, int) or new_size <= 0:
                raise errors.InvalidArgument(f"size must be a positive integer, got {new_size!r}")
            new_size = -(-new_size // v.grain) * v.grain
            if new_size < v.size:
                raise errors.OutOfRange(f"volume {volume_id} is {v.size} bytes; shrinking is not supported")
            if new_size == v.size:
                return self._vinfo(v)
            self._flush_all()
            try:
                self._io.truncate(self._fd(v), new_size)
            except OSError as e:
                if e.errno == errno.EFBIG:
                    raise errors.OutOfRange(f"{new_size} bytes is more than the filesystem allows") from e
                raise
            v.size = new_size
            if v.bits is not None:
                v.bits.resize(v.ngrains, fill=True)  # I3: the new range is ours and reads as zeros
                self._mark_bit("v:" + v.id, v.bits, v)
            for m in self._maps.values():
                if m.diff is not None and volume_id in (m.source, m.target):
                    m.diff.resize(max(m.diff.n, v.ngrains), fill=True)
                    self._dirty_map(m)
            self._dirty_vol(v)
            self._commit()
            return self._vinfo(v)

    def delete_volume(self, volume_id: str) -> None:
        """Delete at once for the caller; storage goes when nothing reads through the volume any more."""
        with self._lock:
            self._check_open()
            v = self._vol(volume_id)
            inc = self._incoming(v) if v.upstream is not None else None
            if inc is not None:
                v.clean_rate = inc.clean_rate
            elif v.downstream is not None:
                dm = self._incoming(v.downstream)
                v.clean_rate = dm.clean_rate if dm else 0
            for m in list(self._maps.values()):
                # mappings into v are pointless now; mappings out of v that still copy keep going
                if m.target == v.id or (m.source == v.id and m.state not in (MappingState.COPYING,
                                                                            MappingState.STOPPING)):
                    self._forget_mapping(m)
            if v.upstream is not None and v.downstream is None:
                self._unlink(v)  # a target nobody reads through: just cut it off
            v.deleted = True
            v.name = f"{v.name}\0deleted\0{v.id}"  # frees the name for reuse
            self._dirty_vol(v)
            self._reap()
            self._commit()
            self._ensure_reserve()  # space may have come back
            self._work.notify_all()

    def _forget_mapping(self, m: _Map) -> None:
        self._maps.pop(m.id, None)
        self._feeds = None
        self._ch.del_mappings.add(m.id)
        self._ch.del_bitmaps.add("d:" + m.id)
        self._bits_dirty.pop("d:" + m.id, None)
        if m.diff is not None:
            self._attach_trackers()

    def _reap(self) -> None:
        """Free deleted volumes nothing reads through: a tail is unlinked at once (no one depends on it)."""
        changed = True
        while changed:
            changed = False
            for v in list(self._vols.values()):
                if not v.deleted or v.downstream is not None:
                    continue
                for m in list(self._maps.values()):
                    if v.id in (m.source, m.target) and m.state not in (MappingState.COPYING,
                                                                       MappingState.STOPPING):
                        self._forget_mapping(m)
                up = v.upstream
                if up is not None:
                    up.downstream = None
                    v.upstream = None
                self._vols.pop(v.id)
                self._ch.del_volumes.add(v.id)
                self._ch.volumes.pop(v.id, None)
                self._ch.del_bitmaps.add("v:" + v.id)
                self._bits_dirty.pop("v:" + v.id, None)
                self._copy_dirty.discard(v)
                self._host_dirty.discard(v)
                v.pending.clear()
                # the file goes after the metadata no longer names it; an orphan left by a crash goes at open
                self._unlink_later.append(v)
                changed = True

    # ------------------------------------------------------------------ cascade surgery

    def _unlink(self, v: _Vol) -> None:
        """Take v out of its cascade; its downstream neighbour reads v's upstream from now on."""
        up, down = v.upstream, v.downstream
        if down is not None:
            down.upstream = up
            self._dirty_vol(down)
        if up is not None:
            up.downstream = down
            self._dirty_vol(up)
        v.upstream = v.downstream = None
        self._dirty_vol(v)

    def _insert_below(self, src: _Vol, t: _Vol) -> None:
        down = src.downstream
        t.upstream, t.downstream = src, down
        src.downstream = t
        if down is not None:
            down.upstream = t
            self._dirty_vol(down)
        self._dirty_vol(src)
        self._dirty_vol(t)

    def _split(self, v: _Vol) -> None:
        """v owns every grain durably: cut it from upstream; its downstream keeps reading through it."""
        up = v.upstream
        if up is not None:
            up.downstream = None
            v.upstream = None
            self._dirty_vol(up)
            self._dirty_vol(v)

    def _depends(self, below: _Vol, owned: int) -> bool:
        """Does `below` read any grain in `owned` (an int bitset) through its upstream?"""
        if below.bits is None:
            return False
        mine = below.bits.as_int()
        limit = (1 << below.ngrains) - 1
        return bool(owned & ~mine & limit)

    def _stop_dependents(self, d: _Vol, reason: str) -> None:
        """Forced stop of target d and of every node below it that needs d's grains (out-of-space policy)."""
        victims = [d]
        owned = d.bits.as_int() if d.bits is not None else (1 << d.ngrains) - 1
        e = d.downstream
        while e is not None and self._depends(e, owned):
            victims.append(e)
            owned |= e.bits.as_int() if e.bits is not None else 0
            e = e.downstream
        top, bottom = victims[0].upstream, victims[-1].downstream
        if top is not None:
            top.downstream = bottom
            self._dirty_vol(top)
        if bottom is not None:
            bottom.upstream = top
            self._dirty_vol(bottom)
        for x in victims:
            x.upstream = x.downstream = None
            x.offline = reason if x is d else f"stopped with {d.id}: {reason}"
            x.pending.clear()
            self._dirty_vol(x)
            m = self._incoming(x)
            if m is not None and m.state in (MappingState.COPYING, MappingState.STOPPING):
                m.state = MappingState.STOPPED
                m.error = x.offline
                self._dirty_map(m)
        log.warning("mapping stopped: %s", reason)
        self._reap()

    # ------------------------------------------------------------------ mappings

    def _map(self, mid: str) -> _Map:
        m = self._maps.get(mid)
        if m is None:
            raise errors.NotFound(f"mapping {mid!r} not found")
        return m

    def _minfo(self, m: _Map) -> MappingInfo:
        t = self._vols.get(m.target)
        if m.state == MappingState.IDLE_OR_COPIED:
            progress = 100.0 if m.copied or m.start_time else 0.0
        elif t is not None and t.bits is not None and t.ngrains:
            progress = 100.0 * t.bits.count() / t.ngrains
        else:
            progress = 0.0
        return MappingInfo(
            id=m.id, name=m.name, source_id=m.source, target_id=m.target, state=m.state,
            copy_rate=m.copy_rate, clean_rate=m.clean_rate, grain_size=m.grain, progress=round(progress, 2),
            incremental=m.incremental, autodelete=m.autodelete, group_id=m.group_id,
            start_time=m.start_time, error=m.error, restore=m.restore,
        )

    def create_mapping(self, source_id: str, target_id: str, *, copy_rate: int = DEFAULT_COPY_RATE,
                       clean_rate: int = DEFAULT_CLEAN_RATE, grain_size: int | None = None,
                       incremental: bool = False, autodelete: bool = False, group_id: str | None = None,
                       name: str | None = None) -> MappingInfo:
        with self._lock:
            self._check_open()
            m = self._new_mapping(source_id, target_id, copy_rate, clean_rate, grain_size, incremental,
                                  autodelete, group_id, name)
            self._maps[m.id] = m
            self._dirty_map(m)
            self._commit()
            return self._minfo(m)

    def _new_mapping(self, source_id: str, target_id: str, copy_rate: int, clean_rate: int,
                     grain_size: int | None, incremental: bool, autodelete: bool, group_id: str | None,
                     name: str | None) -> _Map:
        s, t = self._vol(source_id), self._vol(target_id)
        if s is t:
            raise errors.InvalidArgument("source and target must differ")
        _check_rate("copy_rate", copy_rate)
        _check_rate("clean_rate", clean_rate)
        if grain_size is not None and grain_size != s.grain:
            raise errors.InvalidArgument(
                f"grain size {grain_size} differs from the source's {s.grain} (a cascade has one grain size)")
        if t.grain != s.grain:
            raise errors.InvalidArgument(f"target grain {t.grain} differs from source grain {s.grain}")
        if t.size < s.size:
            raise errors.OutOfRange(f"target {t.id} ({t.size} bytes) is smaller than source {s.id} ({s.size})")
        if group_id is not None:
            g = self._groups.get(group_id)
            if g is None:
                raise errors.NotFound(f"group {group_id!r} not found")
            if self._group_state(g) not in ("idle_or_copied", "stopped", "empty"):
                raise errors.InvalidState(f"group {group_id} is active; membership cannot change")
        mid = self._new_id("map")
        m = _Map(mid, next(self._seq), name or mid, s.id, t.id, s.grain)
        m.copy_rate, m.clean_rate = copy_rate, clean_rate
        m.incremental, m.autodelete, m.group_id = bool(incremental), bool(autodelete), group_id
        if m.incremental:
            m.diff = Bitmap(max(s.ngrains, t.ngrains))
        return m

    def get_mapping(self, mapping_id: str) -> MappingInfo:
        with self._lock:
            return self._minfo(self._map(mapping_id))

    def list_mappings(self, *, volume_id: str | None = None) -> list[MappingInfo]:
        with self._lock:
            ms = sorted(self._maps.values(), key=lambda m: m.seq)
            return [self._minfo(m) for m in ms if volume_id is None or volume_id in (m.source, m.target)]

    def modify_mapping(self, mapping_id: str, *, copy_rate: int | None = None, clean_rate: int | None = None,
                       autodelete: bool | None = None) -> MappingInfo:
        with self._lock:
            m = self._map(mapping_id)
            if copy_rate is not None:
                m.copy_rate = _check_rate("copy_rate", copy_rate)
            if clean_rate is not None:
                m.clean_rate = _check_rate("clean_rate", clean_rate)
            if autodelete is not None:
                m.autodelete = bool(autodelete)
            self._dirty_map(m)
            if m.autodelete and m.state == MappingState.IDLE_OR_COPIED and m.start_time:
                self._forget_mapping(m)
                self._reap()
            self._commit()
            self._work.notify_all()
            return self._minfo(m)

    def _check_startable(self, m: _Map) -> None:
        if m.state not in (MappingState.IDLE_OR_COPIED, MappingState.STOPPED, MappingState.PREPARED,
                           MappingState.PREPARING):
            raise errors.InvalidState(f"mapping {m.id} is {m.state.value}; stop it before starting again")
        s, t = self._vols.get(m.source), self._vols.get(m.target)
        if s is None or s.deleted:
            raise errors.InvalidState(f"mapping {m.id}: source {m.source} was deleted")
        if t is None or t.deleted:
            raise errors.InvalidState(f"mapping {m.id}: target {m.target} was deleted")
        if s.offline:
            raise errors.InvalidState(f"mapping {m.id}: source {s.id} is offline: {s.offline}")
        if t.upstream is not None:
            raise errors.InvalidState(f"target {t.id} is already the target of an active mapping")

    def prepare_mapping(self, mapping_id: str) -> MappingInfo:
        with self._lock:
            self._check_open()
            m = self._map(mapping_id)
            if m.group_id is not None:
                raise errors.InvalidState(f"mapping {m.id} is in group {m.group_id}; prepare the group")
            self._prepare([m])
            return self._minfo(m)

    def _prepare(self, ms: list[_Map]) -> None:
        """FlashCopy's prepare: flush the sources so the start itself has little left to do.

        Called with the lock held once; the lock is dropped while the data is synced so host I/O goes on.
        The prepared state is not made durable: after a crash a prepared mapping is simply not started.
        """
        for m in ms:
            self._check_startable(m)
            m.state = MappingState.PREPARING
        self._commit_data()
        sources = {self._vols[m.source] for m in ms}
        fds = [os.dup(v.fd) for v in sources if v in self._host_dirty and v.fd >= 0]
        self._host_dirty -= sources
        self._lock.release()
        try:
            for fd in fds:
                self._io.fdatasync(fd)
                os.close(fd)
        finally:
            self._lock.acquire()
        for m in ms:
            if m.state == MappingState.PREPARING:
                m.state = MappingState.PREPARED

    def start_mapping(self, mapping_id: str, *, quiesce: Quiesce | None = None) -> MappingInfo:
        with self._lock:
            self._check_open()
            m = self._map(mapping_id)
            if m.group_id is not None:
                raise errors.InvalidState(f"mapping {m.id} is in group {m.group_id}; start the group")
            self._check_startable(m)
        self._start([m], quiesce)
        with self._lock:
            return self._minfo(m)

    def _start(self, ms: list[_Map], quiesce: Quiesce | None, group: _Group | None = None) -> None:
        """Start mappings at one instant: host I/O to every source is held while the cascades change."""
        with self._lock:
            self._prepare(ms)
        ctx = quiesce([m.source for m in ms]) if quiesce is not None else contextlib.nullcontext()
        with ctx, self._lock:
            held = time.perf_counter()
            self._check_open()
            for m in ms:
                if m.state != MappingState.PREPARED:
                    raise errors.InvalidState(f"mapping {m.id} left the prepared state")
                self._check_startable(m)
            # writes since prepare: the instant holds exactly what the host saw, durably
            self._commit()
            for m in ms:
                s = self._vols[m.source]
                if s in self._host_dirty:
                    self._io.fdatasync(self._fd(s))
                    self._host_dirty.discard(s)
            now = time.time()
            truncate: list[_Vol] = []
            for m in ms:
                truncate += self._insert_target(m, now)
            if group is not None:
                group.start_time = now
                self._dirty_group(group)
            self._commit()
            for t in truncate:  # drop the old data only once no committed bitmap vouches for it (I4)
                self._io.truncate(self._fd(t), 0)
                self._io.truncate(self._fd(t), t.size)
            self._work.notify_all()
            #: how long the last start held host I/O (the FlashCopy start pause), for metrics and benchmarks
            self.last_start_hold = time.perf_counter() - held

    def _insert_target(self, m: _Map, now: float) -> list[_Vol]:
        s, t = self._vols[m.source], self._vols[m.target]
        fresh: list[_Vol] = []
        m.restore = False
        if t.downstream is not None:
            # t's current data is still read by others (t may even be upstream of s: a restore). A hidden node
            # keeps that data and t's place in its cascade; t starts over with an empty file.
            keeper = _Vol(self._new_id("vol"), next(self._seq), f"\0kept\0{t.id}", t.size, t.grain, {},
                          time.time(), t.file)
            keeper.deleted, keeper.fd, keeper.bits = True, t.fd, t.bits
            keeper.pending, t.pending = t.pending, {}
            keeper.upstream, keeper.downstream = t.upstream, t.downstream
            if t.downstream is not None:
                t.downstream.upstream = keeper
                self._dirty_vol(t.downstream)
            if t.upstream is not None:
                t.upstream.downstream = keeper
            dm = self._incoming(t.downstream) if t.downstream is not None else None
            keeper.clean_rate = dm.clean_rate if dm else 0
            self._vols[keeper.id] = keeper
            # mappings out of t that still copy address t by id; their targets now read through keeper
            t.upstream = t.downstream = None
            t.file, t.fd = f"{t.id}.{secrets.token_hex(4)}.img", -1
            self._create_file(t)
            self._dirty_vol(keeper)
            if keeper.bits is not None:
                self._mark_bit("v:" + keeper.id, keeper.bits, keeper)
            m.restore = True
            bits = Bitmap(t.ngrains)
        elif m.incremental and m.copied and m.diff is not None:
            # incremental restart: keep every grain changed on neither side since the last start
            mask = (1 << t.ngrains) - 1
            owned = t.bits.as_int() if t.bits is not None else mask
            keep = owned & ~m.diff.as_int() & mask
            bits = Bitmap(t.ngrains, keep.to_bytes((t.ngrains + 7) >> 3, "little"))
        else:
            bits = Bitmap(t.ngrains)
            fresh.append(t)
        # I3: the range past the source's end belongs to the target and reads as zeros. It is zeroed now, before
        # the commit that makes it owned (FlashCopy's prepare may change a target that is never started too).
        if t.ngrains > s.ngrains:
            for g in range(s.ngrains, t.ngrains):
                bits.bits[g >> 3] |= 1 << (g & 7)
            self._io.punch(self._fd(t), s.size, t.size - s.size)
            self._copy_dirty.add(t)
        bits.undurable.clear()
        t.bits = bits
        t.offline = ""
        t.pending.clear()
        self._insert_below(s, t)
        self._mark_bit("v:" + t.id, t.bits, t)
        m.state = MappingState.COPYING
        m.start_time = now
        m.error = ""
        if m.diff is not None:
            m.diff = Bitmap(max(s.ngrains, t.ngrains))
            self._dirty_map(m)
            self._attach_trackers()
        self._dirty_map(m)
        return fresh

    def stop_mapping(self, mapping_id: str, *, force: bool = False) -> MappingInfo:
        with self._lock:
            self._check_open()
            m = self._map(mapping_id)
            self._stop(m, force)
            self._commit()
            self._work.notify_all()
            return self._minfo(m)

    def _stop(self, m: _Map, force: bool) -> None:
        if m.state in (MappingState.PREPARED, MappingState.PREPARING):
            m.state = MappingState.STOPPED if m.start_time else MappingState.IDLE_OR_COPIED
            self._dirty_map(m)
            return
        if m.state not in (MappingState.COPYING, MappingState.STOPPING):
            return  # idle_or_copied and stopped: nothing to stop
        t = self._vols[m.target]
        if t.bits is not None and t.bits.full():
            self._complete(m, t)
            return
        if t.downstream is None:
            self._detach_stopped(m, t, "")
        elif force:
            self._stop_dependents(t, f"mapping {m.id} stopped by force")
            m.error = ""
            self._dirty_map(m)
        else:
            m.state = MappingState.STOPPING  # the copier cleans t into its downstream, then detaches it
            t.offline = f"mapping {m.id} is stopping before the copy completed"  # FlashCopy: target offline
            self._dirty_map(m)
            self._dirty_vol(t)

    def _detach_stopped(self, m: _Map, t: _Vol, error: str) -> None:
        self._unlink(t)
        t.offline = error or f"mapping {m.id} was stopped before the copy completed"
        t.pending.clear()
        m.state = MappingState.STOPPED
        m.error = error
        self._dirty_vol(t)
        self._dirty_map(m)
        self._reap()

    def _complete(self, m: _Map, t: _Vol) -> None:
        """The target owns every grain: it becomes independent (FlashCopy's copy complete)."""
        self._commit()  # the split below needs every bit durable
        self._split(t)
        m.state = MappingState.IDLE_OR_COPIED
        m.copied = True
        self._dirty_map(m)
        if m.autodelete:
            self._forget_mapping(m)
        self._reap()

    def delete_mapping(self, mapping_id: str, *, force: bool = False) -> None:
        with self._lock:
            m = self._map(mapping_id)
            if m.state == MappingState.STOPPED and not force:
                raise errors.InvalidState(f"mapping {m.id} is stopped; delete with force")
            if m.state not in (MappingState.IDLE_OR_COPIED, MappingState.STOPPED):
                if not force:
                    raise errors.InvalidState(f"mapping {m.id} is {m.state.value}; stop it first")
                self._stop(m, True)
            t = self._vols.get(m.target)
            if t is not None and m.state == MappingState.STOPPED:
                t.offline = ""  # force-deleting a stopped mapping brings its target back, as it is
                self._dirty_vol(t)
            self._forget_mapping(m)
            self._reap()
            self._commit()

    # ------------------------------------------------------------------ groups

    def _group(self, gid: str) -> _Group:
        g = self._groups.get(gid)
        if g is None:
            raise errors.NotFound(f"group {gid!r} not found")
        return g

    def _members(self, g: _Group) -> list[_Map]:
        return sorted((m for m in self._maps.values() if m.group_id == g.id), key=lambda m: m.seq)

    def _group_state(self, g: _Group) -> str:
        states = {m.state.value for m in self._members(g)}
        if not states:
            return "empty"
        for s in ("stopping", "copying", "preparing", "prepared", "stopped"):
            if s in states:
                return s
        return "idle_or_copied"

    def _ginfo(self, g: _Group) -> GroupInfo:
        return GroupInfo(id=g.id, name=g.name, state=self._group_state(g),
                         mapping_ids=tuple(m.id for m in self._members(g)), start_time=g.start_time)

    def create_group(self, name: str) -> GroupInfo:
        with self._lock:
            self._check_open()
            self._check_name(name)
            if any(g.name == name for g in self._groups.values()):
                raise errors.AlreadyExists(f"a group named {name!r} exists")
            g = _Group(self._new_id("grp"), next(self._seq), name)
            self._groups[g.id] = g
            self._dirty_group(g)
            self._commit()
            return self._ginfo(g)

    def get_group(self, group_id: str) -> GroupInfo:
        with self._lock:
            return self._ginfo(self._group(group_id))

    def list_groups(self) -> list[GroupInfo]:
        with self._lock:
            return [self._ginfo(g) for g in sorted(self._groups.values(), key=lambda g: g.seq)]

    def prepare_group(self, group_id: str) -> GroupInfo:
        with self._lock:
            g = self._group(group_id)
            self._prepare(self._members(g))
            return self._ginfo(g)

    def start_group(self, group_id: str, *, quiesce: Quiesce | None = None) -> GroupInfo:
        with self._lock:
            self._check_open()
            g = self._group(group_id)
            ms = self._members(g)
            if not ms:
                raise errors.InvalidState(f"group {group_id} has no mappings")
            for m in ms:
                self._check_startable(m)
        self._start(ms, quiesce, g)
        with self._lock:
            return self._ginfo(g)

    def stop_group(self, group_id: str, *, force: bool = False) -> GroupInfo:
        with self._lock:
            g = self._group(group_id)
            for m in self._members(g):
                self._stop(m, force)
            self._commit()
            self._work.notify_all()
            return self._ginfo(g)

    def delete_group(self, group_id: str) -> None:
        """Delete the group; its mappings become stand-alone (FlashCopy's group 0)."""
        with self._lock:
            g = self._group(group_id)
            for m in self._members(g):
                m.group_id = None
                self._dirty_map(m)
            self._groups.pop(g.id)
            self._ch.del_groups.add(g.id)
            self._commit()

    # ------------------------------------------------------------------ one-call operations

    def snapshot(self, source_id: str, name: str, *, copy_rate: int = 0, clean_rate: int = 0,
                 attrs: dict[str, str] | None = None, volume_id: str | None = None,
                 quiesce: Quiesce | None = None) -> tuple[VolumeInfo, MappingInfo]:
        """A point-in-time copy of source: a new target volume and a started (by default no-copy) mapping."""
        _, pairs = self._copy_set([(source_id, name, attrs, volume_id)], None, copy_rate, clean_rate,
                                  autodelete=False, quiesce=quiesce)
        return pairs[0]

    def snapshot_group(self, items: list[tuple[str, str, dict[str, str] | None, str | None]], *,
                       group_name: str, copy_rate: int = 0,
                       quiesce: Quiesce | None = None) -> tuple[GroupInfo, list[tuple[VolumeInfo, MappingInfo]]]:
        """Snapshots of several volumes at one instant (a consistency group). All are made or none."""
        if not items:
            raise errors.InvalidArgument("a group snapshot needs at least one source volume")
        grp, pairs = self._copy_set(items, group_name, copy_rate, 0, autodelete=False, quiesce=quiesce)
        assert grp is not None
        return grp, pairs

    def clone(self, source_id: str, name: str, *, size: int | None = None, copy_rate: int = DEFAULT_COPY_RATE,
              clean_rate: int = DEFAULT_CLEAN_RATE, attrs: dict[str, str] | None = None,
              volume_id: str | None = None, autodelete: bool = True,
              quiesce: Quiesce | None = None) -> tuple[VolumeInfo, MappingInfo]:
        """A new volume with source's data, usable at once; background copy makes it independent."""
        _, pairs = self._copy_set([(source_id, name, attrs, volume_id)], None, copy_rate, clean_rate,
                                  autodelete=autodelete, size=size, quiesce=quiesce)
        return pairs[0]

    def _copy_set(self, items: list[tuple[str, str, dict[str, str] | None, str | None]], group_name: str | None,
                  copy_rate: int, clean_rate: int, *, autodelete: bool, size: int | None = None,
                  quiesce: Quiesce | None = None) -> tuple[GroupInfo | None, list[tuple[VolumeInfo, MappingInfo]]]:
        """Create targets and mappings, then start them together. All or nothing.

        The start runs without the caller holding the engine lock: its prepare syncs data with the lock released
        and its quiesce hook (a filesystem freeze) writes through the engine.
        """
        _check_rate("copy_rate", copy_rate)
        _check_rate("clean_rate", clean_rate)
        names = [it[1] for it in items]
        if len(set(names)) != len(names):
            raise errors.InvalidArgument("target names must be distinct")
        new_vols: list[_Vol] = []
        new_maps: list[_Map] = []
        group: _Group | None = None
        try:
            with self._lock:
                self._check_open()
                if group_name is not None:
                    self._check_name(group_name)
                    if any(g.name == group_name for g in self._groups.values()):
                        raise errors.AlreadyExists(f"a group named {group_name!r} exists")
                    group = _Group(self._new_id("grp"), next(self._seq), group_name)
                for source_id, name, attrs, vid in items:
                    s = self._vol(source_id)
                    if s.offline:
                        raise errors.InvalidState(f"source {s.id} is offline: {s.offline}")
                    tsize = s.size if size is None else size
                    if tsize < s.size:
                        raise errors.OutOfRange(f"requested size {tsize} is smaller than source {s.id} ({s.size})")
                    t = self._new_volume(name, tsize, s.grain, attrs, vid)
                    new_vols.append(t)
                    self._vols[t.id] = t
                    m = _Map(self._new_id("map"), next(self._seq), t.id, s.id, t.id, s.grain)
                    m.copy_rate, m.clean_rate, m.autodelete = copy_rate, clean_rate, autodelete
                    m.group_id = group.id if group else None
                    new_maps.append(m)
                    self._maps[m.id] = m
                    self._feeds = None
                if group is not None:
                    self._groups[group.id] = group
            # the new rows reach disk in the start's own commit: a crash leaves all of it or none
            self._start(new_maps, quiesce, group)
        except BaseException:
            with self._lock:
                self._forget_new(new_vols, new_maps, group)
            raise
        with self._lock:
            pairs = [(self._vinfo(self._vols[m.target]), self._minfo(m)) for m in new_maps]
            if autodelete:
                self._work.notify_all()
            return (self._ginfo(group) if group else None), pairs

    def _forget_new(self, new_vols: list[_Vol], new_maps: list[_Map], group: _Group | None) -> None:
        """Undo a failed _copy_set, in memory and (if a commit already wrote any of it) on disk."""
        for m in new_maps:
            self._maps.pop(m.id, None)
            self._feeds = None
            self._ch.mappings.pop(m.id, None)
            self._ch.del_mappings.add(m.id)
        for v in new_vols:
            if v.upstream is not None or v.downstream is not None:
                self._unlink(v)
            self._vols.pop(v.id, None)
            self._ch.volumes.pop(v.id, None)
            self._ch.del_volumes.add(v.id)
            self._ch.del_bitmaps.add("v:" + v.id)
            self._bits_dirty.pop("v:" + v.id, None)
            self._copy_dirty.discard(v)
            self._unlink_later.append(v)
        if group is not None:
            self._groups.pop(group.id, None)
            self._ch.groups.pop(group.id, None)
            self._ch.del_groups.add(group.id)
        if not self._closed:
            with contextlib.suppress(Exception):
                self._commit()

    def restore(self, from_volume_id: str, to_volume_id: str, *, copy_rate: int = DEFAULT_COPY_RATE) -> MappingInfo:
        """Reverse FlashCopy: to_volume shows from_volume's data at once; other snapshots are kept."""
        with self._lock:
            self._check_open()
            m = self._new_mapping(from_volume_id, to_volume_id, copy_rate, DEFAULT_CLEAN_RATE, None, False,
                                  True, None, None)
            self._maps[m.id] = m
            self._feeds = None
        try:
            self._start([m], None)  # the mapping row is written by the start's commit
        except BaseException:
            with self._lock:
                self._maps.pop(m.id, None)
                self._feeds = None
                self._ch.mappings.pop(m.id, None)
            raise
        with self._lock:
            return self._minfo(m)

    # ------------------------------------------------------------------ introspection

    def capacity(self) -> tuple[int, int]:
        st = os.statvfs(self.state_dir)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def changed_extents(self, base_id: str | None, target_id: str) -> list[tuple[int, int]]:
        """Byte extents (grain granular) where target differs from base; allocated extents when base is None.

        Two volumes of one cascade share every grain neither owns on the path between them, so only grains
        owned by a node on that path can differ. Others are compared by content.
        """
        with self._lock:
            t = self._vol(target_id)
            grain = t.grain
            if base_id is None:
                grains = [g for g in range(t.ngrains)
                          if not self._io.is_hole(self._fd(self._source_of(t, g)), g * grain, grain)
                          or g in self._source_of(t, g).pending]
            else:
                b = self._vol(base_id)
                if b.grain != grain:
                    raise errors.InvalidArgument("volumes have different grain sizes")
                grains = self._differing(b, t)
            return _extents(grains, grain, t.size)

    def _differing(self, b: _Vol, t: _Vol) -> list[int]:
        n = max(b.ngrains, t.ngrains)
        chain_b, chain_t = self._chain_up(b), self._chain_up(t)
        common = next((x for x in chain_t if x in chain_b), None)
        if common is not None:
            owned = 0
            for chain in (chain_b, chain_t):
                for x in chain:
                    if x is common:
                        break
                    owned |= x.bits.as_int() if x.bits is not None else (1 << x.ngrains) - 1
            candidates = set_grains(owned.to_bytes((n + 7) >> 3, "little"), n)
        else:
            candidates = list(range(n))
        out = []
        for g in candidates:
            a = self._read_view(b, g) if g < b.ngrains else b""
            c = self._read_view(t, g) if g < t.ngrains else b""
            if a != c:
                out.append(g)
        return out

    def _chain_up(self, v: _Vol) -> list[_Vol]:
        out = []
        x: _Vol | None = v
        while x is not None:
            out.append(x)
            x = x.upstream
        return out

    def run_copies(self, budget: int | None = None) -> int:
        """Do background copy/cleaning work now, in the caller's thread (see copier.pump)."""
        from csi_driver.engine.copier import pump

        return pump(self, budget)

    def wait_copies(self, timeout: float | None = None) -> bool:
        """Wait until no background copy or cleaning work is left. True if none is left."""
        if self._copier is None:
            self.run_copies()
            with self._lock:
                return not self._has_work()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._has_work():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._work.wait(0.05 if left is None else min(left, 0.05))
            return True

    def _has_work(self) -> bool:
        return bool(self._copy_jobs() or self._clean_jobs())

    # ------------------------------------------------------------------ background work (used by the copier)

    def _copy_jobs(self) -> list[tuple[_Map, _Vol]]:
        jobs = []
        for m in self._maps.values():
            if m.state == MappingState.COPYING:
                t = self._vols.get(m.target)
                if t is not None and t.upstream is not None and (m.copy_rate > 0 or t.bits is None
                                                                  or t.bits.full()):
                    jobs.append((m, t))
        return jobs

    def _clean_jobs(self) -> list[tuple[_Vol, int, _Map | None]]:
        """Nodes to take out of their cascade after cleaning: (node, clean rate, stopping mapping)."""
        jobs: list[tuple[_Vol, int, _Map | None]] = []
        for m in self._maps.values():
            if m.state == MappingState.STOPPING:
                t = self._vols.get(m.target)
                if t is not None:
                    jobs.append((t, m.clean_rate or DEFAULT_CLEAN_RATE, m))
        for v in self._vols.values():
            if v.deleted and v.downstream is not None and v.clean_rate > 0 \
                    and not any(m.source == v.id for m in self._maps.values()):
                jobs.append((v, v.clean_rate, None))
        return jobs

    def _copy_step(self, m: _Map, t: _Vol, cursor: int, budget: int) -> tuple[int, int]:
        """Copy up to `budget` bytes of grains t does not own, from `cursor`. Returns (bytes, next cursor)."""
        done = 0
        assert t.bits is not None
        while done < budget:
            with self._lock:
                if m.state != MappingState.COPYING or t.upstream is None or self._maps.get(m.id) is not m:
                    return done, -1
                g = t.bits.first_clear(cursor)
                if g < 0 and cursor:
                    g = t.bits.first_clear(0)
                if g < 0:
                    self._complete(m, t)
                    self._commit()
                    self._work.notify_all()
                    return done, -1
                src = self._source_of(t, g)
                try:
                    self._copy_grain(src, t, g)
                except OSError as e:
                    if e.errno not in NOSPACE_ERRNOS:
                        raise
                    # nothing is at risk (no write waits on this copy): wait for space instead of stopping the
                    # mapping, which would take a clone the user already writes to offline
                    why = f"background copy waiting for space: {e.strerror}"
                    if m.error != why:
                        m.error = why
                        self._dirty_map(m)
                        log.warning("mapping %s: %s", m.id, why)
                    return done, cursor
                if m.error:
                    m.error = ""
                    self._dirty_map(m)
                t.bits.set(g)
                self._bits_dirty["v:" + t.id] = (t.bits, t)
                cursor = g + 1
                done += t.grain
        return done, cursor

    def _copy_grain(self, src: _Vol, dst: _Vol, g: int) -> None:
        self._check_copy_space()
        off = g * src.grain
        n = min(src.grain, dst.size - off, src.size - off)
        img = src.pending.get(g)
        if img is not None:
            self._store_grain(dst, g, img)
            return
        sfd, dfd = self._fd(src), self._fd(dst)
        if self._io.is_hole(sfd, off, n):
            self._io.punch(dfd, off, n)
        else:
            self._io.copy(sfd, dfd, n, off, off)
        self._copy_dirty.add(dst)

    def _clean_step(self, v: _Vol, m: _Map | None, budget: int) -> tuple[int, bool]:
        """Copy grains v owns and its downstream lacks into the downstream; unlink v when none are left."""
        done = 0
        while True:
            with self._lock:
                d = v.downstream
                if self._vols.get(v.id) is not v:
                    return done, True
                if d is None or d.bits is None:
                    self._finish_clean(v, m)
                    return done, True
                mine = v.bits.as_int() if (v.bits is not None and v.upstream is not None) \
                    else (1 << v.ngrains) - 1
                need = mine & ~d.bits.as_int() & ((1 << d.ngrains) - 1)
                if not need:
                    self._finish_clean(v, m)
                    return done, True
                if done >= budget:
                    return done, False
                g = (need & -need).bit_length() - 1
                try:
                    self._copy_grain(v, d, g)
                except OSError as e:
                    if e.errno not in NOSPACE_ERRNOS:
                        raise
                    self._stop_dependents(d, f"out of space while cleaning {v.id}: {e.strerror}")
                    self._commit()
                    return done, True
                d.bits.set(g)
                self._bits_dirty["v:" + d.id] = (d.bits, d)
                done += v.grain

    def _finish_clean(self, v: _Vol, m: _Map | None) -> None:
        self._commit()  # the downstream's new bits are durable before v stops backing them
        if m is not None:
            self._detach_stopped(m, v, "")
        else:
            d = v.downstream
            self._unlink(v)
            dm = self._incoming(d) if d is not None and d.upstream is None else None
            if d is not None and dm is not None and dm.state == MappingState.COPYING:
                self._complete(dm, d)  # cleaning a head into d left d owning everything
            self._reap()
        self._commit()
        self._work.notify_all()

    def _periodic_commit(self) -> None:
        with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            if self._reserve_released and now - self._reserve_checked > 2.0:
                self._reserve_checked = now  # space may have come back: hold the reserve again
                st = os.statvfs(self.state_dir)
                if st.f_bavail * st.f_frsize > 4 * METADATA_RESERVE:
                    self._ensure_reserve()
            if (self._bits_dirty or self._ch or self._copy_dirty or self._pending_bytes) and \
                    time.monotonic() - self._last_commit >= self._commit_interval:
                self._commit()

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._flush_all()
            self._closed = True
            self._work.notify_all()
        if self._copier is not None:
            self._copier.join(timeout=10)
        with self._lock:
            for v in self._vols.values():
                if v.fd >= 0:
                    self._io.close(v.fd)
                    v.fd = -1
            self._store.close()
            os.close(self._lockfd)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _extents(grains: Iterable[int], grain: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for g in grains:
        off = g * grain
        n = min(grain, size - off)
        if n <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def _raise_fd_limit() -> None:
    # one data file per volume stays open: 1000 volumes + 1000 snapshots need more than the usual 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
