"""The privileged verbs over a fake runner, without root: the commands they run (argv, per-verb timeouts, ok
codes), how they classify a failure (busy from the tool's exit status where it has one, from strerror(EBUSY) where
it has not), and their re-checks of the live system, which tests point at a sample mount table and a fake sysfs.
One real test (root only) unmounts a busy tmpfs."""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.datapath import privileged
from csi_driver.datapath.privileged import fs, loop
from csi_driver.datapath.privileged import runner as runner_mod
from csi_driver.status import status_for

mount_mod = importlib.import_module("csi_driver.datapath.privileged.mount")  # the function `mount` shadows it
freeze_mod = importlib.import_module("csi_driver.datapath.privileged.freeze")

Answer = tuple[int, str, str]


class FakeRunner:
    """Records every call; answers by argv[0] from a table: (returncode, stdout, stderr), or a function of argv
    returning that (to change the fake system, e.g. drop a mount, as the real command would)."""

    def __init__(self, answers: dict[str, Answer | Callable[[list[str]], Answer]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[list[str], float, tuple[int, ...]]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float = privileged.DEFAULT_TIMEOUT,
                 ok_codes: Collection[int] = (0,), input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), timeout, tuple(ok_codes)))
        answer = self.answers.get(argv[0], (0, "", ""))
        code, out, err = answer(list(argv)) if callable(answer) else answer
        return runner_mod.check(argv, code, out, err, ok_codes)

    @property
    def argvs(self) -> list[list[str]]:
        return [c[0] for c in self.calls]


# ---------------------------------------------------------------------------------------------- mount, umount


class FakeTable:
    """A mountinfo file that mounts() reads instead of /proc/self/mountinfo."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._next = 100
        self.write()

    def add(self, mount_point: str, source: str = "fake-src", fstype: str = "ext4", opts: str = "rw") -> None:
        self._next += 1
        mp = mount_point.replace("\\", "\\134").replace(" ", "\\040")
        self.lines.append(f"{self._next} 1 7:9 / {mp} {opts},relatime shared:1 - {fstype} {source} rw")
        self.write()

    def drop_top(self, mount_point: str) -> None:
        mp = mount_point.replace("\\", "\\134").replace(" ", "\\040")
        idx = [i for i, line in enumerate(self.lines) if line.split(" ")[4] == mp]
        if idx:
            del self.lines[idx[-1]]
        self.write()

    def write(self) -> None:
        self.path.write_text("".join(line + "\n" for line in self.lines))


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTable:
    t = FakeTable(tmp_path / "mountinfo")
    monkeypatch.setattr(mount_mod, "MOUNTINFO_PATH", str(t.path))
    return t


@pytest.fixture
def target(tmp_path: Path) -> str:
    d = tmp_path / "tgt with space"
    d.mkdir()
    return str(d)


def test_umount_of_nothing_runs_nothing(table: FakeTable, target: str) -> None:
    fake = FakeRunner()
    assert privileged.umount(target, runner=fake) is False
    assert fake.calls == []


def test_umount_runs_until_every_stacked_mount_is_gone(table: FakeTable, target: str) -> None:
    table.add(target)
    table.add(target, source="second")

    def umount(argv: list[str]) -> Answer:
        table.drop_top(argv[-1])
        return (0, "", "")

    fake = FakeRunner({"umount": umount})
    assert privileged.umount(target, runner=fake) is True
    assert fake.calls == [(["umount", target], privileged.UMOUNT_TIMEOUT, (0,))] * 2
    assert not privileged.is_mountpoint(target)
    table.add(target)
    fake = FakeRunner({"umount": umount})
    assert privileged.umount(target, lazy=True, timeout=7.0, runner=fake) is True
    assert fake.calls == [(["umount", "-l", target], 7.0, (0,))]


def test_umount_busy_is_classified_by_exit_status(table: FakeTable, target: str) -> None:
    table.add(target)
    # umount(8) exit 32 ("umount failure") and the mount still there: busy, whatever (or nothing) it printed
    fake = FakeRunner({"umount": (mount_mod.MNT_EX_FAIL, "", "")})
    with pytest.raises(privileged.DeviceBusy) as ei:
        privileged.umount(target, runner=fake)
    assert ei.value.returncode == 32 and ei.value.argv == ["umount", target]
    assert status_for(ei.value).code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(fake.calls) == 1
    # another status (1: usage or permissions) is not "busy", even if the text says so
    fake = FakeRunner({"umount": (1, "", "umount: target is busy.")})
    with pytest.raises(privileged.CommandError) as e2:
        privileged.umount(target, runner=fake)
    assert type(e2.value) is privileged.CommandError
    assert status_for(e2.value).code == grpc.StatusCode.INTERNAL


def test_umount_failure_with_the_mount_gone_is_success(table: FakeTable, target: str) -> None:
    table.add(target)

    def raced(argv: list[str]) -> Answer:  # someone else unmounted it first: umount says "not mounted"
        table.drop_top(argv[-1])
        return (mount_mod.MNT_EX_FAIL, "", f"umount: {argv[-1]}: not mounted.")

    assert privileged.umount(target, runner=FakeRunner({"umount": raced})) is True


def test_umount_gives_up_on_a_mount_that_does_not_go(table: FakeTable, target: str) -> None:
    table.add(target)
    fake = FakeRunner()  # "succeeds" but the table keeps showing the mount
    with pytest.raises(privileged.MountError):
        privileged.umount(target, runner=fake)
    assert len(fake.calls) == mount_mod.UMOUNT_ATTEMPTS


def test_mount_runs_mount_and_checks_the_table(table: FakeTable, target: str) -> None:
    def mount(argv: list[str]) -> Answer:
        table.add(argv[-1], source=argv[-2], fstype="ext4", opts="ro" if "ro" in argv[-3].split(",") else "rw")
        return (0, "", "")

    fake = FakeRunner({"mount": mount})
    m = privileged.mount("fake-src", target, fstype="ext4", options=["discard"], read_only=True, runner=fake)
    assert fake.calls == [(["mount", "-t", "ext4", "-o", "discard,ro", "fake-src", target],
                           privileged.MOUNT_TIMEOUT, (0,))]
    assert m.mount_point == target and m.source == "fake-src" and m.read_only
    # idempotent: the same mount is accepted without a command; a different one there is refused
    fake = FakeRunner()
    assert privileged.mount("fake-src", target, fstype="ext4", read_only=True, runner=fake) == m
    with pytest.raises(privileged.MountError):
        privileged.mount("other-src", target, fstype="ext4", read_only=True, runner=fake)
    assert fake.calls == []


def test_mount_reported_success_without_a_mount_is_an_error(table: FakeTable, target: str) -> None:
    with pytest.raises(privileged.MountError) as ei:
        privileged.mount("fake-src", target, fstype="xfs", runner=FakeRunner())
    assert status_for(ei.value).code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("code, stderr, busy", [
    (32, "mount: /t: /dev/loop3 already mounted or mount point busy.", True),
    (32, "mount: /t: wrong fs type, bad option, bad superblock on /dev/loop3.", False),
    (1, "mount: only root can do that (busy)", False),  # not a mount(2) failure: exit status first
])
def test_mount_busy_needs_the_mount_failure_status(table: FakeTable, target: str, code: int, stderr: str,
                                                   busy: bool) -> None:
    with pytest.raises(privileged.CommandError) as ei:
        privileged.mount("/dev/nonexistent-loop", target, fstype="ext4", runner=FakeRunner({"mount": (code, "",
                                                                                                       stderr)}))
    assert (type(ei.value) is privileged.DeviceBusy) is busy and (type(ei.value) is privileged.CommandError) != busy
    assert ei.value.returncode == code and stderr in str(ei.value)


def test_mount_failure_that_left_the_mount_is_accepted(table: FakeTable, target: str) -> None:
    def already(argv: list[str]) -> Answer:  # a concurrent caller mounted the same source first
        table.add(argv[-1], source=argv[-2])
        return (32, "", "mount: already mounted")

    m = privileged.mount("fake-src", target, runner=FakeRunner({"mount": already}))
    assert m.source == "fake-src"


# ---------------------------------------------------------------------------------------------- loop devices

EBUSY = os.strerror(errno.EBUSY)


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = tmp_path / "sys-block"
    for name, backing, dio, ro in (("loop3", "/data/vol 1", "1", "0"), ("loop7", "/data/vol-2", "0", "1")):
        (base / name / "loop").mkdir(parents=True)
        (base / name / "loop" / "backing_file").write_text(backing + "\n")
        (base / name / "loop" / "dio").write_text(dio + "\n")
        (base / name / "ro").write_text(ro + "\n")
    (base / "loop0").mkdir()  # free: no loop/backing_file
    (base / "sda").mkdir()
    monkeypatch.setattr(loop, "SYS_BLOCK", str(base))
    return base


def test_list_loops_reads_sysfs(sysfs: Path) -> None:
    assert privileged.list_loops() == [privileged.LoopInfo("/dev/loop3", "/data/vol 1", True, False),
                                       privileged.LoopInfo("/dev/loop7", "/data/vol-2", False, True)]


def test_loops_for_reads_sysfs_and_skips_unlinked_files(sysfs: Path) -> None:
    assert privileged.loops_for("/data/vol 1") == ["/dev/loop3"]
    assert privileged.loops_for("/data/./vol-2") == ["/dev/loop7"]
    assert privileged.loops_for("/data/vol") == []
    # a device on a file unlinked since backs another file than the one the name gives now
    (sysfs / "loop3" / "loop" / "backing_file").write_text("/data/vol 1 (deleted)\n")
    assert privileged.loops_for("/data/vol 1") == []


def test_attach_reuses_or_attaches(sysfs: Path) -> None:
    fake = FakeRunner({"losetup": (1, "", "should not run")})
    assert privileged.attach_loop("/data/vol-2", runner=fake) == "/dev/loop7"
    assert fake.calls == []  # found in sysfs: no command asks every device
    fake = FakeRunner({"losetup": lambda argv: (0, "/dev/loop9\n", "") if "--find" in argv else (1, "", "")})
    assert privileged.attach_loop("/data/f", read_only=True, runner=fake) == "/dev/loop9"
    assert fake.argvs == [["losetup", "--find", "--show", "--direct-io=on", "--read-only", "/data/f"]]
    assert fake.calls[0][1] == privileged.LOSETUP_TIMEOUT
    fake = FakeRunner({"losetup": (0, "something odd\n", "")})
    with pytest.raises(privileged.CommandError, match="unexpected output"):
        privileged.attach_loop("/data/f", reuse=False, direct_io=False, runner=fake)
    assert fake.argvs == [["losetup", "--find", "--show", "/data/f"]]


def test_losetup_busy_is_classified_from_its_strerror_text() -> None:
    # losetup(8) exits 1 for every failure: the EBUSY text is all it gives
    fake = FakeRunner({"losetup": (1, "", f"losetup: /data/f: failed to set up loop device: {EBUSY}\n")})
    with pytest.raises(privileged.DeviceBusy) as ei:
        privileged.attach_loop("/data/f", reuse=False, runner=fake)
    assert status_for(ei.value).code == grpc.StatusCode.FAILED_PRECONDITION and EBUSY in str(ei.value)
    fake = FakeRunner({"losetup": (1, "", "losetup: /data/f: failed to set up loop device: Permission denied\n")})
    with pytest.raises(privileged.CommandError) as e2:
        privileged.attach_loop("/data/f", reuse=False, runner=fake)
    assert type(e2.value) is privileged.CommandError


def test_detach_busy_retries_then_raises_device_busy(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "DETACH_RETRY_SECONDS", 0.3)
    fake = FakeRunner({"losetup": (1, "", f"losetup: /dev/loop7: detach failed: {EBUSY}\n")})
    with pytest.raises(privileged.DeviceBusy):
        privileged.detach_loop("/dev/loop7", runner=fake)
    assert len(fake.calls) >= 2 and set(map(tuple, fake.argvs)) == {("losetup", "-d", "/dev/loop7")}
    assert fake.calls[0][1] == privileged.LOSETUP_TIMEOUT


def test_detach_done_or_already_free(sysfs: Path) -> None:
    def detach(argv: list[str]) -> Answer:
        (sysfs / os.path.basename(argv[-1]) / "loop" / "backing_file").unlink()
        return (0, "", "")

    fake = FakeRunner({"losetup": detach})
    privileged.detach_loop("/dev/loop3", runner=fake)
    assert fake.argvs == [["losetup", "-d", "/dev/loop3"]]
    fake = FakeRunner({"losetup": (1, "", "should not run")})
    privileged.detach_loop("/dev/loop3", runner=fake)  # free now
    privileged.detach_loop("/dev/loop0", runner=fake)  # never attached
    assert fake.calls == []


def test_refresh_capacity() -> None:
    fake = FakeRunner()
    privileged.refresh_loop_capacity("/dev/loop3", runner=fake)
    assert fake.calls == [(["losetup", "-c", "/dev/loop3"], privileged.LOSETUP_TIMEOUT, (0,))]


# ---------------------------------------------------------------------------------------------- filesystems


def test_probe_and_mkfs() -> None:
    fake = FakeRunner({"blkid": (0, "DEVNAME=/dev/loop9\nTYPE=xfs\nUUID=1-2\nnot a pair\n", "")})
    assert privileged.probe("/dev/loop9", runner=fake) == {"DEVNAME": "/dev/loop9", "TYPE": "xfs", "UUID": "1-2"}
    assert privileged.filesystem_type("/dev/loop9", runner=fake) == "xfs"
    assert fake.calls[0] == (["blkid", "-p", "-o", "export", "/dev/loop9"], privileged.PROBE_TIMEOUT,
                             (0, fs.BLKID_NOTHING_FOUND))

    fake = FakeRunner({"blkid": (fs.BLKID_NOTHING_FOUND, "", "")})
    assert privileged.probe("/dev/loop9", runner=fake) == {}
    privileged.mkfs("/dev/loop9", "ext4", prezeroed=True, runner=fake)
    privileged.mkfs("/dev/loop9", "ext4", runner=fake)
    privileged.mkfs("/dev/loop9", "xfs", timeout=5.0, runner=fake)
    mk = [c for c in fake.calls if c[0][0].startswith("mkfs")]
    assert mk == [
        (["mkfs.ext4", "-q", "-F", "-E", "nodiscard,assume_storage_prezeroed=1", "/dev/loop9"],
         privileged.MKFS_TIMEOUT, (0,)),
        (["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "/dev/loop9"], privileged.MKFS_TIMEOUT, (0,)),
        (["mkfs.xfs", "-q", "-K", "/dev/loop9"], 5.0, (0,)),
    ]
    with pytest.raises(ValueError):
        privileged.mkfs("/dev/loop9", "btrfs", runner=fake)


@pytest.mark.parametrize("answer", [(0, "PTTYPE=gpt\n", ""), (0, "TYPE=ext4\n", ""),
                                    (fs.BLKID_AMBIVALENT, "", "ambivalent result")])
def test_mkfs_never_formats_over_content(answer: Answer) -> None:
    fake = FakeRunner({"blkid": answer})
    with pytest.raises(privileged.HasFilesystem) as ei:
        privileged.mkfs("/dev/loop9", "xfs", runner=fake)
    assert status_for(ei.value).code == grpc.StatusCode.FAILED_PRECONDITION
    assert fake.argvs == [["blkid", "-p", "-o", "export", "/dev/loop9"]]


def test_fs_tools_busy_from_strerror_text() -> None:
    fake = FakeRunner({"blkid": (2, "", ""), "mkfs.xfs": (1, "", f"mkfs.xfs: cannot open /dev/loop9: {EBUSY}\n")})
    with pytest.raises(privileged.DeviceBusy):
        privileged.mkfs("/dev/loop9", "xfs", runner=fake)
    fake = FakeRunner({"e2fsck": (8, "", f"e2fsck: {EBUSY} while trying to open /dev/loop9\n")})
    with pytest.raises(privileged.DeviceBusy):
        privileged.grow_ext4_offline("/dev/loop9", runner=fake)
    fake = FakeRunner({"e2fsck": (4, "", "/dev/loop9: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.\n")})
    with pytest.raises(privileged.CommandError) as ei:
        privileged.grow_ext4_offline("/dev/loop9", runner=fake)
    assert type(ei.value) is privileged.CommandError and fake.argvs == [["e2fsck", "-f", "-p", "/dev/loop9"]]


def test_grow_and_resize_commands() -> None:
    fake = FakeRunner({"e2fsck": (1, "", "")})  # 1: errors corrected (a journal replayed) is fine
    privileged.grow_ext4_offline("/dev/loop9", runner=fake)
    assert fake.calls == [(["e2fsck", "-f", "-p", "/dev/loop9"], privileged.RESIZE_TIMEOUT, fs.E2FSCK_OK),
                          (["resize2fs", "/dev/loop9"], privileged.RESIZE_TIMEOUT, (0,))]
    fake = FakeRunner()
    privileged.resize_filesystem("/dev/loop9", "/mnt/s", "ext4", runner=fake)
    privileged.resize_filesystem("/dev/loop9", "/mnt/s", "xfs", runner=fake)
    assert fake.argvs == [["resize2fs", "/dev/loop9"], ["xfs_growfs", "/mnt/s"]]
    assert {c[1] for c in fake.calls} == {privileged.RESIZE_TIMEOUT}
    with pytest.raises(ValueError):
        privileged.resize_filesystem("/dev/loop9", "/mnt/s", "vfat", runner=fake)


def test_ext4_size_from_the_superblock() -> None:
    out = "dumpe2fs 1.47.0\nFilesystem volume name:   <none>\nBlock count:              2560\n" \
          "Block size:               4096\nFilesystem created:       Mon Jan  1 00:00:00 2026\n"
    fake = FakeRunner({"dumpe2fs": (0, out, "")})
    assert privileged.ext4_size("/dev/loop9", runner=fake) == 2560 * 4096
    assert fake.calls == [(["dumpe2fs", "-h", "/dev/loop9"], privileged.PROBE_TIMEOUT, (0,))]


# ---------------------------------------------------------------------------------------------- freeze


class FakeIoctl:
    """Stands in for fcntl.ioctl: records (request, path) and fails as told per path."""

    def __init__(self, fail: dict[tuple[int, str], int] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, fd: int, request: int, arg: int = 0) -> Any:
        path = os.readlink(f"/proc/self/fd/{fd}")
        name = {freeze_mod._FIFREEZE: "freeze", freeze_mod._FITHAW: "thaw"}[request]
        self.calls.append((name, path))
        code = self.fail.get((request, path))
        if code is not None:
            raise OSError(code, os.strerror(code))
        return 0


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[list[str]]:
    ds = [str(tmp_path / n) for n in ("a", "b", "c")]
    for d in ds:
        os.mkdir(d)
    yield ds


def test_freeze_errors_by_errno(dirs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = dirs
    fake = FakeIoctl({(freeze_mod._FIFREEZE, a): errno.EBUSY, (freeze_mod._FIFREEZE, b): errno.EOPNOTSUPP,
                      (freeze_mod._FITHAW, a): errno.EINVAL, (freeze_mod._FITHAW, b): errno.EPERM})
    monkeypatch.setattr(fcntl, "ioctl", fake)
    with pytest.raises(privileged.DeviceBusy) as ei:  # EBUSY: frozen already
        privileged.freeze(a)
    assert status_for(ei.value).code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(OSError) as e2:  # no freeze support: the ioctl's own error
        privileged.freeze(b)
    assert e2.value.errno == errno.EOPNOTSUPP
    privileged.freeze(c)
    assert privileged.thaw(c) is True
    assert privileged.thaw(a) is False  # EINVAL: not frozen, so thawing twice is harmless
    with pytest.raises(PermissionError):
        privileged.thaw(b)


def test_frozen_thaws_what_it_froze_and_only_that(dirs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = dirs
    fake = FakeIoctl({(freeze_mod._FIFREEZE, b): errno.EBUSY})  # b is someone else's freeze
    monkeypatch.setattr(fcntl, "ioctl", fake)
    with pytest.raises(privileged.DeviceBusy), privileged.frozen([a, b, c]):
        raise AssertionError("the body must not run")
    assert fake.calls == [("freeze", a), ("freeze", b), ("thaw", a)]  # b is not thawed, c never frozen

    fake.calls.clear()
    with pytest.raises(KeyError), privileged.frozen([a, c]):
        assert fake.calls == [("freeze", a), ("freeze", c)]
        raise KeyError("the body failed")
    assert fake.calls[2:] == [("thaw", c), ("thaw", a)]  # thawed on error too, in reverse order


def test_frozen_watchdog_thaws_an_overrunning_body(dirs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    a, _b, _c = dirs
    fake = FakeIoctl()
    monkeypatch.setattr(fcntl, "ioctl", fake)
    thawed = threading.Event()
    with pytest.raises(privileged.FreezeTimeout) as ei, privileged.frozen([a], max_seconds=0.2):
        # the body waits for the watchdog's thaw (it must come within the window, not at the end)
        from tests.waiting import wait_for

        wait_for(lambda: ("thaw", a) in fake.calls, timeout=10, what="the watchdog's thaw")
        thawed.set()
    assert thawed.is_set() and fake.calls == [("freeze", a), ("thaw", a)]  # thawed once, not again at the end
    assert isinstance(ei.value, TimeoutError) and status_for(ei.value).code == grpc.StatusCode.DEADLINE_EXCEEDED


# ---------------------------------------------------------------------------------------------- real, root only


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
def test_real_umount_of_a_busy_tmpfs_is_device_busy() -> None:
    # not under pytest's tmp_path: another pytest session's cleanup may rename that away while it is mounted
    base = tempfile.mkdtemp(prefix="csi-fc-busy-")
    mp = os.path.join(base, "busy mnt")
    os.mkdir(mp)
    privileged.mount("csi-flashcopy-test", mp, fstype="tmpfs", options=["size=1m"])
    try:
        assert privileged.mounts_at(mp)[-1].fstype == "tmpfs"
        with open(os.path.join(mp, "held"), "w"):
            with pytest.raises(privileged.DeviceBusy) as ei:
                privileged.umount(mp)
            assert ei.value.returncode == mount_mod.MNT_EX_FAIL and privileged.is_mountpoint(mp)
        assert privileged.umount(mp) is True and not privileged.is_mountpoint(mp)
    finally:
        if privileged.is_mountpoint(mp):
            privileged.umount(mp, lazy=True)
        os.rmdir(mp)
        os.rmdir(base)
