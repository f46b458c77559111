"""A paused FUSE export (its engine process gone, a keeper holding the connection) must not stall the node.

Real parts only: a child process serves a FuseExport (a volume in memory) whose connection a real keeper holds;
a loop device with direct I/O sits on the volume's file; the child is SIGKILLed, so I/O on that device waits for
an engine that never comes. Then:
- finding and attaching loop devices for other files (NodeStage of an unrelated volume) does not wait on it:
  loop devices are found from sysfs, never by asking every device (`losetup -j` hangs on this one);
- the keeper aborts the connection once no engine has taken it back within --abort-after: a writer blocked in
  the kernel gets EIO instead of sleeping forever, and the next engine's volume condition says why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from csi_driver.datapath import fuse_keeper, privileged
from tests.csi.conftest import REPO
from tests.datapath.conftest import needs_kernel
from tests.waiting import wait_for

pytestmark = [needs_kernel, pytest.mark.root]

MiB = 1 << 20
#: how long an operation that must not wait on the paused device may take (it takes well under a second)
PROMPT = 20.0

# The engine stand-in: serves one in-memory volume file, hands the connection to the keeper beside it.
_CHILD = """
import sys, time
from csi_driver.datapath.fuse_export import FuseExport
from tests.datapath.fuse_requests import MemTarget
x = FuseExport(sys.argv[1], keeper_dir=sys.argv[2], keeper_external=True)
x.add("vol", MemTarget(8 << 20))
x.start()
print(x.path("vol"), flush=True)
time.sleep(3600)
"""

# A writer of one 4 KiB block with O_DIRECT + fsync: prints "ok" or the errno name.
_WRITER = """
import errno, mmap, os, sys
buf = mmap.mmap(-1, 4096)
buf[:5] = b"hello"
try:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
    os.pwritev(fd, [buf], 0)
    os.fsync(fd)
    print("ok", flush=True)
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"""


class PausedExport:
    """A keeper process, an engine stand-in serving <root>/exports/vol, and a loop device on that file."""

    def __init__(self, root: str, *, abort_after: float | None = None) -> None:
        self.root = root
        self.mount = os.path.join(root, "exports")
        self.sock = fuse_keeper.socket_path(root)
        self.abort_after = abort_after
        self.keeper: subprocess.Popen[bytes] | None = None
        self.child: subprocess.Popen[str] | None = None
        self.path = ""
        self.loop = ""
        self.env = dict(os.environ, PYTHONPATH=str(REPO))

    def start(self) -> PausedExport:
        os.makedirs(self.root, exist_ok=True)
        argv = [sys.executable, "-m", "csi_driver", "fuse-keeper", "--socket", self.sock, "--idle-exit", "0"]
        if self.abort_after is not None:
            argv += ["--abort-after", str(self.abort_after)]
        with open(self.keeper_log_path, "ab") as log:
            self.keeper = subprocess.Popen(argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=log)
        keeper = self.keeper
        wait_for(lambda: fuse_keeper.KeeperClient(self.sock).ping() == keeper.pid or keeper.poll() is not None,
                 timeout=20, what="the keeper", why=self.keeper_log)
        assert keeper.poll() is None, self.keeper_log()
        self.child = subprocess.Popen([sys.executable, "-c", _CHILD, self.mount, self.root], cwd=REPO,
                                      env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert self.child.stdout is not None
        self.path = self.child.stdout.readline().strip()
        assert self.path == os.path.join(self.mount, "vol"), self.keeper_log()
        wait_for(lambda: fuse_keeper.KeeperClient(self.sock).keys() == [self.mount], what="the put")
        self.loop = privileged.attach_loop(self.path, reuse=False)
        assert write_block(self.loop) == "ok"
        return self

    @property
    def keeper_log_path(self) -> str:
        return os.path.join(self.root, "keeper-test.log")

    def keeper_log(self) -> str:
        with open(self.keeper_log_path, errors="replace") as f:
            return f.read()

    def pause(self) -> None:
        """The engine dies; the keeper's copy keeps the connection: I/O on the loop device now waits."""
        assert self.child is not None
        self.child.kill()
        self.child.wait()

    def release(self) -> None:
        """End the pause the hard way: the keeper closes its copy, the kernel aborts the connection (EIO)."""
        with contextlib.suppress(fuse_keeper.KeeperError):
            fuse_keeper.KeeperClient(self.sock).drop(self.mount)

    def cleanup(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        self.release()
        if self.keeper is not None:
            self.keeper.send_signal(signal.SIGTERM)  # closes whatever it holds
            self.keeper.wait(30)
        if self.loop:
            privileged.detach_loop(self.loop)
        with contextlib.suppress(privileged.CommandError):
            if privileged.is_mountpoint(self.mount):
                privileged.umount(self.mount, lazy=True)


@pytest.fixture
def paused_export(workdir: str) -> Iterator[Callable[..., PausedExport]]:
    made: list[PausedExport] = []

    def make(**kw: float) -> PausedExport:
        p = PausedExport(os.path.join(workdir, "paused"), **kw)
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.cleanup()


def write_block(device: str, timeout: float = 30.0) -> str:
    """One O_DIRECT write + fsync in a child process: "ok", an errno name, or "timeout" (then it is killed:
    a writer blocked on a paused FUSE request dies once the connection is aborted)."""
    p = subprocess.Popen([sys.executable, "-c", _WRITER, device], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return "timeout"
    return out.strip()


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run fn in a daemon thread; the list gets its result or exception."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# ------------------------------------------------------------------------------------------------ lookups


def test_loop_lookups_and_a_stage_of_another_volume_do_not_wait_on_a_paused_device(
        paused_export: Callable[..., PausedExport], engine: object, datapath: object, workdir: str) -> None:
    p = paused_export()
    p.pause()
    # the pause is real: a write to its device waits
    assert write_block(p.loop, timeout=2) == "timeout"

    other = Path(workdir) / "other.img"
    other.write_bytes(bytes(MiB))
    vol = engine.create_volume("other", 16 * MiB)  # type: ignore[attr-defined]
    stg = f"{workdir}/stg/other"

    def work() -> tuple[list[str], list[str], str]:
        found = privileged.loops_for(p.path)  # the paused device itself, from sysfs
        attached = privileged.attach_loop(str(other))
        again = privileged.loops_for(str(other))
        privileged.detach_loop(attached)
        datapath.stage(vol.id, stg, block=False, fs_type="ext4")  # type: ignore[attr-defined]
        return found, again, attached

    t, out = in_thread(work)
    t.join(PROMPT)
    finished = not t.is_alive()
    if not finished:
        p.release()  # so the stuck lookup returns and the teardown can run
        t.join(120)
    assert finished, f"loop lookups / NodeStage of an unrelated volume did not finish within {PROMPT:.0f}s"
    assert not isinstance(out[0], BaseException), out[0]
    found, again, attached = cast("tuple[list[str], list[str], str]", out[0])
    assert found == [p.loop]
    assert again == [attached]
    datapath.unstage(vol.id, stg)  # type: ignore[attr-defined]
