"""Errors of host commands and kernel calls, in the engine's error hierarchy: each names its gRPC status
(csi_driver.status.status_for), so a busy device or a timed-out command reaches the CO with a code it can act on
instead of INTERNAL."""

from __future__ import annotations

from collections.abc import Sequence

from csi_driver.engine import errors


class CommandError(errors.EngineError):
    """A host command failed (exit status not in its ok codes): INTERNAL, with its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str, msg: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = msg or f"exit code {returncode}"
        super().__init__(f"{' '.join(self.argv)}: {detail}: {stderr.strip()[-2000:]}")


class CommandTimeout(CommandError, errors.Timeout):
    """The command ran past its timeout and was killed (with its process group): DEADLINE_EXCEEDED, retry."""


class CommandNotFound(CommandError):
    """The executable is not installed on this node: FAILED_PRECONDITION (the node needs the tool)."""

    status = "FAILED_PRECONDITION"


class DeviceBusy(CommandError, errors.InvalidState):
    """The kernel refused because the device or mount is in use: FAILED_PRECONDITION."""


class HasFilesystem(errors.InvalidState):
    """Refusing to format: the device already holds a filesystem or partition table."""


class MountError(errors.EngineError):
    """The mount table does not show what the mount/umount call should have produced: INTERNAL."""


class FreezeTimeout(errors.Timeout, TimeoutError):
    """A filesystem freeze overran its window and was thawed early: the point in time was not taken."""
