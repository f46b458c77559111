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
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from csi_driver.datapath import fuse_keeper, fuse_session, privileged
from tests.csi.conftest import REPO
from tests.datapath.conftest import needs_kernel
from tests.datapath.test_engine_process import EngineProc, _unstage_leftovers
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

    def resume(self) -> None:
        """A new engine stand-in takes the connection back from the keeper (an engine restart)."""
        assert self.child is not None and self.child.poll() is not None
        self.child = subprocess.Popen([sys.executable, "-c", _CHILD, self.mount, self.root], cwd=REPO,
                                      env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert self.child.stdout is not None
        assert self.child.stdout.readline().strip() == self.path

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


def test_a_stale_mount_check_and_lazy_unmount_of_a_paused_mount_point_do_not_wait(
        paused_export: Callable[..., PausedExport]) -> None:
    # what the next engine does to a mount it cannot take the connection of back (clear_stale_mount)
    p = paused_export()
    p.pause()
    t, out = in_thread(lambda: (privileged.is_mountpoint(p.mount), privileged.umount(p.mount, lazy=True)))
    t.join(PROMPT)
    finished = not t.is_alive()
    if not finished:
        p.release()
        t.join(60)
    assert finished, f"is_mountpoint and umount -l of a paused FUSE mount point did not finish within {PROMPT:.0f}s"
    assert out == [(True, True)]
    assert not privileged.is_mountpoint(p.mount)


# ------------------------------------------------------------------------------------------------ the bound


def test_the_keeper_aborts_a_connection_no_engine_takes_back_and_writers_get_eio(
        paused_export: Callable[..., PausedExport]) -> None:
    bound = 2.0
    p = paused_export(abort_after=bound)
    client = fuse_keeper.KeeperClient(p.sock)
    dev = fuse_session.mount_dev(p.mount)
    # a connection its engine serves is never aborted, however long it lives
    time.sleep(bound + 1)  # nothing to wait for: the abort must not happen
    assert write_block(p.loop) == "ok"
    assert client.keys() == [p.mount]

    # a restart within the bound: the clock stops when the next engine takes the connection back
    p.pause()
    p.resume()
    time.sleep(bound + 1)
    assert write_block(p.loop) == "ok"
    assert client.keys() == [p.mount]

    # no engine comes back: a writer blocked in the kernel gets EIO once the bound has passed
    p.pause()
    t0 = time.monotonic()
    got = write_block(p.loop, timeout=bound + 30)
    took = time.monotonic() - t0
    assert got == "EIO", f"{got} after {took:.1f}s\n{p.keeper_log()}"
    assert bound - 0.5 < took < bound + 15, took
    assert client.keys() == []
    with open(fuse_keeper.aborted_path(p.sock)) as f:
        rec = json.load(f)[p.mount]
    assert rec["after"] == bound and rec["dev"] == dev and rec["how"] in ("closed", "fusectl abort")
    assert "aborted a FUSE connection no process took back" in p.keeper_log()
    # later I/O fails at once, not after another wait
    t0 = time.monotonic()
    assert write_block(p.loop, timeout=30) == "EIO"
    assert time.monotonic() - t0 < 10


def test_the_next_engine_reports_the_abort_in_the_volume_condition(
        workdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The restart path with an engine process (its own keeper, bound 2 s): SIGKILL, no engine for longer than
    the bound, then the next engine's NodeGetVolumeStats says the keeper aborted the connection."""
    from csi_driver.remote.client import RemoteBackend

    monkeypatch.setenv("CSI_FLASHCOPY_FUSE_KEEPER_ABORT_AFTER", "2")  # the engine's flag, by its env
    engine_proc = EngineProc(Path(workdir)).start()
    b = RemoteBackend(engine_proc.endpoint)
    try:
        v = b.create_volume("blk", 16 * MiB, grain_size=64 * 1024, attrs={})
        stg = f"{workdir}/stg/blk"
        b.node_stage(v.id, stg, block=True, fs_type="")
        assert b.node_stats(v.id, stg).message == "healthy"
        with open(engine_proc.state / "staging.json") as f:
            loop_dev = json.load(f)["staged"][0]["loop_device"]
        assert write_block(loop_dev) == "ok"
        assert engine_proc.stop(signal.SIGKILL) == -signal.SIGKILL
        assert write_block(loop_dev, timeout=40) == "EIO"  # the keeper aborted the paused connection
        engine_proc.start()
        st = b.node_stats(v.id, stg)
        assert st.abnormal
        assert "the FUSE keeper aborted this volume's engine connection" in st.message, st.message
        assert "no engine process took it back within 2s" in st.message, st.message
        b.node_unstage(v.id, stg)  # unstaging cleans the dead device up (staging again would rebuild it)
        b.delete_volume(v.id)
    finally:
        b.close()
        _unstage_leftovers(engine_proc)
        assert engine_proc.stop() == 0, engine_proc.log()[-3000:]
