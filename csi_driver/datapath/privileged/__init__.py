"""The one place where host commands and privileged kernel calls run.

Every verb is narrow (attach a loop device, mount, freeze...) and runs its commands through one injectable
Runner (runner.py: no shell, LC_ALL=C, own process group killed at the verb's timeout, stderr in the error).
Verbs check the live system (/proc/self/mountinfo, losetup -j, sysfs) before and after acting, so they are
idempotent and an ambiguous failure is re-checked instead of guessed. Errors (errors.py) are engine errors with
their gRPC status: a timeout is DEADLINE_EXCEEDED, a busy device FAILED_PRECONDITION.
"""

from csi_driver.datapath.privileged.errors import (
    CommandError,
    CommandNotFound,
    CommandTimeout,
    DeviceBusy,
    FreezeTimeout,
    HasFilesystem,
    MountError,
)
from csi_driver.datapath.privileged.freeze import FREEZE_MAX_SECONDS, freeze, frozen, thaw
from csi_driver.datapath.privileged.fs import (
    MKFS_TIMEOUT,
    PROBE_TIMEOUT,
    RESIZE_TIMEOUT,
    SUPPORTED_FS,
    can_resize_ext4_online,
    ext4_size,
    filesystem_type,
    grow_ext4_offline,
    mkfs,
    probe,
    resize_filesystem,
)
from csi_driver.datapath.privileged.loop import (
    LOSETUP_TIMEOUT,
    LoopInfo,
    attach_loop,
    block_size_bytes,
    detach_loop,
    list_loops,
    loops_for,
    refresh_loop_capacity,
)
from csi_driver.datapath.privileged.mount import (
    MOUNT_TIMEOUT,
    UMOUNT_TIMEOUT,
    MountInfo,
    is_mountpoint,
    mount,
    mounts,
    mounts_at,
    parse_mountinfo,
    umount,
)
from csi_driver.datapath.privileged.runner import DEFAULT_TIMEOUT, RUN, Runner, SubprocessRunner, run

__all__ = [
    "DEFAULT_TIMEOUT", "FREEZE_MAX_SECONDS", "LOSETUP_TIMEOUT", "MKFS_TIMEOUT", "MOUNT_TIMEOUT", "PROBE_TIMEOUT",
    "RESIZE_TIMEOUT", "RUN", "SUPPORTED_FS", "UMOUNT_TIMEOUT",
    "CommandError", "CommandNotFound", "CommandTimeout", "DeviceBusy", "FreezeTimeout", "HasFilesystem",
    "LoopInfo", "MountError", "MountInfo", "Runner", "SubprocessRunner",
    "attach_loop", "block_size_bytes", "can_resize_ext4_online", "detach_loop", "ext4_size", "filesystem_type",
    "freeze", "frozen", "grow_ext4_offline", "is_mountpoint", "list_loops", "loops_for", "mkfs", "mount", "mounts",
    "mounts_at", "parse_mountinfo", "probe", "refresh_loop_capacity", "resize_filesystem", "run", "thaw", "umount",
]
