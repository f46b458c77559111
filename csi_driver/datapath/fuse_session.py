"""One FUSE connection: mount it (mount(2) on a /dev/fuse descriptor), run its request loop, hand it over.

The loop is the compiled one (`_fuseloop.Loop`: worker threads, a fast path for granted grains) when the
extension was built, else `PyLoop` (threads in Python, every request through the handler). Both take the
same handler: a callable from one whole request (bytes) to its whole reply (bytes), or None for no reply.

A connection outlives the process that serves it when another process holds its descriptor (the FUSE keeper,
csi_driver.datapath.fuse_keeper): requests then wait in the kernel until a successor takes the descriptor
(`adopt`) and asks the kernel to send again what was read and never answered (`fuse_wire.notify_resend`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

Handler = Callable[[bytes], bytes | None]

MS_NOSUID, MS_NODEV = 2, 4

try:
    from csi_driver.datapath import _fuseloop  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the Python loop serves every request
    _fuseloop = None

#: the compiled fast path is available (the engine's bypass grants can be served)
FAST = _fuseloop is not None


class RequestLoop(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def alive(self) -> bool: ...
    def grant(self, node: int, fd: int, size: int, grain: int, read: bytes, write: bytes) -> None: ...
    def revoke(self, node: int) -> None: ...
    def unread(self, node: int, grain: int) -> None: ...
    def take_dirty(self, node: int) -> bool: ...
    def counters(self) -> dict[str, Any]: ...


class PyLoop:
    """Worker threads reading the descriptor and calling the handler; no fast path (grants are refused)."""

    def __init__(self, fd: int, handler: Handler, bufsize: int, threads: int = 4) -> None:
        self.fd, self.handler, self.bufsize, self.nthreads = fd, handler, bufsize, threads
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._error = 0

    def start(self) -> None:
        os.set_blocking(self.fd, False)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._work, name=f"fuse-{i}", daemon=True)
                         for i in range(self.nthreads)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        import select

        p = select.poll()
        p.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if not p.poll(100):
                continue
            try:
                req = os.read(self.fd, self.bufsize)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT):
                    continue
                self._error = e.errno or errno.EIO  # ENODEV: unmounted or aborted
                return
            rep = self.handler(req)
            if rep is not None:
                try:
                    os.write(self.fd, rep)
                except OSError as e:  # ENOENT: interrupted meanwhile
                    if e.errno != errno.ENOENT:
                        log.warning("FUSE reply failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads = []

    def alive(self) -> bool:
        return bool(self._threads) and self._error == 0

    def grant(self, node: int, fd: int, size: int, grain: int, read: bytes, write: bytes) -> None:
        raise NotImplementedError("the Python loop has no fast path")

    def revoke(self, node: int) -> None:
        return None

    def unread(self, node: int, grain: int) -> None:
        return None

    def take_dirty(self, node: int) -> bool:
        return False

    def counters(self) -> dict[str, Any]:
        return {}


def new_loop(fd: int, handler: Handler, bufsize: int, threads: int, *, fast: bool = True) -> RequestLoop:
    if fast and _fuseloop is not None:
        loop: RequestLoop = _fuseloop.Loop(fd, handler, bufsize, threads)
        return loop
    return PyLoop(fd, handler, bufsize, threads)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def mount(mount_point: str, *, fsname: str, subtype: str, max_read: int) -> int:
    """Open /dev/fuse and mount a FUSE filesystem on mount_point served through it; returns the descriptor.

    allow_other: the loop devices and the kernel's own users open the files; default_permissions: the kernel
    checks modes, so the handler never has to.
    """
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = (f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},allow_other,"
            f"default_permissions,max_read={max_read}")
    libc = _libc()
    rc = libc.mount(fsname.encode(), mount_point.encode(), f"fuse.{subtype}".encode(),
                    ctypes.c_ulong(MS_NOSUID | MS_NODEV), opts.encode())
    if rc != 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount FUSE at {mount_point}: {os.strerror(e)}")
    return fd


def mount_dev(mount_point: str) -> str | None:
    """major:minor of the FUSE mount at mount_point from /proc/self/mountinfo (no request to the mount itself,
    which would block while nobody serves it), or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            path = parts[4].replace("\\040", " ")
            if path == mount_point and parts[sep + 1].startswith("fuse"):
                found = parts[2]  # the last one stacked there wins
    return found
