"""The one place where host commands and privileged kernel calls run.

Every verb is narrow (attach a loop device, mount, freeze...) and goes through `run`, which sets LC_ALL=C,
never uses a shell, bounds the time, kills the whole child process group on timeout and puts stderr into
the raised error. Verbs check the live system (/proc/self/mountinfo, losetup -j, sysfs) before and after
acting, so they are idempotent and an ambiguous failure is re-checked instead of guessed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0


class CommandError(Exception):
    """A host command failed (exit code not in ok_codes)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str, msg: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = msg or f"exit code {returncode}"
        super().__init__(f"{' '.join(self.argv)}: {detail}: {stderr.strip()[-2000:]}")


class CommandTimeout(CommandError):
    """The command ran past its timeout and was killed."""


class CommandNotFound(CommandError):
    """The executable is not installed."""


class DeviceBusy(CommandError):
    """The kernel refused because the device or mount is in use."""


class HasFilesystem(Exception):
    """Refusing to format: the device already holds a filesystem or partition table."""


class MountError(Exception):
    """The mount table does not show what the mount/umount call should have produced."""


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ok_codes: Sequence[int] = (0,),
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell, LC_ALL=C); raise a CommandError subclass unless the exit code is in ok_codes."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    log.debug("run %s", argv)
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # own process group, so a timeout kills helpers it forked too
        )
    except FileNotFoundError as e:
        raise CommandNotFound(argv, None, "", str(e), "not installed") from e
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        sout, serr = out.decode(errors="replace"), err.decode(errors="replace")
        raise CommandTimeout(argv, None, sout, serr, f"timed out after {timeout}s") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    sout, serr = out.decode(errors="replace"), err.decode(errors="replace")
    if proc.returncode not in ok_codes:
        cls = DeviceBusy if "busy" in serr.lower() else CommandError
        raise cls(argv, proc.returncode, sout, serr)
    return subprocess.CompletedProcess(list(argv), proc.returncode, sout, serr)


# ---------------------------------------------------------------------------------------------- mount table


@dataclasses.dataclass(frozen=True)
class MountInfo:
    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountInfo]:
    """The live mount table of this process's mount namespace."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a = left.split(" ")
            b = right.split(" ")
            result.append(
                MountInfo(
                    mount_id=int(a[0]),
                    parent_id=int(a[1]),
                    major_minor=a[2],
                    root=_unescape(a[3]),
                    mount_point=_unescape(a[4]),
                    options=frozenset(a[5].split(",")),
                    fstype=b[0],
                    source=_unescape(b[1]) if len(b) > 1 else "",
                    super_options=frozenset(b[2].split(",")) if len(b) > 2 else frozenset(),
                )
            )
    return result


def mounts_at(path: str) -> list[MountInfo]:
    """Mounts whose mount point is exactly path (the last one is the visible, top-most one)."""
    p = os.path.realpath(path) if os.path.exists(path) else os.path.abspath(path)
    return [m for m in mounts() if m.mount_point == p or m.mount_point == os.path.abspath(path)]


def is_mountpoint(path: str) -> bool:
    return bool(mounts_at(path))


def _dev_of(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mount(
    source: str,
    target: str,
    *,
    fstype: str | None = None,
    options: Sequence[str] = (),
    bind: bool = False,
    read_only: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> MountInfo:
    """Mount source (a device, or a directory/file with bind=True) at target; idempotent.

    If target already shows a mount of the same device it is accepted (checked with read-only-ness);
    a different mount there raises MountError rather than stacking on top of it.
    """
    existing = mounts_at(target)
    if existing:
        top = existing[-1]
        if _same_source(top, source, bind) and top.read_only == read_only:
            return top
        raise MountError(
            f"{target} is already mounted: {top.source} ({top.fstype} {','.join(sorted(top.options))})"
        )
    argv = ["mount"]
    opts = list(options)
    if bind:
        argv.append("--bind")
    if read_only and "ro" not in opts:
        opts.append("ro")
    if fstype and not bind:
        argv += ["-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    argv += [source, target]
    try:
        run(argv, timeout=timeout)
    except CommandError:
        # "already mounted" can also mean busy: re-read the table instead of trusting the message
        after = mounts_at(target)
        if after and _same_source(after[-1], source, bind):
            return after[-1]
        raise
    after = mounts_at(target)
    if not after:
        raise MountError(f"mount of {source} at {target} reported success but no mount is there")
    top = after[-1]
    if read_only and not top.read_only:
        # old util-linux binds read-write first; remount read-only and check again
        run(["mount", "-o", "remount,bind,ro", target], timeout=timeout)
        top = mounts_at(target)[-1]
        if not top.read_only:
            with contextlib.suppress(Exception):
                umount(target)
            raise MountError(f"{target}: could not make the bind mount read-only")
    return top


def _same_source(m: MountInfo, source: str, bind: bool) -> bool:
    dev = _dev_of(source)
    if dev is not None:
        # a device, or a bind of a block device file: devtmpfs shows the device node's path as root
        real = os.path.realpath(source)
        return m.source in (source, real) or m.major_minor == dev or m.root == real.removeprefix("/dev")
    if bind:
        try:
            st = os.stat(source)
        except OSError:
            return False
        want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        return m.major_minor == want
    return m.source == source


def umount(target: str, *, lazy: bool = False, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Unmount every mount stacked on target; True if something was unmounted. Idempotent."""
    did = False
    for _ in range(16):
        if not mounts_at(target):
            return did
        argv = ["umount"] + (["-l"] if lazy else []) + [target]
        try:
            run(argv, timeout=timeout)
        except CommandError:
            if not mounts_at(target):
                return True
            raise
        did = True
    raise MountError(f"{target}: still mounted after 16 umount calls")


# ---------------------------------------------------------------------------------------------- loop devices


@dataclasses.dataclass(frozen=True)
class LoopInfo:
    device: str
    backing_file: str
    direct_io: bool
    read_only: bool


def list_loops() -> list[LoopInfo]:
    """All attached loop devices, read from sysfs (no command, so cheap enough for leak checks)."""
    out = []
    base = "/sys/block"
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


def loops_for(path: str) -> list[str]:
    """Loop devices whose backing file is path (losetup -j)."""
    res = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE", "-j", path], ok_codes=(0, 1))
    if not res.stdout.strip():
        return []
    return [d["name"] for d in json.loads(res.stdout).get("loopdevices", [])]


def attach_loop(path: str, *, read_only: bool = False, direct_io: bool = True, reuse: bool = True) -> str:
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
    dev = run(argv).stdout.strip()
    if not dev.startswith("/dev/loop"):
        raise CommandError(argv, 0, dev, "", "unexpected output")
    # udev may be absent (containers): wait for the node losetup created to be usable
    for _ in range(100):
        if os.path.exists(dev):
            break
        time.sleep(0.01)
    return dev


def detach_loop(device: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Detach a loop device; fine if it is already free. Retries briefly while the kernel still holds it."""
    name = os.path.basename(device)
    deadline = time.monotonic() + 5.0
    while True:
        if not os.path.exists(f"/sys/block/{name}/loop/backing_file"):
            return
        try:
            run(["losetup", "-d", device], timeout=timeout)
        except CommandError:
            if not os.path.exists(f"/sys/block/{name}/loop/backing_file"):
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        # losetup -d may only set autoclear on a busy device; the backing file goes when it is released
        for _ in range(50):
            if not os.path.exists(f"/sys/block/{name}/loop/backing_file"):
                return
            time.sleep(0.02)
        return


def refresh_loop_capacity(device: str) -> None:
    """Make the loop device pick up its backing file's new size (losetup -c)."""
    run(["losetup", "-c", device])


def block_size_bytes(device: str) -> int:
    """Size of a block device, also through a bind-mounted device node (looked up by device number)."""
    rdev = os.stat(device).st_rdev
    return int(_read_sys(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size") or 0) * 512


# ---------------------------------------------------------------------------------------------- filesystems

SUPPORTED_FS = ("ext4", "xfs")


def probe(device: str) -> dict[str, str]:
    """Low-level probe (blkid -p, bypassing the cache): {} for a device with no recognisable content."""
    res = run(["blkid", "-p", "-o", "export", device], ok_codes=(0, 2))
    info = {}
    for line in res.stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            info[k] = v
    return info


def filesystem_type(device: str) -> str | None:
    return probe(device).get("TYPE")


def mkfs(device: str, fstype: str = "ext4", *, prezeroed: bool = False, timeout: float = 600.0) -> None:
    """Create a filesystem, refusing if the device holds any filesystem or partition table.

    prezeroed: the device is known to read all zeros (a fresh thin volume), so ext4 can skip zeroing
    inode tables and journal instead of allocating them in the background.
    """
    if fstype not in SUPPORTED_FS:
        raise ValueError(f"unsupported filesystem type {fstype!r} (supported: {', '.join(SUPPORTED_FS)})")
    found = probe(device)
    if found.get("TYPE") or found.get("PTTYPE"):
        what = found.get("TYPE") or found.get("PTTYPE")
        raise HasFilesystem(f"{device} already holds {what}; not formatting")
    if fstype == "ext4":
        ext = "nodiscard,assume_storage_prezeroed=1" if prezeroed else "nodiscard"
        run(["mkfs.ext4", "-q", "-F", "-E", ext, device], timeout=timeout)
    else:
        run(["mkfs.xfs", "-q", "-K", device], timeout=timeout)


def ext4_size(device: str) -> int:
    """Bytes an ext4 filesystem spans (from its superblock)."""
    out = run(["dumpe2fs", "-h", device]).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"].strip()) * int(fields["Block size"].strip())


def grow_ext4_offline(device: str, timeout: float = 600.0) -> None:
    """Grow an unmounted ext4 to its device: e2fsck (replays the journal of a crash-consistent copy) then
    resize2fs. Offline growth needs no CAP_SYS_RESOURCE, which online ext4 resizing does."""
    run(["e2fsck", "-f", "-p", device], timeout=timeout, ok_codes=(0, 1))
    run(["resize2fs", device], timeout=timeout)


def can_resize_ext4_online() -> bool:
    """Online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE; some sandboxes drop it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def resize_filesystem(device: str, mount_point: str, fstype: str, timeout: float = 600.0) -> None:
    """Grow a mounted filesystem to fill its device (online)."""
    if fstype == "ext4":
        run(["resize2fs", device], timeout=timeout)
    elif fstype == "xfs":
        run(["xfs_growfs", mount_point], timeout=timeout)
    else:
        raise ValueError(f"cannot resize filesystem type {fstype!r}")


# ---------------------------------------------------------------------------------------------- freeze

_FIFREEZE = 0xC0045877
_FITHAW = 0xC0045878


def freeze(mount_point: str) -> None:
    """FIFREEZE: flush the filesystem and block new writes until thaw."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _FIFREEZE, 0)
    finally:
        os.close(fd)


def thaw(mount_point: str) -> bool:
    """FITHAW; False if it was not frozen (EINVAL), so thawing twice is harmless."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _FITHAW, 0)
        return True
    except OSError as e:
        if e.errno == 22:
            return False
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def frozen(mount_points: Sequence[str], *, max_seconds: float = 10.0) -> Iterator[None]:
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
                    raise TimeoutError(f"freeze did not complete within {max_seconds}s")
                # record before the call so a freeze that completes is always thawed
                done.append(mp)
            freeze(mp)
        yield
        if released.is_set():
            raise TimeoutError(f"freeze window exceeded {max_seconds}s; filesystems were thawed early")
    finally:
        watchdog.cancel()
        thaw_all()
