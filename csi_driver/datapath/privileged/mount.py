"""The mount table (/proc/self/mountinfo) and the mount verbs, checked against the live table before and after.

`mount` and `umount` are idempotent: what the table already shows is accepted, an ambiguous failure ("already
mounted" can also mean busy) is re-checked against the table instead of trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
from collections.abc import Sequence

from csi_driver.datapath.privileged.errors import CommandError, DeviceBusy, MountError
from csi_driver.datapath.privileged.runner import Runner, run

MOUNT_TIMEOUT = 60.0  # a mount of a device whose journal replays
UMOUNT_TIMEOUT = 60.0  # an unmount flushes the filesystem's dirty data through FUSE
UMOUNT_ATTEMPTS = 16  # mounts stacked on one target are removed one per call
#: where mounts() reads the table by default (a module global, so tests can point it at a sample file)
MOUNTINFO_PATH = "/proc/self/mountinfo"
#: mount(8)/umount(8) exit status "mount failure" / "umount failure": the mount(2)/umount2(2) call itself failed
#: (any errno: EBUSY, EINVAL "not mounted", ENOENT...). The other statuses (1 usage/permissions, 2 system error,
#: 4 internal bug, 16 mtab, 64 partial success) are never "busy".
MNT_EX_FAIL = 32


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


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """The kernel (fs/proc_namespace.c, mangle()) writes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse /proc/<pid>/mountinfo text (proc(5)): one MountInfo per line, escaped fields unescaped.

    Fields: id, parent id, major:minor, root, mount point, options, optional tags..., "-", fstype, source, super
    options. The separator is safe to split on: a space inside a field is always escaped."""
    result = []
    # only "\n" ends a line: the kernel does not escape \f, \x85 and the like, which str.splitlines() splits on
    for line in text.split("\n"):
        if line:
            left, _, right = line.partition(" - ")
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


def mounts(path: str | os.PathLike[str] | None = None) -> list[MountInfo]:
    """The mount table read from path (default MOUNTINFO_PATH: the live table of this mount namespace)."""
    with open(path if path is not None else MOUNTINFO_PATH) as f:
        return parse_mountinfo(f.read())


def mounts_at(path: str) -> list[MountInfo]:
    """Mounts whose mount point is exactly path (the last one is the visible, top-most one).

    The table is searched for the path as given first, and only then is it resolved: stat of a FUSE mount
    point whose connection is paused (an engine restart under the keeper) waits as long as the pause.
    """
    table = mounts()
    given = os.path.abspath(path)
    found = [m for m in table if m.mount_point == given]
    if found:
        return found
    p = os.path.realpath(path) if os.path.exists(path) else given
    return [m for m in table if m.mount_point == p]


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
    timeout: float = MOUNT_TIMEOUT,
    runner: Runner | None = None,
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
        run(argv, timeout=timeout, runner=runner)
    except CommandError as e:
        # "already mounted" can also mean busy: re-read the table instead of trusting the message
        after = mounts_at(target)
        if after and _same_source(after[-1], source, bind):
            return after[-1]
        # mount(8) exits 32 for every mount(2) errno; which one it was is only in its message (stderr fallback:
        # EBUSY is "already mounted or mount point busy", "... is busy", or strerror(EBUSY))
        if e.returncode == MNT_EX_FAIL and ("busy" in e.stderr.lower() or "already mounted" in e.stderr.lower()):
            raise e.as_(DeviceBusy) from e
        raise
    after = mounts_at(target)
    if not after:
        raise MountError(f"mount of {source} at {target} reported success but no mount is there")
    top = after[-1]
    if read_only and not top.read_only:
        # old util-linux binds read-write first; remount read-only and check again
        keep = "".join(f",{o}" for o in opts if o in ("nosuid", "nodev", "noexec"))  # a remount sets all flags
        run(["mount", "-o", f"remount,bind,ro{keep}", target], timeout=timeout, runner=runner)
        top = mounts_at(target)[-1]
        if not top.read_only:
            with contextlib.suppress(Exception):
                umount(target, runner=runner)
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


def umount(target: str, *, lazy: bool = False, timeout: float = UMOUNT_TIMEOUT, runner: Runner | None = None
           ) -> bool:
    """Unmount every mount stacked on target; True if something was unmounted. Idempotent."""
    did = False
    for _ in range(UMOUNT_ATTEMPTS):
        if not mounts_at(target):
            return did
        argv = ["umount"] + (["-l"] if lazy else []) + [target]
        try:
            run(argv, timeout=timeout, runner=runner)
        except CommandError as e:
            if not mounts_at(target):
                return True  # gone anyway (a racing unmount; umount(8) then says "not mounted")
            if e.returncode == MNT_EX_FAIL:
                # umount2(2) refused and the table still shows the mount, so it was not EINVAL "not mounted":
                # for a mounted target that is EBUSY (or EPERM without CAP_SYS_ADMIN, also not ours to fix)
                raise e.as_(DeviceBusy, f"exit code {e.returncode}, still mounted") from e
            raise
        did = True
    raise MountError(f"{target}: still mounted after {UMOUNT_ATTEMPTS} umount calls")
