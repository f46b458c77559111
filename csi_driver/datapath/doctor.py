"""`csi-flashcopy doctor`: what the node data path needs, checked on the node (in the container) where it runs.

Each check is ok, missing (a must-have: the node cannot give Pods their volumes) or degraded (an optional feature
is off; `degrades` says which). Nothing is guessed from names: /dev/fuse is opened and a FUSE filesystem mounted on
a scratch directory to read the kernel's INIT flags (resend support, the same flag fuse_export reads at INIT),
/dev/loop-control is asked for a free device, every host tool of privileged/ is looked up on PATH, propagation is
read from /proc/self/mountinfo ("shared:N" among the optional fields), capabilities from /proc/self/status.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import platform
import select
import shutil
import stat
import tempfile
from collections.abc import Iterable

from csi_driver.datapath import fuse_session
from csi_driver.datapath import fuse_wire as w

OK, MISSING, DEGRADED = "ok", "missing", "degraded"

#: every command privileged/ runs -> (must-have, what fails without it). tests/datapath/test_doctor.py checks that
#: this names every command the privileged verbs build.
TOOLS: dict[str, tuple[bool, str]] = {
    "losetup": (True, "loop devices: no volume can be staged"),
    "mount": (True, "no volume can be staged or published"),
    "umount": (True, "no volume can be unpublished or unstaged"),
    "blkid": (True, "no filesystem volume can be staged (probed before mkfs)"),
    "mkfs.ext4": (True, "ext4 volumes (the default fsType) cannot be formatted"),
    "dumpe2fs": (True, "an ext4 volume cannot be staged again (its size is read at stage)"),
    "e2fsck": (False, "a grown ext4 volume cannot be staged (offline growth checks it first)"),
    "resize2fs": (False, "ext4 volumes cannot grow"),
    "mkfs.xfs": (False, "xfs volumes cannot be formatted"),
    "xfs_growfs": (False, "xfs volumes cannot grow"),
}

CAP_SYS_ADMIN, CAP_SYS_RESOURCE = 21, 24  # capabilities(7)
LOOP_CTL_GET_FREE = 0x4C82  # linux/loop.h
MNT_DETACH = 2
FUSE_PROBE_SECONDS = 5.0
#: free space in the state dir below which nothing works (metadata, staging records) / which is worth a warning
FREE_MIN = 64 << 20
FREE_LOW = 1 << 30
RESEND_KERNEL = (6, 9)


@dataclasses.dataclass
class Check:
    check: str
    status: str
    detail: str
    degrades: str = ""


@dataclasses.dataclass
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """The node can work: no must-have is missing (degraded features are allowed)."""
        return all(c.status != MISSING for c in self.checks)

    def by_name(self) -> dict[str, Check]:
        return {c.check: c for c in self.checks}

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "node": platform.node(), "kernel": platform.release(),
                           "checks": [dataclasses.asdict(c) for c in self.checks]}, indent=1)

    def table(self) -> str:
        rows = [("CHECK", "STATUS", "DETAIL", "WHAT DEGRADES")]
        rows += [(c.check, c.status, c.detail, c.degrades if c.status != OK else "") for c in self.checks]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        verdict = ("node OK" if all(c.status == OK for c in self.checks) else
                   "node usable, degraded" if self.ok else "node CANNOT serve volumes: a must-have is missing")
        return "\n".join(line.rstrip() for line in lines) + f"\n{verdict}\n"


# ---------------------------------------------------------------------------------------------------- the checks


def run(state_dir: str, kubelet_dir: str = "/var/lib/kubelet", path: str | None = None) -> Report:
    """Every check. path: where to look for the host tools (None: $PATH). kubelet_dir "" skips its checks."""
    checks = [*check_fuse(state_dir), check_loop(), *check_tools(path), *check_capabilities()]
    checks.append(check_propagation("state-dir-propagation", state_dir,
                                    "the FUSE export under the state dir: the engine container's restart cannot "
                                    "take it back, and the chart's Bidirectional mount is refused by the runtime"))
    if kubelet_dir:
        checks.append(check_propagation("kubelet-dir-propagation", kubelet_dir,
                                        "staging and publish mounts stay in this mount namespace: Pods get the "
                                        "host's directory, not the volume", must_exist=True))
    checks.append(check_free_space(state_dir))
    checks.append(Check("fuse-fast-path", OK if fuse_session.FAST else DEGRADED,
                        "compiled FUSE loop" if fuse_session.FAST else "the compiled FUSE loop is not built",
                        "FUSE requests are served by Python threads (slower I/O)"))
    return Report(checks)


def kernel_at_least(release: str, want: tuple[int, int]) -> bool:
    nums = []
    for part in release.split("-")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    return tuple(nums + [0] * (2 - len(nums))) >= want


def check_fuse(state_dir: str) -> list[Check]:
    """/dev/fuse, a real FUSE mount, and the kernel's resend support read from its INIT request."""
    resend_degrades = ("an engine restart fails the volumes' I/O (EIO) until they are staged again, instead of "
                       "pausing it (needs Linux 6.9: FUSE_NOTIFY_RESEND)")
    dev = Check("fuse-device", OK, "/dev/fuse", "no volume can be exported (FUSE)")
    try:
        st = os.stat("/dev/fuse")
        if not stat.S_ISCHR(st.st_mode):
            raise OSError(0, "not a character device")
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        dev.status, dev.detail = MISSING, f"/dev/fuse: {e.strerror or e}"
        return [dev, Check("fuse-mount", MISSING, "no /dev/fuse", "no volume can be exported (FUSE)"),
                _resend_from_release(resend_degrades)]
    mount = Check("fuse-mount", OK, "", "no volume can be exported (FUSE mount refused)")
    try:
        flags, minor = probe_fuse_init(_scratch_parent(state_dir))
    except OSError as e:
        mount.status, mount.detail = MISSING, f"mounting FUSE failed: {e.strerror or e}"
        return [dev, mount, _resend_from_release(resend_degrades)]
    mount.detail = f"kernel FUSE protocol 7.{minor}"
    if flags & w.HAS_RESEND:
        resend = Check("fuse-resend", OK, "the kernel offers FUSE_HAS_RESEND", resend_degrades)
    else:
        resend = Check("fuse-resend", DEGRADED, f"Linux {platform.release()} offers no FUSE_HAS_RESEND",
                       resend_degrades)
    return [dev, mount, resend]


def _resend_from_release(degrades: str) -> Check:
    release = platform.release()
    if kernel_at_least(release, RESEND_KERNEL):
        return Check("fuse-resend", OK, f"Linux {release} (from the version: no FUSE mount to ask)", degrades)
    return Check("fuse-resend", DEGRADED, f"Linux {release} is older than 6.9", degrades)


def _scratch_parent(state_dir: str) -> str | None:
    """Probe mounts go in the state dir when it is there (where the engine's export goes), else the temp dir."""
    return state_dir if os.path.isdir(state_dir) and os.access(state_dir, os.W_OK) else None


def probe_fuse_init(parent: str | None = None, timeout: float = FUSE_PROBE_SECONDS) -> tuple[int, int]:
    """Mount a FUSE filesystem on a scratch directory, read the kernel's INIT request and unmount (never
    answered: closing the descriptor aborts the connection). Returns (the kernel's INIT flags, protocol minor)."""
    where = tempfile.mkdtemp(prefix=".doctor-fuse-", dir=parent)
    fd = -1
    try:
        fd = fuse_session.mount(where, fsname="flashcopy-doctor", subtype="flashcopy-doctor", max_read=1 << 17)
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(int(timeout * 1000)):
            raise OSError(0, f"the kernel sent no FUSE INIT within {timeout:g}s")
        req = os.read(fd, (1 << 20) + 4096)
        _, opcode, *_ = w.IN_HEADER.unpack_from(req)
        if opcode != w.INIT:
            raise OSError(0, f"the first FUSE request was opcode {opcode}, not INIT")
        _major, minor, _readahead, flags, flags2 = w.INIT_IN.unpack_from(req, w.IN_HEADER.size)
        return flags | (flags2 << 32 if flags & w.INIT_EXT else 0), minor
    finally:
        if fd >= 0:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.umount2(where.encode(), MNT_DETACH)
            os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(where)


def check_loop() -> Check:
    c = Check("loop-devices", OK, "/dev/loop-control", "no volume can be attached as a block device")
    try:
        fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        c.status, c.detail = MISSING, f"/dev/loop-control: {e.strerror} (modprobe loop; mount the host's /dev)"
        return c
    try:
        c.detail = f"/dev/loop-control: next free /dev/loop{fcntl.ioctl(fd, LOOP_CTL_GET_FREE)}"
    except OSError as e:
        c.status, c.detail = MISSING, f"LOOP_CTL_GET_FREE: {e.strerror}"
    finally:
        os.close(fd)
    return c


def check_tools(path: str | None = None) -> list[Check]:
    out = []
    for tool, (must, degrades) in TOOLS.items():
        found = shutil.which(tool, path=path)
        if found:
            out.append(Check(f"tool:{tool}", OK, found, degrades))
        else:
            out.append(Check(f"tool:{tool}", MISSING if must else DEGRADED, "not on PATH", degrades))
    return out


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_capabilities() -> list[Check]:
    caps = effective_caps()
    admin = bool(caps & (1 << CAP_SYS_ADMIN))
    res = bool(caps & (1 << CAP_SYS_RESOURCE))
    return [
        Check("cap:CAP_SYS_ADMIN", OK if admin else MISSING, "effective" if admin else "not effective",
              "mount, loop devices and FUSE need it (a privileged container)"),
        Check("cap:CAP_SYS_RESOURCE", OK if res else DEGRADED, "effective" if res else "not effective",
              "a mounted ext4 volume cannot grow online (it grows at its next stage); xfs and block grow anyway"),
    ]


def _unescape(field: str) -> str:
    """A mountinfo path field: octal escapes (\\040 space, \\011 tab, \\012 newline, \\134 backslash)."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mount_of(path: str, mountinfo: Iterable[str] | None = None) -> tuple[str, list[str]] | None:
    """(mount point, optional fields) of the mount that holds path (the last one mounted over the longest
    matching mount point), from /proc/self/mountinfo."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read().splitlines()
    best: tuple[str, list[str]] | None = None
    for line in mountinfo:
        parts = line.split()
        if "-" not in parts:
            continue
        sep = parts.index("-")
        mp = _unescape(parts[4])
        inside = path == mp or path.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best[0])):
            best = (mp, parts[6:sep])
    return best


def _existing(path: str) -> str:
    p = os.path.realpath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def check_propagation(name: str, path: str, degrades: str, *, must_exist: bool = False) -> Check:
    """Shared propagation (or a slave of a shared one that is also shared: "shared:N" present) of the mount
    holding path. Private or slave-only: mounts made below it do not reach the host's namespace."""
    if must_exist and not os.path.isdir(path):
        return Check(name, MISSING, f"{path} does not exist", degrades)
    real = _existing(path)
    where = real if real == os.path.realpath(path) else f"{real} ({path} does not exist yet)"
    found = mount_of(real)
    if found is None:
        return Check(name, MISSING, f"{where}: in no mount of /proc/self/mountinfo", degrades)
    mp, fields = found
    shared = [f for f in fields if f.startswith("shared:")]
    if shared:
        return Check(name, OK, f"{where}: shared ({shared[0]}) at {mp}", degrades)
    kind = "slave (" + ",".join(fields) + ")" if fields else "private"
    return Check(name, MISSING, f"{where}: {kind} at {mp}", degrades)


def check_free_space(state_dir: str) -> Check:
    degrades = "volume writes and new volumes fail with ENOSPC when it fills (volumes are thin)"
    real = _existing(state_dir)
    try:
        st = os.statvfs(real)
    except OSError as e:
        return Check("state-dir-space", MISSING, f"{real}: {e.strerror}", degrades)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    detail = f"{real}: {free / (1 << 30):.1f} GiB free of {total / (1 << 30):.1f} GiB"
    if not os.access(real, os.W_OK):
        return Check("state-dir-space", MISSING, f"{real}: not writable", degrades)
    if free < FREE_MIN:
        return Check("state-dir-space", MISSING, detail, "no room for metadata: nothing can be created")
    if free < FREE_LOW or free < total // 20:
        return Check("state-dir-space", DEGRADED, detail, degrades)
    return Check("state-dir-space", OK, detail, degrades)
