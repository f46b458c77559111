"""Filesystems on block devices: probe, mkfs (never over existing content), grow online and offline."""

from __future__ import annotations

from csi_driver.datapath.privileged.errors import CommandError, HasFilesystem
from csi_driver.datapath.privileged.runner import Runner, run_busy_from_stderr

PROBE_TIMEOUT = 60.0  # blkid -p, dumpe2fs -h: read a few superblocks
MKFS_TIMEOUT = 600.0  # a large xfs, or ext4 without a prezeroed device
RESIZE_TIMEOUT = 600.0  # e2fsck -f + resize2fs, xfs_growfs
#: blkid(8) -p: exit 2 = nothing found on the device; 8 = ambivalent (more than one signature)
BLKID_NOTHING_FOUND = 2
BLKID_AMBIVALENT = 8
#: e2fsck(8) -p: 0 = clean, 1 = errors corrected (a crash-consistent copy's journal replayed)
E2FSCK_OK = (0, 1)
CAP_SYS_RESOURCE = 24  # capabilities(7)


SUPPORTED_FS = ("ext4", "xfs")


def probe(device: str, *, runner: Runner | None = None) -> dict[str, str]:
    """Low-level probe (blkid -p, bypassing the cache): {} for a device with no recognisable content."""
    # blkid(8): exit 2 = nothing found on the device
    res = run_busy_from_stderr(["blkid", "-p", "-o", "export", device], ok_codes=(0, BLKID_NOTHING_FOUND),
                               timeout=PROBE_TIMEOUT, runner=runner)
    info = {}
    for line in res.stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            info[k] = v
    return info


def filesystem_type(device: str, *, runner: Runner | None = None) -> str | None:
    return probe(device, runner=runner).get("TYPE")


def mkfs(device: str, fstype: str = "ext4", *, prezeroed: bool = False, timeout: float = MKFS_TIMEOUT,
         runner: Runner | None = None) -> None:
    """Create a filesystem, refusing if the device holds any filesystem or partition table.

    prezeroed: the device is known to read all zeros (a fresh thin volume), so ext4 can skip zeroing
    inode tables and journal instead of allocating them in the background.
    """
    if fstype not in SUPPORTED_FS:
        raise ValueError(f"unsupported filesystem type {fstype!r} (supported: {', '.join(SUPPORTED_FS)})")
    try:
        found = probe(device, runner=runner)
    except CommandError as e:
        if e.returncode == BLKID_AMBIVALENT:  # several signatures: certainly not an empty device
            raise HasFilesystem(f"{device} holds more than one signature; not formatting") from e
        raise
    if found.get("TYPE") or found.get("PTTYPE"):
        what = found.get("TYPE") or found.get("PTTYPE")
        raise HasFilesystem(f"{device} already holds {what}; not formatting")
    if fstype == "ext4":
        ext = "nodiscard,assume_storage_prezeroed=1" if prezeroed else "nodiscard"
        run_busy_from_stderr(["mkfs.ext4", "-q", "-F", "-E", ext, device], timeout=timeout, runner=runner)
    else:
        run_busy_from_stderr(["mkfs.xfs", "-q", "-K", device], timeout=timeout, runner=runner)


def ext4_size(device: str, *, runner: Runner | None = None) -> int:
    """Bytes an ext4 filesystem spans (from its superblock)."""
    out = run_busy_from_stderr(["dumpe2fs", "-h", device], timeout=PROBE_TIMEOUT, runner=runner).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"].strip()) * int(fields["Block size"].strip())


def grow_ext4_offline(device: str, timeout: float = RESIZE_TIMEOUT, *, runner: Runner | None = None) -> None:
    """Grow an unmounted ext4 to its device: e2fsck (replays the journal of a crash-consistent copy) then
    resize2fs. Offline growth needs no CAP_SYS_RESOURCE, which online ext4 resizing does."""
    run_busy_from_stderr(["e2fsck", "-f", "-p", device], timeout=timeout, ok_codes=E2FSCK_OK, runner=runner)
    run_busy_from_stderr(["resize2fs", device], timeout=timeout, runner=runner)


def can_resize_ext4_online() -> bool:
    """Online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE; some sandboxes drop it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << CAP_SYS_RESOURCE))
    return False


def resize_filesystem(device: str, mount_point: str, fstype: str, timeout: float = RESIZE_TIMEOUT, *,
                      runner: Runner | None = None) -> None:
    """Grow a mounted filesystem to fill its device (online)."""
    if fstype == "ext4":
        run_busy_from_stderr(["resize2fs", device], timeout=timeout, runner=runner)
    elif fstype == "xfs":
        run_busy_from_stderr(["xfs_growfs", mount_point], timeout=timeout, runner=runner)
    else:
        raise ValueError(f"cannot resize filesystem type {fstype!r}")
