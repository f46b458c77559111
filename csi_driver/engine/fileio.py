"""The engine's only door to data files. Tests swap it for a fault-injecting or power-loss-simulating one.

Every call raises engine errors, never a raw OSError for a full or too small filesystem: ENOSPC and EDQUOT
become `FileNoSpace` (an errors.NoSpace), EFBIG becomes `FileTooLarge` (an errors.OutOfRange); each keeps the
errno as its `errno` attribute and the OSError as its ``__cause__``. Other OSErrors (EIO, ...) pass unchanged.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from csi_driver.engine import errors

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_fallocate: Callable[[int, int, int, int], int] | None
_sync_file_range: Callable[[int, int, int, int], int] | None
try:  # os.posix_fallocate cannot punch; use the libc call through ctypes once
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    _fallocate.restype = ctypes.c_int
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _fallocate = None
    _sync_file_range = None

SYNC_FILE_RANGE_WRITE = 0x02
# Streaming writes start their writeback every WRITEBACK_CHUNK bytes so dirty pages never pile up: a large dirty
# backlog is throttled by the kernel and allocated late (fresh space ran at a quarter of O_DIRECT's speed).
WRITEBACK_CHUNK = 8 << 20
STREAM_WRITE = 256 << 10  # only writes this large count; small random writes keep plain write-back

NOSPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class FileNoSpace(errors.NoSpace):
    """The state directory's filesystem is full (or over quota). The message is the OSError's strerror."""

    def __init__(self, message: str, errno_: int = errno.ENOSPC) -> None:
        super().__init__(message)
        self.errno = errno_


class FileTooLarge(errors.OutOfRange):
    """A file offset or size larger than the state directory's filesystem allows (EFBIG)."""

    def __init__(self, message: str = "larger than the state directory's filesystem allows",
                 errno_: int = errno.EFBIG) -> None:
        super().__init__(message)
        self.errno = errno_


def engine_error(e: OSError) -> errors.EngineError | None:
    """The engine error an OSError from file I/O stands for, or None when it stays an OSError."""
    if e.errno in NOSPACE_ERRNOS:
        return FileNoSpace(e.strerror or os.strerror(e.errno), e.errno)
    if e.errno == errno.EFBIG:
        return FileTooLarge()
    return None


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _engine_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn fn's ENOSPC/EDQUOT/EFBIG OSErrors into engine errors (a try costs nothing until it raises)."""

    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            err = engine_error(e)
            if err is None:
                raise
            raise err from e

    call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return call


class FileIO:
    """Positional I/O on data files. Every method is a single syscall (or close to it)."""

    def __init__(self) -> None:
        #: fd -> (low, high, bytes) of large writes since writeback was last started
        self._streamed: dict[int, tuple[int, int, int]] = {}
        #: the kernel's id of this boot: the held-write journal is replayed only within one boot (journal.J4)
        self.boot_id = read_boot_id()

    @_engine_errors
    def open(self, path: str, *, create: bool = False) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        # No readahead: requests arrive whole (up to 1 MiB from the loop device), and readahead fills the page
        # cache with large folios, into which every later 4 KiB write dirties (and writes back) a whole folio:
        # random writes after a sequential read pass measured 12 k IOPS with readahead, 88 k without, and cold
        # sequential reads got faster, not slower (docs/datapath.md)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def close(self, fd: int) -> None:
        self._streamed.pop(fd, None)
        os.close(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) < length:
            # sizes are durable before a commit names them (state._create_file, resize): a short file was cut
            # under the engine, and zeros here would be served as the volume's data
            raise OSError(errno.EIO, f"data file ends at {offset + len(data)}, short of {offset + length} "
                                     "(truncated under the engine?)")
        return data

    @_engine_errors
    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int, *, stream: bool = True) -> None:
        """All of data at offset. stream=False: never start writeback (a scratch file whose pages should be
        dropped before they ever reach the disk, the held-write journal)."""
        view = memoryview(data)
        start, length = offset, len(view)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
        if stream and length >= STREAM_WRITE and _sync_file_range is not None:
            self._start_writeback(fd, start, length)

    def _start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Start (never wait for) writeback of what streamed into fd. Durability is unchanged: fdatasync still
        makes the data durable and reports its errors (SYNC_FILE_RANGE_WRITE alone neither waits nor consumes
        the file's writeback error)."""
        low, high, n = self._streamed.get(fd, (offset, offset, 0))
        low, high, n = min(low, offset), max(high, offset + length), n + length
        if n < WRITEBACK_CHUNK:
            self._streamed[fd] = (low, high, n)
            return
        self._streamed.pop(fd, None)
        assert _sync_file_range is not None  # pwrite calls this only when it is there
        _sync_file_range(fd, low, high - low, SYNC_FILE_RANGE_WRITE)

    @_engine_errors
    def punch(self, fd: int, offset: int, length: int) -> None:
        if _fallocate is None or length <= 0:
            self.pwrite(fd, bytes(length), offset)
            return
        if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                self.pwrite(fd, bytes(length), offset)
                return
            raise OSError(err, os.strerror(err))

    @_engine_errors
    def copy(self, src_fd: int, dst_fd: int, length: int, src_off: int, dst_off: int) -> None:
        """Copy a range between files in the kernel (copy_file_range), falling back to read+write."""
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
                if n == 0:  # source shorter than the range: the rest is zeros
                    self.punch(dst_fd, dst_off + done, length - done)
                    return
                done += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            data = os.pread(src_fd, length - done, src_off + done)  # short: the rest is zeros, as above
            self.pwrite(dst_fd, data + bytes(length - done - len(data)), dst_off + done)

    def is_hole(self, fd: int, offset: int, length: int) -> bool:
        """True when [offset, offset+length) holds no data (reads as zeros without reading)."""
        try:
            nxt = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset
                return True
            raise
        return nxt >= offset + length

    def data_extents(self, fd: int, offset: int, length: int) -> list[tuple[int, int]]:
        """The (offset, length) extents of [offset, offset+length) that hold data (SEEK_DATA/SEEK_HOLE), at the
        file system's block granularity; the whole range when the file system cannot tell."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after pos
                        break
                    raise
                if start >= end:
                    break
                stop = min(end, os.lseek(fd, start, os.SEEK_HOLE))
                out.append((start, stop - start))
                pos = stop
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                return [(offset, length)] if length else []
            raise
        return out

    @_engine_errors
    def commit_metadata(self, store: Any, changes: Any) -> None:
        """One metadata transaction (routed here so tests can crash the engine at this point too)."""
        store.commit(changes)

    @_engine_errors
    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    @_engine_errors
    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def allocated(self, fd: int) -> int:
        return os.fstat(fd).st_blocks * 512


def read_boot_id() -> str:
    """The kernel's id of this boot ('' where it cannot be read: then no journal is ever replayed)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
