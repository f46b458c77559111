"""The FUSE keeper with real processes and real sockets: descriptors handed over and back (pipes stand in for
/dev/fuse, the keeper does not care what it holds), errors, the socket's mode and owner check, the exits (idle,
SIGTERM while holding) and ensure_keeper's detached start. Needs no root (one owner-check test does).

Every keeper a test starts, itself or through ensure_keeper, is killed in the fixture's teardown.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from csi_driver.datapath import fuse_keeper
from csi_driver.datapath.fuse_keeper import KeeperClient, KeeperError, KeeperUnavailable, ensure_keeper
from tests.waiting import wait_for, wait_process_exit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _keeper_pids(marker: str) -> list[int]:
    """Keeper processes whose command line names marker (this test's own directory)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if b"fuse-keeper" in argv and any(marker.encode() in a for a in argv):
            found.append(int(name))
    return found


class Keepers:
    def __init__(self, root: str) -> None:
        self.root = root  # short: unix socket paths are limited to 107 bytes
        self.sock = fuse_keeper.socket_path(root)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *, idle_exit: float = 30.0, sock: str | None = None,
              abort_after: float | None = None) -> subprocess.Popen[bytes]:
        path = sock or self.sock
        extra = [] if abort_after is None else ["--abort-after", str(abort_after)]
        with open(os.path.join(self.root, "keeper-test.log"), "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "csi_driver", "fuse-keeper", "--socket", path,
                                  "--idle-exit", str(idle_exit), *extra], cwd=REPO, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log)
        self.procs.append(p)
        wait_for(lambda: KeeperClient(path).ping() == p.pid or p.poll() is not None, timeout=20,
                 what="the keeper to answer", why=self.log)
        assert p.poll() is None, self.log()
        return p

    def log(self) -> str:
        out = ""
        for name in ("keeper-test.log", "fuse-keeper.log"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out += f"--- {name}\n{f.read()}"
        return out

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        # the detached ones (ensure_keeper's): not our children, found by this test's directory
        for pid in _keeper_pids(self.root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            wait_process_exit(pid, timeout=10, what="a keeper killed in teardown")


@pytest.fixture
def keepers() -> Iterator[Keepers]:
    root = tempfile.mkdtemp(prefix="fk-", dir="/tmp")
    k = Keepers(root)
    open(os.path.join(root, "keeper-test.log"), "ab").close()
    try:
        yield k
    finally:
        k.cleanup()
        assert not _keeper_pids(root), "a keeper survived the teardown"
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pipes() -> Iterator[Callable[[], tuple[int, int]]]:
    opened: list[int] = []

    def make() -> tuple[int, int]:
        r, w = os.pipe()
        opened.extend((r, w))
        return r, w

    yield make
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def at_eof(r: int, timeout: float = 10.0) -> bool:
    """True when the pipe's read end reports EOF (every write end closed) within timeout."""
    ready, _, _ = select.select([r], [], [], timeout)
    return bool(ready) and os.read(r, 4096) == b""


def not_at_eof(r: int) -> bool:
    ready, _, _ = select.select([r], [], [], 0.2)
    return not ready


class Raw:
    """One connection to the keeper, to send anything at all."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def call(self, payload: bytes | dict[str, object], fds: list[int] | None = None) -> tuple[dict[str, object],
                                                                                               list[int]]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        socket.send_fds(self.sock, [data], fds or [])
        msg, got, _flags, _addr = socket.recv_fds(self.sock, 65536, 4)
        reply = json.loads(msg)
        assert isinstance(reply, dict)
        return reply, got

    def close(self) -> None:
        self.sock.close()


def test_a_descriptor_handed_over_comes_back_as_the_same_pipe_also_in_another_process(
        keepers: Keepers, pipes: Callable[[], tuple[int, int]]) -> None:
    keepers.start()
    r, w = pipes()
    KeeperClient(keepers.sock).put("vol-a", w, {"export": "/x", "n": 1})
    os.close(w)  # from here only the keeper holds a write end
    assert not_at_eof(r)

    # another process takes it over through its own client and writes through it
    code = ("import os, sys\n"
            "from csi_driver.datapath.fuse_keeper import KeeperClient\n"
            "fd, meta = KeeperClient(sys.argv[1]).get('vol-a')\n"
            "os.write(fd, ('hello %d ' % meta['n']).encode())\n")
    subprocess.run([sys.executable, "-c", code, keepers.sock], cwd=REPO, check=True, timeout=30)
    assert os.read(r, 100) == b"hello 1 "

    got = KeeperClient(keepers.sock).get("vol-a")
    assert got is not None
    fd, meta = got
    try:
        assert meta == {"export": "/x", "n": 1}
        assert os.fstat(fd).st_ino == os.fstat(r).st_ino  # the same pipe object
        assert not os.get_inheritable(fd)
        os.write(fd, b"again")
        assert os.read(r, 100) == b"again"
    finally:
        os.close(fd)
    assert not_at_eof(r)  # the keeper kept its own copy through both gets


def test_put_replaces_and_closes_the_earlier_descriptor(keepers: Keepers,
                                                       pipes: Callable[[], tuple[int, int]]) -> None:
    keepers.start()
    client = KeeperClient(keepers.sock)
    r1, w1 = pipes()
    r2, w2 = pipes()
    client.put("k", w1, {"gen": 1})
    os.close(w1)
    client.put("k", w2, {"gen": 2})
    os.close(w2)
    assert at_eof(r1)  # the keeper's copy of the first pipe is gone
    got = client.get("k")
    assert got is not None
    fd, meta = got
    assert meta == {"gen": 2}
    os.write(fd, b"2")
    os.close(fd)
    assert os.read(r2, 10) == b"2"
    assert client.keys() == ["k"]


def test_drop_and_keys(keepers: Keepers, pipes: Callable[[], tuple[int, int]]) -> None:
    keepers.start()
    client = KeeperClient(keepers.sock)
    assert client.keys() == []
    ra, wa = pipes()
    _rb, wb = pipes()
    client.put("b", wb, {})
    client.put("a", wa, {})
    os.close(wa)
    os.close(wb)
    assert client.keys() == ["a", "b"]
    assert client.drop("a") is True
    assert at_eof(ra)
    assert client.drop("a") is False
    assert client.get("a") is None
    assert client.keys() == ["b"]


def test_malformed_requests_get_errors_and_the_connection_stays_usable(
        keepers: Keepers, pipes: Callable[[], tuple[int, int]]) -> None:
    p = keepers.start()
    raw = Raw(keepers.sock)
    try:
        for bad in (b"not json", b"[1, 2]", b"\xff\xfe", {"op": "nope"}, {"no": "op"}, {"op": "get"},
                    {"op": "drop", "key": 7}, {"op": "put", "key": "k"}):
            reply, got = raw.call(bad)
            assert reply["ok"] is False and reply["error"], (bad, reply)
            assert got == []
        # a put without exactly one descriptor, or with a bad meta: refused, whatever came along closed
        r1, w1 = pipes()
        r2, w2 = pipes()
        reply, _ = raw.call({"op": "put", "key": "k"}, [w1, w2])
        assert reply["ok"] is False and "exactly one" in str(reply["error"])
        r3, w3 = pipes()
        reply, _ = raw.call({"op": "put", "key": "k", "meta": [1]}, [w3])
        assert reply["ok"] is False
        # descriptors attached to anything but a put are closed too
        r4, w4 = pipes()
        reply, _ = raw.call({"op": "ping"}, [w4])
        assert reply == {"ok": True, "pid": p.pid}
        for w in (w1, w2, w3, w4):
            os.close(w)
        for r in (r1, r2, r3, r4):
            assert at_eof(r)
        reply, _ = raw.call({"op": "list"})
        assert reply == {"ok": True, "keys": []}
    finally:
        raw.close()
    # the client reports the keeper's message
    _r, w = pipes()
    with pytest.raises(KeeperError, match="key") as e:
        KeeperClient(keepers.sock).put("", w, {})
    assert not isinstance(e.value, KeeperUnavailable)
    assert KeeperClient(keepers.sock).ping() == p.pid


def test_no_keeper_is_unavailable(keepers: Keepers) -> None:
    client = KeeperClient(keepers.sock)
    assert client.ping() is None
    with pytest.raises(KeeperUnavailable):
        client.keys()
    # a socket file nobody listens on
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(keepers.sock)
    s.close()
    with pytest.raises(KeeperUnavailable):
        client.get("x")


def test_the_socket_is_0600_and_a_stale_one_is_replaced(keepers: Keepers) -> None:
    # a socket file left by a killed keeper
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(keepers.sock)
    s.close()
    p = keepers.start()
    st = os.stat(keepers.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert os.readlink(f"/proc/{p.pid}/cwd") == "/"


def test_a_second_keeper_on_a_live_socket_refuses_to_start(keepers: Keepers) -> None:
    p = keepers.start()
    ino = os.stat(keepers.sock).st_ino
    res = subprocess.run([sys.executable, "-m", "csi_driver", "fuse-keeper", "--socket", keepers.sock],
                         cwd=REPO, capture_output=True, timeout=30)
    assert res.returncode == 1
    assert b"another FUSE keeper is listening" in res.stderr
    assert os.stat(keepers.sock).st_ino == ino
    assert KeeperClient(keepers.sock).ping() == p.pid


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_peer_of_another_user_is_turned_away(keepers: Keepers) -> None:
    keepers.start()
    # widen the permissions so only the SO_PEERCRED check stands in the way
    os.chmod(keepers.root, 0o711)
    os.chmod(keepers.sock, 0o666)
    # a forked child (the interpreter under /root may not be executable by nobody) connects as nobody
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        outcome = b"?"
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect(keepers.sock)
            s.send(b'{"op":"ping"}')
            outcome = b"reply:" + s.recv(100)
        except OSError as e:
            outcome = f"error:{e.errno}".encode()
        finally:
            os.write(w, outcome)
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        outcome = f.read()
    assert os.waitstatus_to_exitcode(status) == 0
    # turned away: closed unanswered (an empty read), or reset/broken pipe if the close came first
    assert outcome in (b"reply:", f"error:{errno.ECONNRESET}".encode(), f"error:{errno.EPIPE}".encode()), outcome
    assert KeeperClient(keepers.sock).ping() is not None


def test_idle_exit_removes_the_socket_and_ends_the_process(keepers: Keepers) -> None:
    p = keepers.start(idle_exit=0.5)
    assert p.wait(20) == 0
    assert not os.path.exists(keepers.sock)


def test_holding_a_descriptor_keeps_it_running_until_dropped(keepers: Keepers,
                                                            pipes: Callable[[], tuple[int, int]]) -> None:
    p = keepers.start(idle_exit=0.3)
    _r, w = pipes()
    KeeperClient(keepers.sock).put("k", w, {})
    time.sleep(1.0)  # nothing to wait for: it must simply still be there well after idle_exit
    assert p.poll() is None
    assert KeeperClient(keepers.sock).drop("k")
    assert p.wait(20) == 0
    assert not os.path.exists(keepers.sock)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_holding_exits_and_closes_them(keepers: Keepers, pipes: Callable[[], tuple[int, int]],
                                                          sig: signal.Signals) -> None:
    p = keepers.start()
    r, w = pipes()
    KeeperClient(keepers.sock).put("k", w, {})
    os.close(w)
    p.send_signal(sig)
    assert p.wait(20) == 0
    assert not os.path.exists(keepers.sock)
    assert at_eof(r)


def test_sighup_is_ignored(keepers: Keepers) -> None:
    p = keepers.start()
    p.send_signal(signal.SIGHUP)
    assert KeeperClient(keepers.sock).ping() == p.pid
    assert p.poll() is None


def test_ensure_keeper_starts_a_detached_keeper_once(keepers: Keepers) -> None:
    pid = ensure_keeper(keepers.root)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[1]) != os.getpid()  # not our child: re-parented away
    assert os.getsid(pid) == pid  # its own session: our signals and terminal do not reach it
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.path.exists(os.path.join(keepers.root, "fuse-keeper.log"))
    assert ensure_keeper(keepers.root) == pid
    assert _keeper_pids(keepers.root) == [pid]


def test_concurrent_ensure_keeper_calls_end_with_one_keeper(keepers: Keepers) -> None:
    n = 6
    barrier = threading.Barrier(n)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(ensure_keeper(keepers.root, timeout=30))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == n and len(set(results)) == 1, results
    # the keepers that lost the bind exit on their own
    wait_for(lambda: _keeper_pids(keepers.root) == results[:1], timeout=20, what="only one keeper left",
             why=keepers.log)
    assert KeeperClient(keepers.sock).ping() == results[0]


def test_a_descriptor_nobody_serves_is_closed_after_abort_after(keepers: Keepers,
                                                                pipes: Callable[[], tuple[int, int]]) -> None:
    """The bound on a pause, with a pipe for the connection: closing the keeper's copy is what aborts a FUSE
    connection (tests/datapath/test_paused_export.py does it with a real one)."""
    keepers.start(abort_after=1)
    client = KeeperClient(keepers.sock)
    with pytest.raises(KeeperError, match="absent"):
        client.serve("vol-a")  # nothing held under it
    r, w = pipes()
    client.put("vol-a", w, {"dev": "not-a-device"})
    lease = client.serve("vol-a")
    os.close(w)
    # served: kept past the bound, and a second lease holder (a taking-over engine) keeps it too
    second = client.serve("vol-a")
    lease.close()
    time.sleep(1.5)  # nothing to wait for: the keeper must not close it
    assert not_at_eof(r) and client.keys() == ["vol-a"]
    second.close()  # the last server gone: the clock runs
    t0 = time.monotonic()
    assert at_eof(r, timeout=20), keepers.log()
    assert 0.5 < time.monotonic() - t0 < 15
    assert client.keys() == []
    with open(fuse_keeper.aborted_path(keepers.sock)) as f:
        rec = json.load(f)["vol-a"]
    assert rec["after"] == 1 and rec["how"] == "closed" and rec["dev"] == "not-a-device"
    assert stat.S_IMODE(os.stat(fuse_keeper.aborted_path(keepers.sock)).st_mode) == 0o600
    assert fuse_keeper.take_aborted(keepers.root, "vol-a") == rec
    assert fuse_keeper.take_aborted(keepers.root, "vol-a") is None  # taken once


def test_abort_after_zero_never_closes(keepers: Keepers, pipes: Callable[[], tuple[int, int]]) -> None:
    keepers.start(abort_after=0)
    r, w = pipes()
    KeeperClient(keepers.sock).put("vol-a", w, {})
    os.close(w)
    time.sleep(1.5)  # nothing to wait for
    assert not_at_eof(r) and KeeperClient(keepers.sock).keys() == ["vol-a"]
