"""Errors of host commands and kernel calls, in the engine's error hierarchy (csi_driver/engine/errors.py).

Each class names its gRPC status in `status` (csi_driver.status.status_for maps it), so a busy device or a
timed-out command reaches the CO with a code it can act on instead of INTERNAL. Every class sets `status`
itself rather than relying on the order of its bases.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from csi_driver.engine import errors

#: the EBUSY text tools print (strerror under LC_ALL=C, which the runner sets): the stderr fallback for tools
#: whose exit status says only "failed" (losetup(8), mkfs, e2fsprogs, mount(8)'s 32)
EBUSY_TEXT = os.strerror(errno.EBUSY)


class CommandError(errors.EngineError):
    """A host command failed (exit status not in its ok codes): INTERNAL, with its stderr."""

    status = "INTERNAL"

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str, msg: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = msg or f"exit code {returncode}"
        super().__init__(f"{' '.join(self.argv)}: {detail}: {stderr.strip()[-2000:]}")

    def as_(self, cls: type[CommandError], msg: str = "") -> CommandError:
        """The same failure as another CommandError class (a verb's classification of it)."""
        return cls(self.argv, self.returncode, self.stdout, self.stderr, msg)


class CommandTimeout(CommandError, errors.Timeout):
    """The command ran past its timeout and was killed (with its process group): DEADLINE_EXCEEDED, retry."""

    status = "DEADLINE_EXCEEDED"


class CommandNotFound(CommandError):
    """The executable is not installed on this node: FAILED_PRECONDITION (the node needs the tool)."""

    status = "FAILED_PRECONDITION"


class DeviceBusy(CommandError, errors.InvalidState):
    """The kernel refused because the device or mount is in use: FAILED_PRECONDITION.

    Also raised for an ioctl that failed with EBUSY (argv then names the ioctl and its target).
    """

    status = "FAILED_PRECONDITION"


class HasFilesystem(errors.InvalidState):
    """Refusing to format: the device already holds a filesystem or partition table. FAILED_PRECONDITION."""

    status = "FAILED_PRECONDITION"


class MountError(errors.EngineError):
    """The mount table does not show what the mount/umount call should have produced: INTERNAL."""

    status = "INTERNAL"


class FreezeTimeout(errors.Timeout, TimeoutError):
    """A filesystem freeze overran its window and was thawed early: the point in time was not taken.
    DEADLINE_EXCEEDED; still a TimeoutError for callers that catch that."""

    status = "DEADLINE_EXCEEDED"


def reports_ebusy(e: CommandError) -> bool:
    """Stderr fallback: the tool printed strerror(EBUSY). Only for tools whose exit status cannot say it."""
    return EBUSY_TEXT.lower() in e.stderr.lower()
