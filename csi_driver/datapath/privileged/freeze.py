"""Filesystem freeze (FIFREEZE/FITHAW ioctls): `frozen()` holds a set of filesystems frozen for a body, always
thaws, and thaws early from a watchdog if the body overruns, so an application is never left blocked."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator, Sequence

from csi_driver.datapath.privileged.errors import DeviceBusy, FreezeTimeout

log = logging.getLogger("csi_driver.datapath.privileged")

FREEZE_MAX_SECONDS = 10.0
# linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int)
_FIFREEZE = 0xC0045877
_FITHAW = 0xC0045878


def freeze(mount_point: str) -> None:
    """FIFREEZE: flush the filesystem and block new writes until thaw.

    DeviceBusy (FAILED_PRECONDITION) if it is frozen already (EBUSY: someone else holds a freeze); other
    failures (EOPNOTSUPP for a filesystem without freeze support, EPERM) stay the OSError the ioctl raised.
    """
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _FIFREEZE, 0)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusy(["ioctl", "FIFREEZE", mount_point], None, "", e.strerror or "",
                             "already frozen") from e
        raise
    finally:
        os.close(fd)


def thaw(mount_point: str) -> bool:
    """FITHAW; False if it was not frozen (EINVAL), so thawing twice is harmless."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _FITHAW, 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def frozen(mount_points: Sequence[str], *, max_seconds: float = FREEZE_MAX_SECONDS) -> Iterator[None]:
    """Freeze every mount point for the body; always thaw, on error too, and after max_seconds at the latest.

    The watchdog thaws if the body overruns, so an application is never left blocked by a stuck caller.
    """
    done: list[str] = []
    lock = threading.Lock()
    released = threading.Event()

    def thaw_all() -> None:
        with lock:
            if released.is_set():
                return
            released.set()
            for mp in reversed(done):
                try:
                    thaw(mp)
                except OSError as e:
                    log.error("thaw %s failed: %s", mp, e)

    watchdog = threading.Timer(max_seconds, thaw_all)
    watchdog.daemon = True
    watchdog.start()
    try:
        for mp in mount_points:
            with lock:
                if released.is_set():
                    raise FreezeTimeout(f"freeze did not complete within {max_seconds}s")
                # record before the call so a freeze that completes is always thawed
                done.append(mp)
            try:
                freeze(mp)
            except (OSError, DeviceBusy):
                # the open or the ioctl failed, so this filesystem is not frozen by us (with EBUSY it is someone
                # else's freeze): do not thaw it. Anything else (an interrupt) may come after a freeze: thaw.
                with lock:
                    if not released.is_set():
                        done.remove(mp)
                raise
        yield
        if released.is_set():
            raise FreezeTimeout(f"freeze window exceeded {max_seconds}s; filesystems were thawed early")
    finally:
        watchdog.cancel()
        thaw_all()
