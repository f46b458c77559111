"""What reaches the disk when: dirty tracking, the commit, held source writes, the metadata reserve.

Invariants kept here:

I4 (durable)    a bit is committed only after the grain data it vouches for is on disk: grains copied or
                filled into a file are recorded in ``_copy_dirty`` (`_store_grain`, `Cascade._copy_grain`);
                `_commit` fdatasyncs those files before the metadata transaction.
I5 (ordering)   data another node's view depends on is never overwritten on disk while the bit that takes the
                dependency away is undurable: such writes wait in ``Vol.pending`` (`Cascade._write_grain`
                decides, with `Cascade._can_write_in_place`); `_commit` writes them only after the bits are
                committed. One fsync pair thus covers every copy-on-write of a commit interval.
I6 (atomic)     each metadata change is one transaction: every row, link and bitmap a change touched is
                recorded in ``_ch`` / ``_bits_dirty`` and `_commit` hands them to `Store.commit` at once.

Held writes and undurable bits live in memory until the commit; the host writes that depend on them are also
in the held-write journal (journal.py, J1-J4), which `_commit` empties once they are in the files, so a new engine
process finds every write an old one acknowledged.

Out of space: the first metadata commit that finds the filesystem full gives up the METADATA_RESERVE file and
retries; from then on copies leave that much space free (`_check_copy_space`) so that state changes (a mapping
going stopped) still commit, and the reserve is taken back once space returns (`_periodic_commit`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable

from csi_driver.engine import errors
from csi_driver.engine.bitmap import Bitmap
from csi_driver.engine.bypass import BypassGrants
from csi_driver.engine.fileio import FileNoSpace
from csi_driver.engine.journal import JOURNAL_LIMIT
from csi_driver.engine.model import GRAIN_SIZES
from csi_driver.engine.state import Group, Map, Vol
from csi_driver.engine.store import Changes, dump_attrs

log = logging.getLogger(__name__)

PENDING_LIMIT = 64 * 1024 * 1024  # held source writes (bytes) before a commit is forced
METADATA_RESERVE = 4 * 1024 * 1024  # disk space held back so metadata commits work on a full filesystem
FREE_RESERVE = 1024 * 1024  # and held back further for deletes, so space can always be freed through the driver
_ZERO = bytes(max(GRAIN_SIZES))


class EngineStats:
    """Plain counters for metrics, attached to an engine by whoever exports them (csi_driver.metrics), updated
    under the engine lock, read without it.

    cow_grains/cow_bytes: grains a host write copied down first (I2, `Cascade._push_down`); commits and
    commit_seconds: `_commit`s that made something durable and the time they took, each also handed to
    on_commit (a histogram's observe).
    """

    __slots__ = ("cow_grains", "cow_bytes", "commits", "commit_seconds", "on_commit")

    def __init__(self, on_commit: Callable[[float], None] | None = None) -> None:
        self.cow_grains = 0
        self.cow_bytes = 0
        self.commits = 0
        self.commit_seconds = 0.0
        self.on_commit = on_commit

    def committed(self, seconds: float) -> None:
        self.commits += 1
        self.commit_seconds += seconds
        if self.on_commit is not None:
            self.on_commit(seconds)


class Durability(BypassGrants):
    """Dirty tracking and the commit (I4-I6). Every method expects the engine lock held."""

    #: counters for metrics; None (nothing counted) until an exporter attaches one
    stats: EngineStats | None = None

    @property
    def held_write_bytes(self) -> int:
        """Bytes of host writes held in memory until the next commit (I5); read without the lock."""
        return self._pending_bytes

    # ------------------------------------------------------------------ dirty tracking

    def _dirty_vol(self, v: Vol) -> None:
        self._ch.volumes[v.id] = (
            v.id, v.seq, v.name, v.size, v.grain, dump_attrs(v.attrs), v.created, int(v.deleted), v.file,
            v.upstream.id if v.upstream else None, v.offline, v.clean_rate,
        )

    def _dirty_map(self, m: Map) -> None:
        self._feeds = None  # a mapping changed: rebuild the target -> mapping index on next use
        self._ch.mappings[m.id] = (
            m.id, m.seq, m.name, m.source, m.target, m.state.value, m.copy_rate, m.clean_rate, m.grain,
            int(m.incremental), int(m.autodelete), m.group_id, m.start_time, m.error, int(m.restore),
            int(m.copied),
        )
        if m.diff is not None:
            self._bits_dirty["d:" + m.id] = (m.diff, m)

    def _dirty_group(self, g: Group) -> None:
        self._ch.groups[g.id] = (g.id, g.seq, g.name, g.start_time)

    def _mark_bit(self, key: str, bm: Bitmap, owner: Vol | Map) -> None:
        self._bits_dirty[key] = (bm, owner)

    def _store_grain(self, v: Vol, g: int, data: bytes | bytearray, *, fd: int | None = None,
                     track: bool = True) -> None:
        """Write a whole grain into v's file; an all-zero grain becomes a hole (thin stays thin).

        track: the grain is a copy or fill that a bit will vouch for, so it must be synced before that bit is
        committed (I4). Held writes that `_commit` lets out pass track=False.
        """
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

    # ------------------------------------------------------------------ commit

    def _commit_data(self) -> None:
        """Commit only if bits or held writes are waiting; metadata rows wait for the caller's commit."""
        ch, self._ch = self._ch, Changes()
        try:
            self._commit()
        finally:
            self._ch = ch

    def _commit(self) -> None:
        """Make every in-memory change durable (I4, I5, I6)."""
        st = self.stats
        t0 = time.perf_counter()
        timed = st is not None and bool(self._copy_dirty or self._bits_dirty or self._ch or self._pending_bytes)
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
                self._io.commit_metadata(self._store, ch)  # I6
            except errors.NoSpace:
                # the space kept for metadata is given up so that state changes (a stopped mapping) still land
                if not self._release_reserve():
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
        self._journal.reset()  # J2: every held write is in its file now, every bit it needed durable
        self._last_commit = time.monotonic()
        if self._bypass_stale:
            self._bypass_regrant()  # new durable bits may widen grants (B3)
        if timed and st is not None:
            st.committed(time.perf_counter() - t0)

    def _maybe_commit(self) -> None:
        """Commit when the held writes reach PENDING_LIMIT (I5 holds them in memory until then), or their
        journal JOURNAL_LIMIT (rewrites of held grains grow it, not the held bytes)."""
        if self._pending_bytes >= PENDING_LIMIT or self._journal.size >= JOURNAL_LIMIT:
            self._commit()

    def _periodic_commit(self) -> None:
        """The copier's tick: take the reserve back once space returned; commit every commit interval."""
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

    def _flush_all(self) -> None:
        """Commit, then fdatasync every file with host writes: everything written so far is durable."""
        self._bypass_collect_dirty()
        self._commit()
        for v in list(self._host_dirty):
            if v.fd >= 0:
                self._io.fdatasync(v.fd)
        self._host_dirty.clear()

    # ------------------------------------------------------------------ metadata reserve

    def _reserve_path(self, name: str = "metadata.reserve") -> str:
        return os.path.join(self.state_dir, name)

    def _ensure_reserve(self) -> None:
        """Keep FREE_RESERVE bytes for changes that free space (deletes: `_release_free_reserve`) and
        METADATA_RESERVE bytes for any metadata commit, freed when the filesystem fills up. Called at open too:
        one that cannot be made there (a full state dir) counts as released, so copies leave space for
        metadata and the copier's tick makes it once space returns."""
        made = True
        for name, size in (("free.reserve", FREE_RESERVE), ("metadata.reserve", METADATA_RESERVE)):
            made = _hold(self._reserve_path(name), size) and made
        self._reserve_released = not made

    def _release_reserve(self) -> bool:
        path = self._reserve_path()
        if not os.path.exists(path) or os.stat(path).st_size == 0:
            return False
        log.warning("state dir %s is full: releasing the metadata reserve", self.state_dir)
        os.truncate(path, 0)
        self._reserve_released = True
        return True

    def _release_free_reserve(self) -> bool:
        """The last space, for a change that frees space (a delete) on a full state dir."""
        path = self._reserve_path("free.reserve")
        if not os.path.exists(path) or os.stat(path).st_size == 0:
            return False
        log.warning("state dir %s is full: releasing the reserve kept for deletes", self.state_dir)
        os.truncate(path, 0)
        self._reserve_released = True  # the copier's tick makes both again once space returns
        return True

    def _check_copy_space(self) -> None:
        """Once the metadata reserve is given up, copies must leave its worth of space for metadata commits."""
        if self._reserve_released:
            st = os.statvfs(self.state_dir)
            if st.f_bavail * st.f_frsize < METADATA_RESERVE:
                raise FileNoSpace("No space left on device (kept for metadata)", errno.ENOSPC)


def _hold(path: str, size: int) -> bool:
    """path holds size bytes of allocated space (made now if it can be). False when the filesystem is full."""
    with contextlib.suppress(OSError):
        if os.path.exists(path) and os.stat(path).st_blocks * 512 >= size:
            return True
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            return True
        except OSError:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    return False
