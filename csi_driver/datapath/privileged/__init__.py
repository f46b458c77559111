"""The one place where host commands and privileged kernel calls run.

Every verb is narrow (attach a loop device, mount, freeze...) and runs its commands through one injectable
Runner (runner.py: no shell, LC_ALL=C, own process group killed at the verb's timeout, stdin input, stderr in the
error); each verb takes `runner=` (None: the real one) and has its timeout as a named constant. Verbs check the
live system (/proc/self/mountinfo, sysfs) before and after acting, so they are idempotent and an
ambiguous failure is re-checked instead of guessed. Errors (errors.py) are engine errors with their gRPC status:
a timeout is DEADLINE_EXCEEDED, a busy device, a missing tool or a device that already holds a filesystem
FAILED_PRECONDITION, anything else INTERNAL.

Modules: runner (Runner, SubprocessRunner, run), mount (mount table, mount, umount), loop (loop devices),
fs (probe, mkfs, resize), freeze (FIFREEZE/FITHAW, frozen()), errors. The functions `mount` and `freeze` shadow
their modules as attributes of this package: reach the modules with importlib.import_module (sys.modules).
"""

from csi_driver.datapath.privileged import errors, fs, loop, runner
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
from csi_driver.datapath.privileged.runner import DEFAULT_RUNNER, DEFAULT_TIMEOUT, RUN, Runner, SubprocessRunner, run

__all__ = [
    # modules
    "errors", "fs", "loop", "runner",
    # runner
    "DEFAULT_RUNNER", "DEFAULT_TIMEOUT", "RUN", "Runner", "SubprocessRunner", "run",
    # errors
    "CommandError", "CommandNotFound", "CommandTimeout", "DeviceBusy", "FreezeTimeout", "HasFilesystem",
    "MountError",
    # mount table and mounts
    "MOUNT_TIMEOUT", "UMOUNT_TIMEOUT", "MountInfo", "is_mountpoint", "mount", "mounts",
    "mounts_at", "parse_mountinfo", "umount",
    # loop devices
    "LOSETUP_TIMEOUT", "LoopInfo", "attach_loop", "block_size_bytes", "detach_loop", "list_loops", "loops_for",
    "refresh_loop_capacity",
    # filesystems
    "MKFS_TIMEOUT", "PROBE_TIMEOUT", "RESIZE_TIMEOUT", "SUPPORTED_FS", "can_resize_ext4_online", "ext4_size",
    "filesystem_type", "grow_ext4_offline", "mkfs", "probe", "resize_filesystem",
    # freeze
    "FREEZE_MAX_SECONDS", "freeze", "frozen", "thaw",
]
