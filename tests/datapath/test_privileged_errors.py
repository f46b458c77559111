"""Every privileged error class: its gRPC status (the `status` attribute and what status_for makes of an
instance), its place in the engine's hierarchy (isinstance checks callers rely on), and that the engine wire
knows it by name."""

from __future__ import annotations

import grpc
import pytest

from csi_driver.datapath import privileged
from csi_driver.engine import errors
from csi_driver.status import status_for

CASES = [
    (privileged.CommandError, "INTERNAL", (errors.EngineError,),
     lambda: privileged.CommandError(["losetup"], 1, "", "boom")),
    (privileged.CommandTimeout, "DEADLINE_EXCEEDED", (privileged.CommandError, errors.Timeout),
     lambda: privileged.CommandTimeout(["mkfs.ext4", "/dev/loop9"], None, "", "", "timed out after 1s")),
    (privileged.CommandNotFound, "FAILED_PRECONDITION", (privileged.CommandError,),
     lambda: privileged.CommandNotFound(["mkfs.xfs"], None, "", "no such file", "not installed")),
    (privileged.DeviceBusy, "FAILED_PRECONDITION", (privileged.CommandError, errors.InvalidState),
     lambda: privileged.DeviceBusy(["umount", "/x"], 32, "", "target is busy")),
    (privileged.HasFilesystem, "FAILED_PRECONDITION", (errors.InvalidState,),
     lambda: privileged.HasFilesystem("/dev/loop1 already holds ext4")),
    (privileged.MountError, "INTERNAL", (errors.EngineError,), lambda: privileged.MountError("not there")),
    (privileged.FreezeTimeout, "DEADLINE_EXCEEDED", (errors.Timeout, TimeoutError),
     lambda: privileged.FreezeTimeout("overran")),
]


@pytest.mark.parametrize("cls, status, bases, make", CASES, ids=[c[0].__name__ for c in CASES])
def test_status_and_hierarchy(cls: type[errors.EngineError], status: str, bases: tuple[type, ...],
                              make: object) -> None:
    assert cls.status == status and status in grpc.StatusCode.__members__
    assert issubclass(cls, errors.EngineError) and all(issubclass(cls, b) for b in bases)
    exc = make()  # type: ignore[operator]
    st = status_for(exc)
    assert st.code == grpc.StatusCode[status] and st.error_class == cls.__name__
    assert st.unexpected is (status == "INTERNAL")
    assert errors.error_classes()[cls.__name__] is cls  # raised again as itself across the engine wire


def test_command_error_keeps_what_the_command_said() -> None:
    e = privileged.CommandError(["mount", "/dev/x", "/t"], 32, "out", "  mount: /t: wrong fs type  \n")
    assert (e.argv, e.returncode, e.stdout, e.stderr) == (["mount", "/dev/x", "/t"], 32, "out",
                                                          "  mount: /t: wrong fs type  \n")
    assert str(e) == "mount /dev/x /t: exit code 32: mount: /t: wrong fs type"
    busy = e.as_(privileged.DeviceBusy)
    assert type(busy) is privileged.DeviceBusy and (busy.argv, busy.returncode, busy.stderr) == (
        e.argv, e.returncode, e.stderr)
    assert len(str(privileged.CommandError(["x"], 1, "", "y" * 5000))) < 2100  # stderr tail only
