"""The FUSE keeper: a tiny process that holds /dev/fuse descriptors while the engine process restarts.

A FUSE mount lives as long as some process holds its /dev/fuse descriptor. When the engine process (which
serves the exports) exits, the kernel would abort the connection and every I/O on the mount would fail. The
engine instead hands each descriptor to the keeper (`put`) and the next engine takes it back (`get`): meanwhile
the kernel just queues the requests, so a restart of the engine looks like a pause to the volume's users.

The keeper knows nothing about FUSE: it keeps file descriptors under string keys with a small JSON `meta`
(whatever the engine needs to resume serving), over a unix SOCK_SEQPACKET socket (0600, peers checked with
SO_PEERCRED: root or the keeper's own uid). One message is one JSON object, the descriptor travels as
SCM_RIGHTS. It exits by itself once it has held nothing for `idle_exit` seconds (a node with nothing staged
keeps no process), and on SIGTERM/SIGINT even while holding descriptors (an operator asked; the mounts then
fail like they would without a keeper). `ensure_keeper` starts one detached, like the engine launcher does.

The pause is bounded. A process serving a descriptor says so with `serve` on a connection it keeps open (a
`KeeperLease`); when the last such connection of a key closes (the engine died, or handed over on purpose) and
no process takes the key back within `abort_after` seconds, the keeper closes its copy and, where fusectl is
mounted, writes the connection's `abort` file (the one thing it knows about FUSE: meta "dev" names the
connection): the kernel aborts the FUSE connection and I/O waiting on it fails with EIO instead of sleeping
forever (D state) on a node whose engine never returns. What was aborted is recorded in
`fuse-keeper.aborted.json` beside the socket, for the next engine to tell the volumes' users (`take_aborted`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("csi_flashcopy.fuse_keeper")

SOCKET_NAME = "fuse-keeper.sock"
LOG_NAME = "fuse-keeper.log"
ABORTED_NAME = "fuse-keeper.aborted.json"
#: seconds a held connection may go unserved before the keeper aborts it (0: never)
DEFAULT_ABORT_AFTER = 120.0
#: fusectl (mounted by most distributions): /sys/fs/fuse/connections/<the mount's st_dev>/abort
FUSECTL = "/sys/fs/fuse/connections"
CALL_TIMEOUT = 5.0  # a keeper answers from memory; longer means it is stuck
_MAX_MSG = 64 * 1024  # requests are a key and a small meta
_MAX_FDS = 8  # receive a few so extra ones can be closed instead of being cut off unseen

# The intermediate (as in remote.launcher): start the keeper in a new session, print its pid, exit at once, so
# the keeper is re-parented away from the caller and never gets the caller's signals.
_SPAWN = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=sys.stderr, start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
)


class KeeperError(Exception):
    """The keeper answered with an error (its message), or answered something that is not a reply."""


class KeeperUnavailable(KeeperError):
    """No keeper answers at the socket (no socket file, nobody listening, no reply in time)."""


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


def aborted_path(sock_path: str) -> str:
    """Where a keeper on sock_path records the connections it aborted (beside its socket)."""
    return os.path.join(os.path.dirname(os.path.abspath(sock_path)), ABORTED_NAME)


# ---------------------------------------------------------------------------------------------- server


class _Keeper:
    """The server's state: the descriptors held, the listening socket, the connections."""

    def __init__(self, path: str, idle_exit: float, abort_after: float = DEFAULT_ABORT_AFTER) -> None:
        self.path = path
        self.idle_exit = idle_exit
        self.abort_after = abort_after
        self.held: dict[str, tuple[int, dict[str, Any]]] = {}
        #: the open connections that serve each held key (lease holders), and since when a key has none
        self.servers: dict[str, set[socket.socket]] = {}
        self.unserved_since: dict[str, float] = {}
        self.idle_since = time.monotonic()
        self.stop_signal: int | None = None
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.sock_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file: unlink only ours
        self.uid = os.getuid()

    # -- lifecycle

    def bind(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # The check for a live keeper, the removal of a stale socket and the bind happen under one lock: two
        # keepers starting at once could otherwise both find the old socket stale, and the second would
        # unlink the first's fresh socket and leave it serving nobody.
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self._replace_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            old = os.umask(0o177)  # born 0600: no window in which others may connect
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            sock.listen(64)
            st = os.stat(self.path)
            self.sock_id = (st.st_dev, st.st_ino)
        finally:
            os.close(lock_fd)  # releases the flock
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, "listen")

    def _replace_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.settimeout(2.0)
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # nobody listens: left by a keeper that was killed
            log.info("removed a stale keeper socket", extra={"fields": {"path": self.path}})
            return
        finally:
            probe.close()
        raise RuntimeError(f"another FUSE keeper is listening on {self.path}")

    def close(self) -> None:
        # unlink first so no new client connects to a keeper that is going away, and only if the file is
        # still ours (never remove a successor's socket)
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.sock_id:
                os.unlink(self.path)
        for key in self.sel.get_map().values():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        self.sel.close()
        for fd, _meta in self.held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held.clear()

    # -- the loop

    def run(self) -> None:
        while True:
            if self.stop_signal is not None:
                log.info("stopping on a signal", extra={"fields": {"signal": self.stop_signal,
                                                                   "closing": len(self.held)}})
                return
            self._abort_expired()
            now = time.monotonic()
            if self.held or self.idle_exit <= 0:  # 0: never (a container of its own, restarted if it ends)
                timeout: float | None = None
            else:
                left = self.idle_since + self.idle_exit - now
                if left <= 0:
                    log.info("nothing held: exiting", extra={"fields": {"idle_exit": self.idle_exit}})
                    return
                timeout = left
            due = self._next_abort()
            if due is not None:
                timeout = max(0.0, due - now) if timeout is None else min(timeout, max(0.0, due - now))
            for key, _events in self.sel.select(timeout):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wakeup":
                    _drain(key.fileobj)
                else:
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    self._serve_one(conn)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        if uid not in (0, self.uid):
            # the socket is 0600 already; this also covers a socket whose mode someone widened
            log.warning("refused a peer of another user", extra={"fields": {"pid": pid, "uid": uid}})
            conn.close()
            return
        # non-blocking: one client that stops reading must not stall the keeper for everyone else
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, "conn")

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            data, fds, flags, _addr = socket.recv_fds(conn, _MAX_MSG, _MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_conn(conn)
            return
        if not data and not fds:
            self._drop_conn(conn)  # the peer closed
            return
        # any request counts as activity: a ping from ensure_keeper is usually followed by a put
        self.idle_since = time.monotonic()
        reply_fd: int | None = None
        try:
            if flags & socket.MSG_TRUNC:
                raise _BadRequest(f"message longer than {_MAX_MSG} bytes")
            if flags & socket.MSG_CTRUNC:
                raise _BadRequest(f"more than {_MAX_FDS} descriptors attached")
            reply, reply_fd, fds = self._handle(data, fds)
        except _Serve as e:
            reply = self._serve(conn, e.key)
        except _BadRequest as e:
            reply = {"ok": False, "error": str(e)}
        finally:
            # whatever was attached and not kept is closed here, on every path
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        out = json.dumps(reply, separators=(",", ":")).encode()
        try:
            socket.send_fds(conn, [out], [reply_fd] if reply_fd is not None else [])
        except OSError:
            self._drop_conn(conn)  # gone or not reading: its problem

    def _handle(self, data: bytes, fds: list[int]) -> tuple[dict[str, Any], int | None, list[int]]:
        """(reply, fd to attach, fds still to close)."""
        try:
            req = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise _BadRequest(f"not JSON: {e}") from None
        if not isinstance(req, dict):
            raise _BadRequest("a request is a JSON object")
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}, None, fds
        if op == "list":
            return {"ok": True, "keys": sorted(self.held)}, None, fds
        key = req.get("key")
        if op not in ("put", "get", "drop", "serve"):
            raise _BadRequest(f"unknown op {op!r}")
        if not isinstance(key, str) or not key:
            raise _BadRequest(f"{op} needs a non-empty string key")
        if op == "put":
            meta = req.get("meta", {})
            if not isinstance(meta, dict):
                raise _BadRequest("meta must be a JSON object")
            if len(fds) != 1:
                raise _BadRequest(f"put needs exactly one descriptor attached, got {len(fds)}")
            old = self.held.pop(key, None)
            if old is not None:
                os.close(old[0])  # replaced: the earlier holder's copy must not keep a dead connection alive
            self.held[key] = (fds[0], meta)
            if not self.servers.get(key):
                self.unserved_since[key] = time.monotonic()  # the putter's lease follows at once
            log.info("holding", extra={"fields": {"key": key, "replaced": old is not None}})
            return {"ok": True}, None, []
        if op == "get":
            got = self.held.get(key)
            if got is None:
                return {"ok": False, "error": "absent"}, None, fds
            return {"ok": True, "meta": got[1]}, got[0], fds  # the keeper keeps its own copy
        if op == "serve":
            raise _Serve(key)
        dropped = self.held.pop(key, None)
        self._forget(key)
        if dropped is not None:
            os.close(dropped[0])
            log.info("dropped", extra={"fields": {"key": key}})
        if not self.held:
            self.idle_since = time.monotonic()
        return {"ok": True, "dropped": dropped is not None}, None, fds

    def _drop_conn(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        for key, conns in self.servers.items():
            if conn in conns:
                conns.discard(conn)
                if not conns and key in self.held:
                    # its server died or handed over: the kernel queues the I/O until one takes it back
                    self.unserved_since[key] = time.monotonic()
                    log.info("no process serves the connection", extra={"fields": {
                        "key": key, "abort_after": self.abort_after}})
        conn.close()

    # -- the bound on a pause

    def _serve(self, conn: socket.socket, key: str) -> dict[str, Any]:
        if key not in self.held:
            return {"ok": False, "error": "absent"}  # aborted (or dropped) meanwhile: the caller lost it
        self.servers.setdefault(key, set()).add(conn)
        self.unserved_since.pop(key, None)
        return {"ok": True}

    def _forget(self, key: str) -> None:
        self.servers.pop(key, None)  # their connections stay open; a later close finds nothing to do
        self.unserved_since.pop(key, None)

    def _next_abort(self) -> float | None:
        if self.abort_after <= 0 or not self.unserved_since:
            return None
        return min(self.unserved_since.values()) + self.abort_after

    def _abort_expired(self) -> None:
        due = self._next_abort()
        if due is None or due > time.monotonic():
            return
        for key, since in list(self.unserved_since.items()):
            if since + self.abort_after <= time.monotonic():
                self._abort(key)

    def _abort(self, key: str) -> None:
        """No process took the connection back in time: end it, so waiting I/O fails (EIO) instead of
        hanging the node. Closing our copy ends it (the kernel aborts a FUSE connection when its last
        /dev/fuse descriptor closes); fusectl's abort, where mounted, ends it even if a stray process still
        holds a copy."""
        fd, meta = self.held.pop(key)
        self._forget(key)
        dev = meta.get("dev")
        how = "fusectl abort" if isinstance(dev, str) and _fusectl_abort(key, dev) else "closed"
        with contextlib.suppress(OSError):
            os.close(fd)
        record = {"at": time.time(), "after": self.abort_after, "dev": dev, "how": how}
        log.warning("aborted a FUSE connection no process took back", extra={"fields": {"key": key, **record}})
        try:
            _update_aborted(aborted_path(self.path), lambda recs: recs.__setitem__(key, record))
        except OSError as e:
            log.error("cannot record the abort", extra={"fields": {"key": key, "error": str(e)}})
        if not self.held:
            self.idle_since = time.monotonic()


def _fusectl_abort(mount_point: str, dev: str) -> bool:
    """Write 1 to the fusectl abort file of the FUSE connection mounted at mount_point, when fusectl is there
    and the mount there is still that connection (dev "0:N" as mountinfo shows it; the number names it)."""
    try:
        major, minor = (int(x) for x in dev.split(":"))
    except ValueError:
        return False
    path = f"{FUSECTL}/{(major << 20) | minor}/abort"  # the kernel's dev_t encoding (major 0: the minor)
    if not os.path.exists(path) or _mount_dev(mount_point) != dev:
        return False  # no fusectl here, or the number names another connection now
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("fusectl abort failed", extra={"fields": {"path": path, "error": str(e)}})
        return False
    return True


def _mount_dev(mount_point: str) -> str | None:
    """major:minor of the FUSE mount at mount_point from /proc/self/mountinfo (nothing asks the mount itself,
    which blocks while it is paused)."""
    found = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if parts[4].replace("\\040", " ") == mount_point and parts[sep + 1].startswith("fuse"):
                found = parts[2]
    return found


def _update_aborted(path: str, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """Read, change and rewrite the abort records under an exclusive lock; the records as they were before.
    A torn or foreign file reads as no records."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r+") as f:
            try:
                recs = json.loads(f.read() or "{}")
            except ValueError:
                recs = {}
            if not isinstance(recs, dict):
                recs = {}
            before = dict(recs)
            change(recs)
            f.seek(0)
            f.truncate()
            json.dump(recs, f)
            f.flush()
            os.fsync(f.fileno())
        return before
    finally:
        os.close(fd)  # releases the flock


def take_aborted(state_dir: str, key: str) -> dict[str, Any] | None:
    """The record (at, after, dev, how) of the connection the keeper of state_dir aborted under key, removed
    from the file so that no later start reads it again; None when there is none."""
    path = aborted_path(socket_path(state_dir))
    if not os.path.exists(path):
        return None
    try:
        rec = _update_aborted(path, lambda recs: recs.pop(key, None)).get(key)
    except OSError:
        return None
    return rec if isinstance(rec, dict) else None


class _BadRequest(Exception):
    pass


class _Serve(Exception):
    """The request makes its connection a server of key (answered by _serve_one, which has the connection)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _drain(sock: object) -> None:
    assert isinstance(sock, socket.socket)
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while sock.recv(64):
            pass


def serve(socket_path: str, *, idle_exit: float = 30.0, abort_after: float = DEFAULT_ABORT_AFTER) -> None:
    """Run a keeper on socket_path until it has held nothing for idle_exit seconds or gets SIGTERM/SIGINT.
    A held connection that no process serves for abort_after seconds is aborted (0: never).
    RuntimeError when another keeper is live on the socket."""
    path = os.path.abspath(socket_path)  # before the chdir: a relative path means the caller's directory
    os.chdir("/")  # a long-lived process must not pin the directory it was started from
    keeper = _Keeper(path, idle_exit, abort_after)
    main_thread = threading.current_thread() is threading.main_thread()
    wake_r, wake_w = socket.socketpair()
    old_handlers: dict[int, Any] = {}
    old_wakeup = -1
    try:
        keeper.bind()
        if main_thread:
            # signals only set a flag; the wakeup socket makes the select return so the loop sees it
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            keeper.sel.register(wake_r, selectors.EVENT_READ, "wakeup")
            old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

            def on_stop(signum: int, _frame: object) -> None:
                keeper.stop_signal = signum

            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, on_stop)
            # a closed terminal or a restarted parent's session is no reason to drop the mounts
            old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log.info("FUSE keeper serving", extra={"fields": {"socket": path, "pid": os.getpid(),
                                                           "idle_exit": idle_exit, "abort_after": abort_after}})
        keeper.run()
    finally:
        if main_thread and old_handlers:
            for signum, h in old_handlers.items():
                signal.signal(signum, h)
            signal.set_wakeup_fd(old_wakeup)
        keeper.close()
        wake_r.close()
        wake_w.close()


# ---------------------------------------------------------------------------------------------- client


class KeeperClient:
    """Calls to the keeper at socket_path; each call is one connection (no state to go stale)."""

    def __init__(self, socket_path: str, *, timeout: float = CALL_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _call(self, req: dict[str, Any], fd: int | None = None) -> tuple[dict[str, Any], int | None]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise KeeperUnavailable(f"no FUSE keeper at {self.socket_path}: {e.strerror}") from None
            try:
                socket.send_fds(sock, [json.dumps(req).encode()], [fd] if fd is not None else [])
                data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, _MAX_FDS)
            except (TimeoutError, ConnectionError) as e:
                raise KeeperUnavailable(f"the FUSE keeper at {self.socket_path} did not answer: {e}") from None
        finally:
            sock.close()
        if not data:
            for x in fds:
                os.close(x)
            raise KeeperUnavailable(f"the FUSE keeper at {self.socket_path} closed the connection unanswered")
        try:
            reply = json.loads(data)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError as e:
            for x in fds:
                os.close(x)
            raise KeeperError(f"the FUSE keeper sent a malformed reply: {e}") from None
        for x in fds[1:]:
            os.close(x)
        got = fds[0] if fds else None
        if got is not None:
            os.set_inheritable(got, False)  # like any descriptor Python opens
        if not reply.get("ok"):
            if got is not None:
                os.close(got)
            raise KeeperError(str(reply.get("error", "unknown error")))
        return reply, got

    def put(self, key: str, fd: int, meta: dict[str, Any]) -> None:
        """The keeper keeps a copy of fd under key (replacing and closing an earlier one); ours stays ours."""
        self._call({"op": "put", "key": key, "meta": meta}, fd)

    def get(self, key: str) -> tuple[int, dict[str, Any]] | None:
        """A new descriptor (the caller closes it) and its meta, or None when nothing is held under key."""
        try:
            reply, fd = self._call({"op": "get", "key": key})
        except KeeperError as e:
            if isinstance(e, KeeperUnavailable) or str(e) != "absent":
                raise
            return None
        if fd is None:
            raise KeeperError(f"the FUSE keeper answered get {key!r} without a descriptor")
        meta = reply.get("meta", {})
        return fd, meta if isinstance(meta, dict) else {}

    def drop(self, key: str) -> bool:
        """The keeper closes its copy; False when it held nothing under key."""
        reply, _ = self._call({"op": "drop", "key": key})
        return bool(reply.get("dropped"))

    def keys(self) -> list[str]:
        reply, _ = self._call({"op": "list"})
        return [str(k) for k in reply.get("keys", [])]

    def serve(self, key: str) -> KeeperLease:
        """Tell the keeper this process serves the connection held under key, for as long as the returned
        lease stays open (its close, or this process's death, starts the keeper's abort_after clock).
        KeeperError "absent" when the keeper holds nothing under key (e.g. it aborted the connection)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
                sock.send(json.dumps({"op": "serve", "key": key}).encode())
                data = sock.recv(_MAX_MSG)
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError, ConnectionError) as e:
                raise KeeperUnavailable(f"the FUSE keeper at {self.socket_path} did not answer: {e}") from None
            try:
                reply = json.loads(data) if data else {}
            except ValueError:
                reply = {}
            if not isinstance(reply, dict) or not reply.get("ok"):
                error = reply.get("error", "no reply") if isinstance(reply, dict) else "malformed reply"
                raise KeeperError(str(error))
        except BaseException:
            sock.close()
            raise
        return KeeperLease(sock)


    def ping(self) -> int | None:
        """The keeper's pid, or None when no keeper answers."""
        try:
            reply, _ = self._call({"op": "ping"})
        except KeeperUnavailable:
            return None
        pid = reply.get("pid")
        return pid if isinstance(pid, int) else None


class KeeperLease:
    """An open connection that tells the keeper its holder serves a key; close() ends it (so does death)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------------------------------- starting one


#: idle exit of a keeper an engine starts for itself: it holds the connection from the engine's first put on, so
#: it only needs to outlast the moment between ensure_keeper and that put; then a stopped node leaves no process
SPAWNED_IDLE_EXIT = 2.0


def keeper_argv(path: str, abort_after: float = DEFAULT_ABORT_AFTER) -> list[str]:
    return [sys.executable, "-m", "csi_driver", "fuse-keeper", "--socket", path, "--idle-exit",
            str(SPAWNED_IDLE_EXIT), "--abort-after", str(abort_after)]


def spawn_keeper(state_dir: str, abort_after: float = DEFAULT_ABORT_AFTER) -> int:
    """Start a detached keeper on socket_path(state_dir); its pid (it exits at once if another one is live)."""
    os.makedirs(state_dir, exist_ok=True)
    env = dict(os.environ)
    # the keeper must import this same csi_driver, also when run from a source tree
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = keeper_argv(os.path.abspath(socket_path(state_dir)), abort_after)
    with open(os.path.join(state_dir, LOG_NAME), "ab") as out:
        res = subprocess.run([sys.executable, "-c", _SPAWN, *argv],
                             stdout=subprocess.PIPE, stderr=out, env=env, cwd="/", check=True, timeout=60)
    return int(res.stdout.split()[0])


def ensure_keeper(state_dir: str, timeout: float = 10.0, *, abort_after: float = DEFAULT_ABORT_AFTER) -> int:
    """The pid of the keeper answering at socket_path(state_dir), started (detached, aborting connections no
    process serves for abort_after seconds) when none answers. KeeperUnavailable when none answers within
    timeout."""
    client = KeeperClient(socket_path(state_dir))
    pid = client.ping()
    if pid is not None:
        return pid
    spawned = spawn_keeper(state_dir, abort_after)
    log.info("started the FUSE keeper", extra={"fields": {"pid": spawned,
                                                          "log": os.path.join(state_dir, LOG_NAME)}})
    deadline = time.monotonic() + timeout
    respawns = 3
    while True:
        # whichever keeper answers: ours, or one a concurrent caller started (ours then lost the bind and exits)
        pid = client.ping()
        if pid is not None:
            return pid
        if time.monotonic() >= deadline:
            raise KeeperUnavailable(f"no FUSE keeper answered at {client.socket_path} within {timeout:.0f}s; "
                                    f"see {os.path.join(state_dir, LOG_NAME)}")
        if respawns and not pid_alive(spawned):
            # ours exited and nobody answers: the live keeper it deferred to has just idled out, or it failed
            # (the log says); try again a few times, not in a tight loop of failures
            respawns -= 1
            spawned = spawn_keeper(state_dir, abort_after)
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
