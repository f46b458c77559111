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
J1-J4 (journal) a host write acknowledged while its effect lives only in memory (held, or in a grain owned by an
                undurable bit) is in the held-write journal until the commit that makes it durable; a new engine
                of the same boot replays it before serving (journal.py), so a process death loses no
                acknowledged write.

Layout
------
`Engine` is the facade: the public API, the one engine lock (an RLock in ``_lock``), open, loading and close.
It combines layers over `state.EngineState` (the records and every shared attribute):

    durability.Durability   dirty tracking, commit, held writes, metadata reserve (I4-I6)
    cascade.Cascade         views, copy-on-write, grain primitives, insert/unlink/split/reap (I1-I3)
    volumes.Volumes         create, resize, delete volumes
    mappings.Mappings       mapping states and transitions, snapshot/clone/restore
    groups.Groups           consistency groups
    jobs.Jobs               the engine side of copier.CopierHost (background copy and cleaning)

The background copier (copier.py) drives `Engine` through copier.CopierHost only.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import resource
import sqlite3
import threading
import time
from collections.abc import Iterable
from typing import Any

from csi_driver.engine import datafiles, errors
from csi_driver.engine.bitmap import bit_runs
from csi_driver.engine.copier import pump, run_copier
from csi_driver.engine.fileio import FileIO
from csi_driver.engine.groups import Groups
from csi_driver.engine.jobs import Jobs
from csi_driver.engine.journal import Journal, Record
from csi_driver.engine.state import Vol
from csi_driver.engine.store import Changes, Store

log = logging.getLogger(__name__)


class Engine(Groups, Jobs):
    """One node's FlashCopy engine over a state directory. Thread-safe; one process per state dir."""

    def __init__(self, state_dir: str, *, io: FileIO | None = None, commit_interval: float = 0.05,
                 background: bool = True) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.data_dir = os.path.join(self.state_dir, "volumes")
        self._io = io or FileIO()
        self._commit_interval = commit_interval
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._held = {}
        self._gate = threading.Condition(self._lock)
        self._closed = False
        self._vols = {}
        self._maps = {}
        self._feeds = None
        self._groups = {}
        self._seq = itertools.count(1)
        self._ch = Changes()
        self._copy_dirty = set()
        self._host_dirty = set()
        self._bits_dirty = {}
        self._pending_bytes = 0
        self._last_commit = time.monotonic()
        self._unlink_later = []
        self._stale_files = []
        self.last_start_hold = 0.0
        self._reserve_released = False
        self._reserve_checked = 0.0
        self._files_checked = 0.0
        self._pool = {}
        self._init_bypass()
        os.makedirs(self.data_dir, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # volume data, metadata, staging records: root's only (issue 22)
        self._lockfd = os.open(os.path.join(self.state_dir, "engine.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lockfd)
            raise errors.EngineLocked(f"state dir {self.state_dir} is held by another process") from e
        _raise_fd_limit()
        self._journal = Journal(self._io, self.state_dir)
        try:
            datafiles.check_db(os.path.join(self.state_dir, "meta.db"), self.data_dir)
            try:
                self._store = Store(os.path.join(self.state_dir, "meta.db"))
            except sqlite3.OperationalError:
                # a full state dir: SQLite cannot make its WAL; the space kept for freeing space lets it start
                if not self._release_free_reserve():
                    raise
                self._store = Store(os.path.join(self.state_dir, "meta.db"))
            held = self._journal.open()
            self._journal.replaying = bool(held)  # J3: no commit empties it before the replay is done
            self._load()
            self._replay(held)
            self._ensure_reserve()
        except BaseException:
            self._journal.close()
            os.close(self._lockfd)
            raise
        self._copier: threading.Thread | None = None
        if background:
            self._copier = threading.Thread(target=run_copier, args=(self,), name="flashcopy-copier",
                                            daemon=True)
            self._copier.start()

    @classmethod
    def open(cls, state_dir: str, **kw: Any) -> Engine:
        return cls(state_dir, **kw)

    # ------------------------------------------------------------------ loading and recovery

    def _load(self) -> None:
        nvols = self._load_records()
        # data files against the metadata: nothing deleted, extended or recreated on a guess (datafiles.py)
        intents = self._store.intents()
        datafiles.check_known(self._store.path, self.data_dir, nvols, intents)
        known = {v.file for v in self._vols.values()}
        self._store.clear_intents(datafiles.sort_orphans(self.state_dir, self.data_dir, known, intents))
        for v in self._vols.values():
            self._check_data_file(v)
        # an earlier process may have died with acknowledged writes in the page cache: the next flush syncs them
        self._host_dirty.update(self._vols.values())
        if self._ch:
            self._commit()

    def _check_data_file(self, v: Vol) -> None:
        """Open v's file; a missing or truncated one takes v offline in memory (I/O fails, the condition says
        why) and is left as it is; a longer one is an uncommitted resize, cut back."""
        if v.offline.startswith(datafiles.BROKEN):
            v.offline = ""  # an earlier open's finding, written since by another change: look again
            self._dirty_vol(v)
        why = datafiles.broken_reason(os.path.join(self.data_dir, v.file), v.size)
        if why:
            if v.deleted and not v.downstream:
                return  # nothing reads it: its file goes anyway
            log.error("volume %s is unusable: %s", v.id, why)
            v.offline = why  # in memory only: a restored file serves again on the next open
            return
        fd = self._fd(v)
        if self._io.size(fd) > v.size:
            log.warning("volume %s: data file longer than the volume (an uncommitted resize): cut back", v.id)
            self._io.truncate(fd, v.size)

    def _replay(self, held: list[Record]) -> None:
        """J3: apply the host writes an earlier engine of this boot acknowledged but had not made durable, in
        order, through the normal write path; commit; then drop them. An error here fails the open: a start
        that hid it would hide a loss."""
        if not held:
            return
        applied = 0
        for r in held:
            v = self._vols.get(r.volume_id)
            if v is None or v.deleted or v.offline or r.offset + r.length > v.size:
                # gone or changed since (a delete, offline or shrink commits, emptying the journal first): only a
                # record the commit of that change raced can be here, and the change supersedes it
                log.warning("journal: skipped a %s of %s at %d+%d (volume gone or changed)", r.kind.decode(),
                            r.volume_id, r.offset, r.length)
                continue
            if r.kind == b"W":
                self.write(r.volume_id, r.offset, r.data)
            else:
                self.discard(r.volume_id, r.offset, r.length)
            applied += 1
        self._commit()
        self._journal.replayed()
        log.warning("journal: replayed %d acknowledged host writes an earlier engine process left in memory",
                    applied)

    # ------------------------------------------------------------------ host I/O

    def _io_vol(self, vid: str, offset: int, length: int) -> Vol:
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
            return self._read_range(v, offset, length)

    def write(self, volume_id: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data)
        with self._lock:
            while self._held and volume_id in self._held and not self._closed:
                self._gate.wait()  # a group start holds this source's writes (not yet acknowledged)
            v = self._io_vol(volume_id, offset, len(data))
            if not data:
                return
            if volume_id in self._bypass_vols:
                self._bypass_stale = True  # the bypass left this to us: its grant may widen after the commit
            grain = v.grain
            first, last = offset // grain, (offset + len(data) - 1) // grain
            try:
                if all(self._can_write_in_place(v, g) for g in range(first, last + 1)):
                    self._io.pwrite(self._fd(v), data, offset)  # the common case: one syscall
                    self._host_dirty.add(v)
                else:
                    pos = 0
                    for g in range(first, last + 1):
                        goff = offset + pos - g * grain
                        n = min(grain - goff, len(data) - pos)
                        self._write_grain(v, g, goff, data[pos:pos + n])
                        pos += n
                self._record_held(v, first, last, b"W", offset, data)  # J1: before it is acknowledged
            except errors.NoSpace as e:
                raise errors.NoSpace(f"no space left writing volume {volume_id}: {e}") from e
            self._maybe_commit()

    def discard(self, volume_id: str, offset: int, length: int) -> None:
        """Discard (TRIM): the range reads as zeros; whole grains become holes where no one needs them."""
        with self._lock:
            while self._held and volume_id in self._held and not self._closed:
                self._gate.wait()
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
            if length:
                self._record_held(v, offset // grain, (end - 1) // grain, b"D", offset, length=length)  # J1
            self._maybe_commit()

    def _record_held(self, v: Vol, first: int, last: int, kind: bytes, offset: int,
                     data: memoryview | bytes = b"", length: int | None = None) -> None:
        """J1: journal a host write (or discard) just applied to grains first..last of v unless it is all in
        v's file already. With no room for the record, commit instead: the write is then in the file."""
        if self._in_files(v, first, last):
            return
        try:
            self._journal.append(kind, v.id, offset, data, length)
        except errors.NoSpace:
            self._commit()  # held writes land in their files (space they already own), bits go durable
            if not self._in_files(v, first, last):
                raise

    def _in_files(self, v: Vol, first: int, last: int) -> bool:
        """Is what a host write just did to grains first..last all in v's file, with every bit that makes it
        v's view committed (then it needs no journal record, J1)? Not for a held image (I5), a grain v owns by
        an undurable bit, or one an incremental mapping has not recorded durably."""
        if v.upstream is None and not v.pending and not v.trackers:
            return True  # a volume that is no copy, with nothing held: the common case
        for g in range(first, last + 1):
            if g in v.pending or not v.owns_durably(g):
                return False
            for m in v.trackers:
                if m.diff is not None and not m.diff.durable(g):
                    return False
        return True

    def flush(self, volume_id: str | None = None) -> None:
        """Everything written before the call (to that volume, or to any) survives a crash once it returns."""
        with self._lock:
            self._check_open()
            if volume_id is None:
                self._flush_all()
                return
            v = self._vol(volume_id)
            self._bypass_collect_dirty([v.id])
            self._commit()  # bits and held writes of every volume: one transaction is all there is
            if v in self._host_dirty:
                self._host_dirty.discard(v)
                self._io.fdatasync(self._fd(v))

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

    # ------------------------------------------------------------------ changed-block tracking

    def allocated_extents(self, volume_id: str, *, start: int = 0, limit: int = 0) -> list[tuple[int, int]]:
        """(offset, length) extents, ascending and merged, grain granular, of the grains of volume_id's view that
        hold data: every byte that reads non-zero lies in one; a grain never written is in none. A grain whose
        data is all zeros may be a hole (thin stays thin) and then is not reported: it reads as zeros anyway.

        From the bitmaps (I1: which node serves each grain) and that node's SEEK_DATA extents; no data is read.
        Paged: only extents ending after byte `start` (the one holding it begins at the start of its grain), at
        most `limit` (0 = all); the next page starts at the end of the last extent. OutOfRange for a start
        at or past the volume's end (except 0). NotFound for an unknown id; InvalidState when the volume is
        offline (its data is not available).
        """
        with self._lock:
            v = self._vol(volume_id)
            _check_trackable(v)
            _check_start(v, start)
            return _mask_extents(self._allocated_mask(v), v.grain, v.size, start, limit)

    def delta_extents(self, base_id: str, target_id: str, *, start: int = 0,
                      limit: int = 0) -> list[tuple[int, int]]:
        """(offset, length) extents, ascending and merged, grain granular, covering every byte where target's view
        differs from base's (over target's size; grains past base's end count as changed).

        The grains reported are those owned by a node on the cascade path between the two (`_owned_between`): a
        grain is there only because it was written (or copied on write, filled, cleaned) after base's point in
        time, so no grain served by the same node to both, untouched in between, is reported; the content is
        never compared. Cost: bitmap operations on ints and enumerating the set bits.

        NotFound for an unknown id. InvalidState ("tracking not possible") when base and target share no node of
        a cascade (different cascades; a snapshot split from its chain after a full copy, or whose mapping was
        stopped), when either is offline, when their grain sizes differ, and when base is not older than target
        (`_point_in_time`). Paged as `allocated_extents`, over target's size.
        """
        with self._lock:
            b, t = self._vol(base_id), self._vol(target_id)
            _check_trackable(b)
            _check_trackable(t)
            if b.grain != t.grain:
                raise errors.InvalidState(f"tracking not possible: {b.id} and {t.id} have different grain sizes")
            if self._point_in_time(b) >= self._point_in_time(t):
                raise errors.InvalidState(f"base {b.id} is not older than target {t.id}")
            owned = self._owned_between(b, t)
            if owned is None:
                raise errors.InvalidState(f"tracking not possible: {b.id} and {t.id} share no cascade")
            _check_start(t, start)
            return _mask_extents(owned & ((1 << t.ngrains) - 1), t.grain, t.size, start, limit)

    def _point_in_time(self, v: Vol) -> float:
        """The instant v's data stands for: the start of the mapping that made it a copy (a snapshot or clone);
        now (infinity) for a volume that is no copy, or that a restore made over (it is live)."""
        m = self._incoming(v)
        if m is None or not m.start_time or m.restore:
            return float("inf")
        return m.start_time

    # ------------------------------------------------------------------ background work

    def run_copies(self, budget: int | None = None) -> int:
        """Do background copy/cleaning work now, in the caller's thread (see copier.pump)."""
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

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._bypass_quiet()
            self._bypass_collect_dirty()
            self._bypass_vols.clear()  # no grant comes back: the files close
            failed: Exception | None = None
            try:
                self._flush_all()
            except Exception as e:
                # (a full state dir) the close goes on, so a shutdown does not stop half-way; the caller hears
                # of it below, and what was not made durable is what a crash would leave (the journal has it)
                log.error("engine close: the final flush failed: %s", e)
                failed = e
            self._closed = True
            self._held.clear()
            self._gate.notify_all()
            self._work.notify_all()
        if self._copier is not None:
            self._copier.join(timeout=10)
        with self._lock:
            for v in self._vols.values():
                if v.fd >= 0:
                    self._io.close(v.fd)
                    v.fd = -1
            self._journal.close()
            self._store.close()
            os.close(self._lockfd)
        if failed is not None:
            raise failed

    def abandon(self) -> None:
        """Let go of the state dir as a killed process would: no flush, no commit; the files and the lock close.

        For crash tests (tests/engine/crashsim.py) on an engine opened with background=False.
        """
        with self._lock:
            self._bypass_quiet()
            self._bypass_vols.clear()
            self._closed = True
            self._held.clear()
            self._gate.notify_all()
            for v in [*self._vols.values(), *self._unlink_later, *self._stale_files]:
                if v.fd >= 0:
                    os.close(v.fd)
                    v.fd = -1
            self._journal.close()
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


def _check_trackable(v: Vol) -> None:
    if v.offline:
        raise errors.InvalidState(f"tracking not possible: volume {v.id} is offline: {v.offline}")


def _check_start(v: Vol, start: int) -> None:
    if start < 0 or (start and start >= v.size):
        raise errors.OutOfRange(f"offset {start} is outside volume {v.id} ({v.size} bytes)")


def _mask_extents(mask: int, grain: int, size: int, start: int = 0, limit: int = 0) -> list[tuple[int, int]]:
    """A grain mask as byte extents, merged, clipped to size, from the grain holding `start`, `limit` at most."""
    n = size // grain
    out: list[tuple[int, int]] = []
    for first, count in bit_runs(mask.to_bytes((n + 7) >> 3 or 1, "little"), n, start=start // grain, limit=limit):
        off = first * grain
        out.append((off, min(count * grain, size - off)))
    return out


def _raise_fd_limit() -> None:
    # one data file per volume stays open: 1000 volumes + 1000 snapshots need more than the usual 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
