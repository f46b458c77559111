"""The one command runner and the verbs over it, without root: the real runner on harmless commands (timeouts
kill the whole process group, ok codes, typed errors), the verbs with a fake runner (argv, timeouts, ok codes,
busy classification), mountinfo parsing with its escapes, and the status code of every error class."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from csi_driver.datapath import privileged
from csi_driver.datapath.privileged import fs, loop
from csi_driver.status import status_for
from tests.waiting import wait_for


class FakeRunner:
    """Records every call; answers from a table of argv[0] -> (returncode, stdout, stderr)."""

    def __init__(self, answers: dict[str, tuple[int, str, str]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[list[str], float, tuple[int, ...]]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float = privileged.DEFAULT_TIMEOUT,
                 ok_codes: Sequence[int] = (0,), input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), timeout, tuple(ok_codes)))
        code, out, err = self.answers.get(argv[0], (0, "", ""))
        if code not in ok_codes:
            raise privileged.runner.classify(argv, code, out, err)
        return subprocess.CompletedProcess(list(argv), code, out, err)


# ---------------------------------------------------------------------------------------------- real runner


def test_runner_ok_codes_and_output() -> None:
    res = privileged.run([sys.executable, "-c", "import sys, os; print(os.environ['LC_ALL']); sys.exit(3)"],
                         ok_codes=(0, 3))
    assert res.returncode == 3 and res.stdout.strip() == "C"


def test_runner_failure_carries_stderr() -> None:
    with pytest.raises(privileged.CommandError) as ei:
        privileged.run([sys.executable, "-c", "import sys; sys.stderr.write('it broke'); sys.exit(4)"])
    e = ei.value
    assert type(e) is privileged.CommandError and e.returncode == 4 and "it broke" in str(e)
    assert status_for(e).code == grpc.StatusCode.INTERNAL


def test_runner_missing_executable() -> None:
    with pytest.raises(privileged.CommandNotFound) as ei:
        privileged.run(["/nonexistent/tool-that-is-not-there", "x"])
    assert status_for(ei.value).code == grpc.StatusCode.FAILED_PRECONDITION


def test_runner_timeout_kills_the_command_and_what_it_forked(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # the child forks a grandchild that would outlive it; both record their pids, then sleep
    script = (
        "import os, sys, time\n"
        f"p = {str(pids)!r}\n"
        "if os.fork() == 0:\n"
        "    open(p + '.grandchild', 'w').write(str(os.getpid())); time.sleep(60); os._exit(0)\n"
        "open(p + '.child', 'w').write(str(os.getpid())); time.sleep(60)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(privileged.CommandTimeout) as ei:
        privileged.run([sys.executable, "-c", script], timeout=1.0)
    assert time.monotonic() - t0 < 30
    assert status_for(ei.value).code == grpc.StatusCode.DEADLINE_EXCEEDED
    for who in ("child", "grandchild"):
        pid = int(wait_for(lambda w=who: Path(f"{pids}.{w}").exists() and Path(f"{pids}.{w}").read_text(),
                           timeout=10, what=f"the {who}'s pid"))
        wait_for(lambda p=pid: not _alive(p), timeout=10, what=f"the {who} ({pid}) to be killed")


def _alive(pid: int) -> bool:  # noqa: D103
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- verbs, fake runner


def test_busy_is_classified_from_the_tool_report() -> None:
    fake = FakeRunner({"losetup": (1, "", "losetup: /dev/loop7: detach failed: Device or resource busy\n")})
    with pytest.raises(privileged.DeviceBusy) as ei:
        privileged.run(["losetup", "-d", "/dev/loop7"], runner=fake)
    assert status_for(ei.value).code == grpc.StatusCode.FAILED_PRECONDITION
    fake = FakeRunner({"umount": (32, "", "umount: /mnt/x: target is busy.\n")})
    with pytest.raises(privileged.DeviceBusy):
        privileged.run(["umount", "/mnt/x"], runner=fake)
    fake = FakeRunner({"umount": (32, "", "umount: /mnt/x: not mounted.\n")})
    with pytest.raises(privileged.CommandError) as e2:
        privileged.run(["umount", "/mnt/x"], runner=fake)
    assert type(e2.value) is privileged.CommandError


def test_verbs_use_the_injected_runner_with_their_timeouts() -> None:
    fake = FakeRunner({"losetup": (0, "/dev/loop9\n", "")})
    assert loop.attach_loop("/nonexistent/file", reuse=False, runner=fake) == "/dev/loop9"
    (argv, timeout, _ok), = fake.calls
    assert argv == ["losetup", "--find", "--show", "--direct-io=on", "/nonexistent/file"]
    assert timeout == privileged.LOSETUP_TIMEOUT

    fake = FakeRunner({"blkid": (2, "", "")})  # blkid: exit 2 = nothing on the device
    assert fs.probe("/dev/loop9", runner=fake) == {}
    fs.mkfs("/dev/loop9", "ext4", prezeroed=True, runner=fake)
    assert [c[0][0] for c in fake.calls] == ["blkid", "blkid", "mkfs.ext4"]
    assert fake.calls[0][2] == (0, fs.BLKID_NOTHING_FOUND)
    assert fake.calls[2][0] == ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,assume_storage_prezeroed=1", "/dev/loop9"]
    assert fake.calls[2][1] == privileged.MKFS_TIMEOUT

    fake = FakeRunner({"blkid": (0, "TYPE=xfs\nUUID=1\n", "")})
    with pytest.raises(privileged.HasFilesystem) as ei:
        fs.mkfs("/dev/loop9", "ext4", runner=fake)
    assert status_for(ei.value).code == grpc.StatusCode.FAILED_PRECONDITION
    assert [c[0][0] for c in fake.calls] == ["blkid"]  # never formats over content

    fake = FakeRunner()
    fs.grow_ext4_offline("/dev/loop9", runner=fake)
    assert [c[0][0] for c in fake.calls] == ["e2fsck", "resize2fs"] and fake.calls[0][2] == fs.E2FSCK_OK


def test_umount_of_nothing_runs_nothing(tmp_path: Path) -> None:
    fake = FakeRunner()
    assert privileged.umount(str(tmp_path / "not-mounted"), runner=fake) is False
    assert fake.calls == []


# ---------------------------------------------------------------------------------------------- mountinfo

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "97 22 7:3 / /var/lib/k\\040with\\040space rw,nosuid - ext4 /dev/loop3 rw\n"
    "98 22 0:50 / /mnt/tab\\011and\\012newline ro master:7 - fuse.flashcopy flashcopy rw,user_id=0\n"
    "99 22 0:51 /sub\\134dir /mnt/back\\134slash rw - tmpfs tmp\\040fs rw,size=1024k\n"
)


def test_mountinfo_parsing_unescapes_fields() -> None:
    m = privileged.parse_mountinfo(MOUNTINFO)
    assert [x.mount_point for x in m] == ["/", "/var/lib/k with space", "/mnt/tab\tand\nnewline", "/mnt/back\\slash"]
    assert m[1].source == "/dev/loop3" and m[1].major_minor == "7:3" and m[1].options == {"rw", "nosuid"}
    assert m[2].read_only and m[2].fstype == "fuse.flashcopy" and "user_id=0" in m[2].super_options
    assert m[3].root == "/sub\\dir" and m[3].source == "tmp fs"
    assert (m[0].mount_id, m[0].parent_id) == (22, 1)


def test_live_mount_table_parses() -> None:
    assert any(m.mount_point == "/" for m in privileged.mounts())
    assert privileged.is_mountpoint("/") and not privileged.is_mountpoint(str(Path(os.sep, "nonexistent-x")))


# ---------------------------------------------------------------------------------------------- error classes


@pytest.mark.parametrize("exc, code", [
    (privileged.CommandError(["x"], 1, "", ""), grpc.StatusCode.INTERNAL),
    (privileged.CommandTimeout(["x"], None, "", "", "timed out"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (privileged.CommandNotFound(["x"], None, "", "", "not installed"), grpc.StatusCode.FAILED_PRECONDITION),
    (privileged.DeviceBusy(["x"], 1, "", "busy"), grpc.StatusCode.FAILED_PRECONDITION),
    (privileged.HasFilesystem("/dev/loop1 already holds ext4"), grpc.StatusCode.FAILED_PRECONDITION),
    (privileged.MountError("not there"), grpc.StatusCode.INTERNAL),
    (privileged.FreezeTimeout("overran"), grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_every_privileged_error_has_its_status(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_for(exc).code == code
    if isinstance(exc, privileged.CommandError):
        assert isinstance(exc, privileged.CommandError)  # callers catching CommandError still catch it
