"""Crash simulation for the engine: stop it dead at the N-th I/O call, optionally losing unsynced writes.

`CrashIO` counts every call that changes disk state (pwrite, punch, copy, truncate, fdatasync, metadata commit)
and raises `Crash` at a chosen one, before it happens. It also keeps an undo log of writes not yet covered by an
fdatasync, so `power_loss()` can put every data file back to what a power cut would leave: the synced image,
plus an optional random subset of the unsynced writes (drives may persist any of them).
"""

from __future__ import annotations

import os
import random
from typing import Any

from csi_driver.engine import Engine
from csi_driver.engine.fileio import FileIO


class Crash(BaseException):
    """The simulated instant the process died (BaseException so engine cleanup code does not swallow it)."""


class CrashIO(FileIO):
    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.crash_at = crash_at
        self.calls = 0
        self.paths: dict[int, str] = {}
        #: path -> list of (offset, old bytes, new bytes | None for a size change)
        self.unsynced: dict[str, list[tuple[str, int, bytes, bytes]]] = {}

    def _tick(self) -> None:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise Crash(f"crash at I/O call {self.calls}")

    def open(self, path: str, *, create: bool = False) -> int:
        fd = super().open(path, create=create)
        self.paths[fd] = path
        return fd

    def _record_range(self, fd: int, offset: int, length: int, apply: Any) -> None:
        path = self.paths[fd]
        size = os.fstat(fd).st_size
        old = os.pread(fd, length, offset)
        apply()
        new = os.pread(fd, length, offset)
        self.unsynced.setdefault(path, []).append(("range", offset, old, new))
        if os.fstat(fd).st_size != size:
            self.unsynced[path].append(("size", size, b"", str(os.fstat(fd).st_size).encode()))

    def pwrite(self, fd: int, data: Any, offset: int, *, stream: bool = True) -> None:
        self._tick()
        self._record_range(fd, offset, len(data), lambda: FileIO.pwrite(self, fd, data, offset, stream=stream))

    def punch(self, fd: int, offset: int, length: int) -> None:
        self._tick()
        self._record_range(fd, offset, length, lambda: FileIO.punch(self, fd, offset, length))

    def copy(self, src_fd: int, dst_fd: int, length: int, src_off: int, dst_off: int) -> None:
        self._tick()
        self._record_range(dst_fd, dst_off, length,
                           lambda: FileIO.copy(self, src_fd, dst_fd, length, src_off, dst_off))

    def truncate(self, fd: int, size: int) -> None:
        self._tick()
        path = self.paths[fd]
        old_size = os.fstat(fd).st_size
        tail = os.pread(fd, max(0, old_size - size), size) if size < old_size else b""
        super().truncate(fd, size)
        self.unsynced.setdefault(path, []).append(("trunc", old_size, tail, str(size).encode()))

    def fdatasync(self, fd: int) -> None:
        self._tick()
        super().fdatasync(fd)
        path = self.paths.get(fd) or os.readlink(f"/proc/self/fd/{fd}")  # dup'ed fds sync the same file
        self.unsynced.pop(path, None)

    def commit_metadata(self, store: Any, changes: Any) -> None:
        self._tick()
        super().commit_metadata(store, changes)

    def power_loss(self, rng: random.Random | None = None) -> int:
        """Undo unsynced writes (all, or all but a random subset re-applied in order). Returns how many dropped."""
        dropped = 0
        for path, log in self.unsynced.items():
            if not os.path.exists(path):
                continue
            keep = [rng.random() < 0.5 for _ in log] if rng else [False] * len(log)
            fd = os.open(path, os.O_RDWR)
            try:
                for kind, a, old, new in reversed(log):
                    if kind == "range":
                        os.pwrite(fd, old, a)
                    elif kind == "size":
                        os.ftruncate(fd, a)
                    else:  # trunc: restore old size and the cut-off tail
                        os.ftruncate(fd, a)
                        if old:
                            os.pwrite(fd, old, int(new))
                for k, (kind, a, _old, new) in zip(keep, log):
                    if not k:
                        dropped += 1
                        continue
                    if kind == "range":
                        os.pwrite(fd, new, a)
                    elif kind in ("size", "trunc"):
                        os.ftruncate(fd, int(new))
            finally:
                os.close(fd)
        self.unsynced.clear()
        return dropped


def abandon(eng: Engine) -> None:
    """Drop an engine as a killed process would: no flush, no commit; the kernel closes its files."""
    eng.abandon()
