"""FUSE export: each staged volume appears as one regular file whose I/O goes to a block target.

One FUSE mount per node engine process (a directory under the state dir); `add`/`remove` make volume files
appear and vanish. A loop device with direct I/O sits on each file, so the kernel keeps no second page cache
and every block request becomes one FUSE request:

- read/write     -> target.read / target.write (1 MiB requests: max_write/max_read raised from 128 KiB)
- fsync          -> target.flush (a filesystem's flush or the device's FLUSH reaches the engine)
- fallocate      -> PUNCH_HOLE / ZERO_RANGE -> target.discard (loop turns DISCARD/WRITE_ZEROES into these)

Binding: mfusepy (ctypes over libfuse3's high-level API, multithreaded loop). pyfuse3 was ruled out because
it has no fallocate handler, so discard could never reach the engine; mfusepy measured well above the bench
target (see docs/datapath.md).

Every read, write, fsync and fallocate request is counted and timed in `FuseExport.stats` (a `Timings`: plain
numbers under one lock, about 0.4 us a request); csi_driver.metrics shows them to Prometheus (docs/metrics.md).
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import stat
import threading
import time
from typing import Any, Protocol, runtime_checkable

from csi_driver.datapath import privileged

log = logging.getLogger(__name__)

IO_SIZE = 1 << 20  # max FUSE read/write request, the largest the kernel accepts (256 pages)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

#: latency bucket bounds (seconds) of FUSE requests, 10 us to 1 s
FUSE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
FUSE_OPS = ("read", "write", "fsync", "fallocate")
_now = time.perf_counter


class Series:
    """One key's numbers in a `Timings`: requests, failures, bytes, seconds, and requests per latency bucket."""

    __slots__ = ("bounds", "count", "errors", "bytes", "seconds", "buckets", "_lock")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.count = 0
        self.errors = 0
        self.bytes = 0
        self.seconds = 0.0
        #: requests per bucket, not cumulative; the last one counts those above every bound
        self.buckets = [0] * (len(bounds) + 1)
        self._lock = threading.Lock()

    def observe(self, seconds: float, nbytes: int = 0) -> None:
        i = bisect.bisect_left(self.bounds, seconds)  # the first bucket whose bound is >= seconds (le)
        with self._lock:
            self.count += 1
            self.seconds += seconds
            self.bytes += nbytes
            self.buckets[i] += 1

    def failed(self, seconds: float) -> None:
        """A request that failed: counted and timed like the others, and as an error."""
        self.observe(seconds)
        with self._lock:
            self.errors += 1

    def copy(self) -> Series:
        c = Series(self.bounds)
        with self._lock:
            c.count, c.errors, c.bytes, c.seconds = self.count, self.errors, self.bytes, self.seconds
            c.buckets = list(self.buckets)
        return c


class Timings:
    """Counts, bytes and a latency histogram per key (a FUSE op, a freeze), cheap enough for the I/O path.

    Plain numbers under a lock, so the data path needs no metrics library; csi_driver.metrics reads
    `snapshot()` at scrape time. Callers on a hot path keep the `series(key)` they observe into.
    """

    __slots__ = ("bounds", "_lock", "_series")

    def __init__(self, bounds: tuple[float, ...], keys: tuple[str, ...] = ()) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        self._series: dict[str, Series] = {k: Series(bounds) for k in keys}

    def series(self, key: str) -> Series:
        with self._lock:
            s = self._series.get(key)
            if s is None:
                s = self._series[key] = Series(self.bounds)
            return s

    def observe(self, key: str, seconds: float, nbytes: int = 0) -> None:
        self.series(key).observe(seconds, nbytes)

    def snapshot(self) -> dict[str, Series]:
        """A copy of every key's numbers (each key's own numbers consistent)."""
        with self._lock:
            items = list(self._series.items())
        return {k: s.copy() for k, s in items}


@runtime_checkable
class BlockTarget(Protocol):
    """What a FUSE export file reads and writes: the engine volume (or, in unit tests, a plain file)."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...


class EngineVolume:
    """Adapter: one engine volume as a BlockTarget."""

    def __init__(self, engine: Any, volume_id: str):
        self.engine = engine
        self.volume_id = volume_id

    @property
    def size(self) -> int:
        return int(self.engine.get_volume(self.volume_id).size)

    def read(self, offset: int, length: int) -> bytes:
        data: bytes = self.engine.read(self.volume_id, offset, length)
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.engine.write(self.volume_id, offset, data)

    def flush(self) -> None:
        self.engine.flush(self.volume_id)

    def discard(self, offset: int, length: int) -> None:
        self.engine.discard(self.volume_id, offset, length)


class _Entry:
    __slots__ = ("name", "target", "read_only", "size", "opens")

    def __init__(self, name: str, target: BlockTarget, read_only: bool):
        self.name = name
        self.target = target
        self.read_only = read_only
        self.size = target.size
        self.opens = 0


def _import_mfusepy() -> Any:
    import mfusepy

    return mfusepy


class FuseExport:
    """One FUSE mount serving a flat directory of volume files.

    Thread-safe. `start()` mounts (removing a dead mount left by a crashed predecessor first), `stop()`
    unmounts; files are added and removed while mounted. `runner` runs the umount commands (None: the real one).
    """

    def __init__(self, mount_point: str, *, fsname: str = "flashcopy", runner: privileged.Runner | None = None):
        self.mount_point = os.path.abspath(mount_point)
        self.fsname = fsname
        self.runner = runner
        self._entries: dict[str, _Entry] = {}
        self._handles: dict[int, _Entry] = {}
        self._fh = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._mounted = threading.Event()
        #: read/write/fsync/fallocate requests: count, bytes, latency (csi_driver.metrics exports them)
        self.stats = Timings(FUSE_BUCKETS, FUSE_OPS)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        # first: a dead mount makes the directory unusable (ENOTCONN)
        clear_stale_mount(self.mount_point, runner=self.runner)
        os.makedirs(self.mount_point, exist_ok=True)
        self._thread = threading.Thread(target=self._serve, name=f"fuse:{self.mount_point}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._error is not None:
                raise RuntimeError(f"FUSE mount at {self.mount_point} failed: {self._error}")
            if any(m.fstype.startswith("fuse") for m in privileged.mounts_at(self.mount_point)):
                self._mounted.set()
                return
            if not self._thread.is_alive():
                break
            time.sleep(0.01)
        raise RuntimeError(f"FUSE mount at {self.mount_point} did not appear (error: {self._error})")

    def _serve(self) -> None:
        mfusepy = _import_mfusepy()
        try:
            mfusepy.FUSE(
                _Ops(self, mfusepy),
                self.mount_point,
                foreground=True,
                fsname=self.fsname,
                subtype="flashcopy",
                max_read=IO_SIZE,
                default_permissions=True,
            )
        except BaseException as e:  # reported to start(); the thread ends either way
            self._error = e
            log.error("FUSE loop at %s ended: %s", self.mount_point, e)

    def stop(self, timeout: float = 10.0) -> None:
        """Unmount (lazily if a straggler still holds a file) and wait for the FUSE loop to end."""
        if self._thread is None:
            return
        try:
            privileged.umount(self.mount_point, runner=self.runner)
        except privileged.CommandError:  # DeviceBusy among them: a straggler holds a file
            privileged.umount(self.mount_point, lazy=True, runner=self.runner)
        self._thread.join(timeout)
        self._thread = None
        self._mounted.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ exports

    def path(self, name: str) -> str:
        return os.path.join(self.mount_point, name)

    def add(self, name: str, target: BlockTarget, *, read_only: bool = False) -> str:
        """Export target as <mount>/<name>; re-adding the same name replaces the target. Returns the path.

        A re-add (an idempotent stage) updates the entry in place: the loop device's open handle on the file
        must keep working, and handles of a replaced entry fail with EIO.
        """
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad export name {name!r}")
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                self._entries[name] = _Entry(name, target, read_only)
            else:
                entry.target, entry.read_only, entry.size = target, read_only, target.size
        return self.path(name)

    def remove(self, name: str) -> bool:
        with self._lock:
            return self._entries.pop(name, None) is not None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def refresh_size(self, name: str) -> int:
        """Re-read the target's size (after the engine grew the volume) and let the kernel see it."""
        with self._lock:
            entry = self._entries[name]
            entry.size = entry.target.size
        # attr_timeout is 0, so this stat makes the kernel fetch the new size (loop reads the inode's size)
        os.stat(self.path(name))
        return entry.size

    def _entry(self, path: str | None, fh: int | None) -> _Entry:
        with self._lock:
            if fh:
                e = self._handles.get(fh)
                if e is not None:
                    return e
            if path:
                e = self._entries.get(path.lstrip("/"))
                if e is not None:
                    return e
        raise OSError(errno.ENOENT, "no such export")


def clear_stale_mount(mount_point: str, *, runner: privileged.Runner | None = None) -> None:
    """Lazily unmount a FUSE mount left at mount_point by a dead engine process (its files give ENOTCONN).

    Loop devices still attached to its files keep the dead connection alive until they are detached;
    the lazy unmount only frees the directory for the new mount.
    """
    for m in reversed(privileged.mounts_at(mount_point)):
        if m.fstype.startswith("fuse"):
            log.warning("removing stale FUSE mount at %s (%s)", mount_point, m.source)
            privileged.umount(mount_point, lazy=True, runner=runner)


class _Ops:
    """libfuse high-level callbacks (mfusepy). Every error becomes an errno; engine failures are EIO."""

    use_ns = True
    flag_nullpath_ok = True
    flag_nopath = True

    def __init__(self, export: FuseExport, mfusepy: Any):
        self.x = export
        self.FuseOSError = mfusepy.FuseOSError
        self.start_time = time.time_ns()
        st = export.stats
        self._read_s, self._write_s = st.series("read"), st.series("write")
        self._fsync_s, self._fallocate_s = st.series("fsync"), st.series("fallocate")

    def _err(self, code: int) -> Exception:
        err: Exception = self.FuseOSError(code)
        return err

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            conn.max_write = IO_SIZE
            conn.max_read = IO_SIZE
            conn.max_readahead = IO_SIZE
        if config is not None:
            # sizes change on expand: never cache attributes; and never cache file data in the kernel,
            # so a restore or a write through another path is seen at once
            config.attr_timeout = 0.0
            config.entry_timeout = 0.0
            config.negative_timeout = 0.0
            config.direct_io = 1
            config.kernel_cache = 0
            config.hard_remove = 1
            if hasattr(config, "nullpath_ok"):
                config.nullpath_ok = 1

    def destroy(self, path: str) -> None:
        return None

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        if path == "/" and not fh:
            n = len(self.x.names())
            return dict(st_mode=stat.S_IFDIR | 0o750, st_nlink=2 + n, st_mtime=self.start_time)
        try:
            e = self.x._entry(path, fh)
        except OSError as ex:
            raise self._err(errno.ENOENT) from ex
        mode = 0o400 if e.read_only else 0o600
        return dict(
            st_mode=stat.S_IFREG | mode,
            st_nlink=1,
            st_size=e.size,
            st_blocks=(e.size + 511) // 512,
            st_blksize=4096,
            st_mtime=self.start_time,
            st_ctime=self.start_time,
        )

    def readdir(self, path: str | None, fh: int) -> list[str]:
        return [".", "..", *self.x.names()]

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str | None, fh: int) -> int:
        return 0

    def open(self, path: str, flags: int) -> int:
        try:
            e = self.x._entry(path, None)
        except OSError as ex:
            raise self._err(errno.ENOENT) from ex
        if e.read_only and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise self._err(errno.EROFS)
        with self.x._lock:
            fh = next(self.x._fh)
            self.x._handles[fh] = e
            e.opens += 1
        return fh

    def release(self, path: str | None, fh: int) -> int:
        with self.x._lock:
            e = self.x._handles.pop(fh, None)
            if e is not None:
                e.opens -= 1
        return 0

    def _live(self, path: str | None, fh: int) -> _Entry:
        try:
            e = self.x._entry(None, fh) if fh else self.x._entry(path, None)
        except OSError as ex:
            raise self._err(errno.EIO) from ex
        with self.x._lock:
            # an export removed while a handle is still open must not reach the engine any more
            if self.x._entries.get(e.name) is not e:
                raise self._err(errno.EIO)
        return e

    # The four I/O requests are timed: the handler proper is the _-prefixed method.

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        t0 = _now()
        try:
            data = self._read(path, size, offset, fh)
        except BaseException:
            self._read_s.failed(_now() - t0)
            raise
        self._read_s.observe(_now() - t0, len(data))
        return data

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        t0 = _now()
        try:
            n = self._write(path, data, offset, fh)
        except BaseException:
            self._write_s.failed(_now() - t0)
            raise
        self._write_s.observe(_now() - t0, n)
        return n

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        t0 = _now()
        try:
            r = self._fsync(path, datasync, fh)
        except BaseException:
            self._fsync_s.failed(_now() - t0)
            raise
        self._fsync_s.observe(_now() - t0)
        return r

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        t0 = _now()
        try:
            r = self._fallocate(path, mode, offset, size, fh)
        except BaseException:
            self._fallocate_s.failed(_now() - t0)
            raise
        self._fallocate_s.observe(_now() - t0, size)
        return r

    def _read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        e = self._live(path, fh)
        if offset >= e.size:
            return b""
        size = min(size, e.size - offset)
        try:
            return e.target.read(offset, size)
        except Exception as ex:
            log.error("read %s @%d+%d failed: %s", e.name, offset, size, ex)
            raise self._err(errno.EIO) from ex

    def _write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        e = self._live(path, fh)
        if e.read_only:
            raise self._err(errno.EROFS)
        if offset + len(data) > e.size:
            raise self._err(errno.ENOSPC)
        try:
            e.target.write(offset, data)
        except Exception as ex:
            log.error("write %s @%d+%d failed: %s", e.name, offset, len(data), ex)
            raise self._err(errno.EIO) from ex
        return len(data)

    def _fsync(self, path: str | None, datasync: int, fh: int) -> int:
        e = self._live(path, fh)
        try:
            e.target.flush()
        except Exception as ex:
            log.error("flush %s failed: %s", e.name, ex)
            raise self._err(errno.EIO) from ex
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        # close(): nothing buffered here; durability is fsync's job
        return 0

    def _fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        e = self._live(path, fh)
        if e.read_only:
            raise self._err(errno.EROFS)
        if mode & (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_ZERO_RANGE):
            end = min(offset + size, e.size)
            if end <= offset:
                return 0
            try:
                # discarded ranges read back as zeros, which is what both modes promise
                e.target.discard(offset, end - offset)
            except Exception as ex:
                log.error("discard %s @%d+%d failed: %s", e.name, offset, size, ex)
                raise self._err(errno.EIO) from ex
            return 0
        if mode & ~_FALLOC_FL_KEEP_SIZE == 0:
            if offset + size > e.size and not mode & _FALLOC_FL_KEEP_SIZE:
                raise self._err(errno.EFBIG)
            return 0  # preallocation: the volume size is fixed, nothing to do
        raise self._err(errno.EOPNOTSUPP)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        e = self._live(path, fh or 0)
        if length != e.size:
            raise self._err(errno.EPERM)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return dict(f_bsize=4096, f_frsize=4096, f_blocks=0, f_bfree=0, f_bavail=0, f_namemax=255)
