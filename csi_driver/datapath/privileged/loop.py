"""Loop devices: attach (atomically, `losetup --find --show`), detach, list and find (from sysfs), refresh capacity.

Nothing here asks every loop device anything: `losetup -j`/`-a` query each device's status, which stats its
backing file, and that blocks for as long as the file's FUSE export is paused (an engine restart under the FUSE
keeper), so one paused device would stall every stage on the node. sysfs names each backing file without
touching it.
"""

from __future__ import annotations

import dataclasses
import os
import time

from csi_driver.datapath.privileged.errors import CommandError
from csi_driver.datapath.privileged.runner import Runner, run_busy_from_stderr

LOSETUP_TIMEOUT = 60.0
#: sysfs block directory (a module global, so tests can point it at a fake tree)
SYS_BLOCK = "/sys/block"
DEVICE_NODE_WAIT = 1.0  # without udev (containers) the device node losetup made may appear a moment later
DETACH_RETRY_SECONDS = 5.0  # the kernel may hold a just-released device briefly
AUTOCLEAR_WAIT = 1.0  # losetup -d on a busy device only sets autoclear: the backing file goes on release


@dataclasses.dataclass(frozen=True)
class LoopInfo:
    device: str
    backing_file: str
    direct_io: bool
    read_only: bool


def list_loops() -> list[LoopInfo]:
    """All attached loop devices, read from sysfs (no command, so cheap enough for leak checks)."""
    out = []
    base = SYS_BLOCK
    for name in sorted(os.listdir(base)):
        if not name.startswith("loop"):
            continue
        try:
            with open(f"{base}/{name}/loop/backing_file") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue  # not attached
        dio = _read_sys(f"{base}/{name}/loop/dio") == "1"
        ro = _read_sys(f"{base}/{name}/ro") == "1"
        out.append(LoopInfo(f"/dev/{name}", backing, dio, ro))
    return out


def _read_sys(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _attached(name: str) -> bool:
    return os.path.exists(f"{SYS_BLOCK}/{name}/loop/backing_file")


def loops_for(path: str) -> list[str]:
    """Loop devices whose backing file is path (losetup -j, read from sysfs instead).

    Never blocks on a device whose backing file sits on a paused FUSE export. sysfs prints the whole path
    (d_path into a page), so names are compared in full; a symlinked path is not resolved (callers pass the
    names they attach with). A device whose file was unlinked since (sysfs appends " (deleted)") backs some
    other file than the one path names now, as for losetup -j, which compares inodes: not returned.
    """
    want = os.path.abspath(path)
    return [lo.device for lo in list_loops() if lo.backing_file == want]


def attach_loop(path: str, *, read_only: bool = False, direct_io: bool = True, reuse: bool = True,
                runner: Runner | None = None) -> str:
    """Attach path to a free loop device and return it; reuse one already attached to path (unless
    reuse=False: a second, e.g. read-only, device on the same file).

    `losetup --find --show` picks and binds the device in one call, so two callers never race for one.
    """
    existing = loops_for(path) if reuse else []
    if existing:
        return existing[0]
    argv = ["losetup", "--find", "--show"]
    if direct_io:
        argv.append("--direct-io=on")
    if read_only:
        argv.append("--read-only")
    argv.append(path)
    dev = run_busy_from_stderr(argv, timeout=LOSETUP_TIMEOUT, runner=runner).stdout.strip()
    if not dev.startswith("/dev/loop"):
        raise CommandError(argv, 0, dev, "", "unexpected output")
    # udev may be absent (containers): wait for the node losetup created to be usable
    deadline = time.monotonic() + DEVICE_NODE_WAIT
    while not os.path.exists(dev) and time.monotonic() < deadline:
        time.sleep(0.01)
    return dev


def detach_loop(device: str, *, timeout: float = LOSETUP_TIMEOUT, runner: Runner | None = None) -> None:
    """Detach a loop device; fine if it is already free. Retries briefly while the kernel still holds it
    (DETACH_RETRY_SECONDS), then raises the last failure: DeviceBusy if losetup reported EBUSY."""
    name = os.path.basename(device)
    deadline = time.monotonic() + DETACH_RETRY_SECONDS
    while True:
        if not _attached(name):
            return
        try:
            run_busy_from_stderr(["losetup", "-d", device], timeout=timeout, runner=runner)
        except CommandError:
            if not _attached(name):
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        # losetup -d may only set autoclear on a busy device; the backing file goes when it is released
        release = time.monotonic() + AUTOCLEAR_WAIT
        while _attached(name) and time.monotonic() < release:
            time.sleep(0.02)
        return


def refresh_loop_capacity(device: str, *, runner: Runner | None = None) -> None:
    """Make the loop device pick up its backing file's new size (losetup -c)."""
    run_busy_from_stderr(["losetup", "-c", device], timeout=LOSETUP_TIMEOUT, runner=runner)


def block_size_bytes(device: str) -> int:
    """Size of a block device, also through a bind-mounted device node (looked up by device number)."""
    rdev = os.stat(device).st_rdev
    return int(_read_sys(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size") or 0) * 512
