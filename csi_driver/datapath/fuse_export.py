"""FUSE export: each staged volume appears as one regular file whose I/O goes to a block target.

One FUSE mount per node engine process (a directory under the state dir); `add`/`remove` make volume files
appear and vanish. A loop device with direct I/O sits on each file, so the kernel keeps no second page cache
and every block request becomes one FUSE request:

- read/write     -> the fast path (granted grains of an engine volume: the compiled loop reads and writes the
                    volume's own data file, csi_driver/engine/bypass.py) or target.read / target.write
- fsync          -> target.flush (a filesystem's flush or the device's FLUSH reaches the engine)
- fallocate      -> PUNCH_HOLE / ZERO_RANGE -> target.discard (loop turns DISCARD/WRITE_ZEROES into these)

The FUSE protocol is spoken here directly (fuse_wire, fuse_session: no libfuse), because the connection must
survive the process: with a keeper (csi_driver.datapath.fuse_keeper) holding the /dev/fuse descriptor, a
restarted engine process takes the same mount over and the kernel resends what the dead one never answered.
Node ids are kept in `<mount>.nodes.json` and every open file's handle is its node id, so a successor
understands the kernel's requests without having seen their LOOKUP or OPEN.

Every read, write, fsync and fallocate request is counted and timed in `FuseExport.stats` (a `Timings`, with
the compiled loop's own counters added); csi_driver.metrics shows them to Prometheus (docs/metrics.md).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import os
import stat
import threading
import time
from typing import Any, Protocol, runtime_checkable

from csi_driver.datapath import fuse_session, privileged
from csi_driver.datapath import fuse_wire as w

log = logging.getLogger(__name__)

IO_SIZE = 1 << 20  # max FUSE read/write request, the largest the kernel accepts (256 pages)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

#: latency bucket bounds (seconds) of FUSE requests, 10 us to 1 s
FUSE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
FUSE_OPS = ("read", "write", "fsync", "fallocate")
_now = time.perf_counter


class Series:
    """One key's numbers in a `Timings`: requests, failures, bytes, seconds, and requests per latency bucket."""

    __slots__ = ("bounds", "count", "errors", "bytes", "seconds", "buckets", "_lock")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.count = 0
        self.errors = 0
        self.bytes = 0
        self.seconds = 0.0
        #: requests per bucket, not cumulative; the last one counts those above every bound
        self.buckets = [0] * (len(bounds) + 1)
        self._lock = threading.Lock()

    def observe(self, seconds: float, nbytes: int = 0) -> None:
        i = bisect.bisect_left(self.bounds, seconds)  # the first bucket whose bound is >= seconds (le)
        with self._lock:
            self.count += 1
            self.seconds += seconds
            self.bytes += nbytes
            self.buckets[i] += 1

    def failed(self, seconds: float) -> None:
        """A request that failed: counted and timed like the others, and as an error."""
        self.observe(seconds)
        with self._lock:
            self.errors += 1

    def copy(self) -> Series:
        c = Series(self.bounds)
        with self._lock:
            c.count, c.errors, c.bytes, c.seconds = self.count, self.errors, self.bytes, self.seconds
            c.buckets = list(self.buckets)
        return c


class Timings:
    """Counts, bytes and a latency histogram per key (a FUSE op, a freeze), cheap enough for the I/O path.

    Plain numbers under a lock, so the data path needs no metrics library; csi_driver.metrics reads
    `snapshot()` at scrape time. Callers on a hot path keep the `series(key)` they observe into.
    """

    __slots__ = ("bounds", "_lock", "_series")

    def __init__(self, bounds: tuple[float, ...], keys: tuple[str, ...] = ()) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        self._series: dict[str, Series] = {k: Series(bounds) for k in keys}

    def series(self, key: str) -> Series:
        with self._lock:
            s = self._series.get(key)
            if s is None:
                s = self._series[key] = Series(self.bounds)
            return s

    def observe(self, key: str, seconds: float, nbytes: int = 0) -> None:
        self.series(key).observe(seconds, nbytes)

    def snapshot(self) -> dict[str, Series]:
        """A copy of every key's numbers (each key's own numbers consistent)."""
        with self._lock:
            items = list(self._series.items())
        return {k: s.copy() for k, s in items}


@runtime_checkable
class BlockTarget(Protocol):
    """What a FUSE export file reads and writes: the engine volume (or, in unit tests, a plain file)."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...


class EngineVolume:
    """Adapter: one engine volume as a BlockTarget."""

    def __init__(self, engine: Any, volume_id: str):
        self.engine = engine
        self.volume_id = volume_id

    @property
    def size(self) -> int:
        return int(self.engine.get_volume(self.volume_id).size)

    def read(self, offset: int, length: int) -> bytes:
        data: bytes = self.engine.read(self.volume_id, offset, length)
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.engine.write(self.volume_id, offset, data)

    def flush(self) -> None:
        self.engine.flush(self.volume_id)

    def discard(self, offset: int, length: int) -> None:
        self.engine.discard(self.volume_id, offset, length)


class _Entry:
    __slots__ = ("name", "node", "target", "read_only", "size", "opens")

    def __init__(self, name: str, node: int, target: BlockTarget, read_only: bool, size: int):
        self.name = name
        self.node = node
        self.target = target
        self.read_only = read_only
        self.size = size
        self.opens = 0


class _NodeIds:
    """name -> FUSE node id, kept in a JSON file (replaced atomically) so that a successor process knows the ids
    the kernel already holds. Ids are never reused: a stale id in the kernel can only miss, never alias."""

    ROOT = 1

    def __init__(self, path: str) -> None:
        self.path = path
        self.ids: dict[str, int] = {}
        self.next = 2
        try:
            with open(path) as f:
                raw = json.load(f)
            self.ids = {str(k): int(v) for k, v in raw.get("ids", {}).items()}
            self.next = max(int(raw.get("next", 2)), max(self.ids.values(), default=1) + 1)
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("ignoring unreadable FUSE node ids in %s: %s", path, e)

    def get(self, name: str) -> int:
        node = self.ids.get(name)
        if node is None:
            node = self.ids[name] = self.next
            self.next += 1
            self._save()
        return node

    def drop(self, name: str) -> None:
        if self.ids.pop(name, None) is not None:
            try:
                self._save()
            except OSError as e:  # a full state dir must not stop an unstage: the next save writes it all
                log.warning("could not save FUSE node ids to %s: %s", self.path, e)

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # state files are root's only (issue 22)
            json.dump({"next": self.next, "ids": self.ids}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class _ExportTimings(Timings):
    """The handler's own series plus the compiled loop's fast-path counters, merged at snapshot time."""

    __slots__ = ("loop",)

    def __init__(self, bounds: tuple[float, ...], keys: tuple[str, ...]) -> None:
        super().__init__(bounds, keys)
        self.loop: fuse_session.RequestLoop | None = None

    def snapshot(self) -> dict[str, Series]:
        snap = super().snapshot()
        fast = self.loop.counters() if self.loop is not None else {}
        for op in ("read", "write"):
            c = fast.get(op)
            if not c:
                continue
            s = snap.setdefault(op, Series(self.bounds))
            count, nbytes, seconds, buckets = c
            s.count += count
            s.bytes += nbytes
            s.seconds += seconds
            s.buckets = [a + b for a, b in zip(s.buckets, buckets)]
        return snap


class FuseExport:
    """One FUSE mount serving a flat directory of volume files.

    Thread-safe. `start()` mounts, or takes over the live connection a keeper holds for this mount point (an
    engine restart), else removes a dead mount left by a crashed predecessor first; `stop()` unmounts, or with
    handover=True leaves the connection to the keeper. Files are added and removed while mounted.
    `runner` runs the umount commands (None: the real one). keeper_dir: the state directory whose FUSE keeper
    holds the connection across restarts (None: none; the connection dies with this process); keeper_external:
    that keeper is started by someone else (waited for), else one is started when none answers, aborting a
    connection no process serves for keeper_abort_after seconds (None: the keeper's default).
    """

    def __init__(self, mount_point: str, *, fsname: str = "flashcopy", runner: privileged.Runner | None = None,
                 keeper_dir: str | None = None, keeper_external: bool = False, fast: bool = True, threads: int = 8,
                 keeper_abort_after: float | None = None):
        self.mount_point = os.path.abspath(mount_point)
        self.fsname = fsname
        self.runner = runner
        self.keeper_dir = keeper_dir
        self.keeper_external = keeper_external
        self.keeper_abort_after = keeper_abort_after
        self._lease: Any = None  # fuse_keeper.KeeperLease: open while this process serves the connection
        #: why the connection a predecessor left here is gone, when the keeper aborted it ("" otherwise)
        self.lost = ""
        self.fast = fast and fuse_session.FAST
        self.threads = threads
        self._entries: dict[str, _Entry] = {}
        self._by_node: dict[int, _Entry] = {}
        self._nodes = _NodeIds(self.mount_point + ".nodes.json")
        self._lock = threading.Lock()
        self._fd = -1
        self._loop: fuse_session.RequestLoop | None = None
        self._inited = threading.Event()
        self._keeper_error = ""
        #: what INIT negotiated (kept with the descriptor by the keeper, for a successor)
        self.init: dict[str, int] = {}
        #: how this connection was obtained: "mounted", "adopted" (from the keeper), or "" (not running)
        self.origin = ""
        #: read/write/fsync/fallocate requests: count, bytes, latency (csi_driver.metrics exports them)
        self.stats = _ExportTimings(FUSE_BUCKETS, FUSE_OPS)
        self.handler = _Handler(self)
        #: the engine's side of the fast path (engine.attach_bypass); None without the compiled loop
        self.bypass: ExportBypass | None = ExportBypass(self) if self.fast else None

    # ------------------------------------------------------------------ lifecycle

    def _keeper(self) -> Any:
        from csi_driver.datapath import fuse_keeper

        assert self.keeper_dir is not None
        return fuse_keeper.KeeperClient(fuse_keeper.socket_path(self.keeper_dir))

    def start(self, timeout: float = 10.0) -> None:
        if self.keeper_dir is not None and self._adopt():
            return
        if self.keeper_dir is not None:
            self.lost = self._aborted_here()
        # a dead mount makes the directory unusable (ENOTCONN)
        clear_stale_mount(self.mount_point, runner=self.runner)
        os.makedirs(self.mount_point, exist_ok=True)
        self._fd = fuse_session.mount(self.mount_point, fsname=self.fsname, subtype="flashcopy", max_read=IO_SIZE)
        self._inited.clear()
        self._run()
        if not self._inited.wait(timeout):
            self.stop()
            raise RuntimeError(f"FUSE mount at {self.mount_point}: the kernel sent no INIT")
        if "error" in self.init:
            err = self.init["error"]
            self.stop()
            raise RuntimeError(f"FUSE mount at {self.mount_point}: INIT refused ({os.strerror(err)})")
        self.origin = "mounted"
        if self.keeper_dir is not None:
            self._give_keeper()

    def _run(self) -> None:
        loop = fuse_session.new_loop(self._fd, self.handler, IO_SIZE + 64 * 1024, self.threads, fast=self.fast)
        self.stats.loop = loop
        loop.start()
        self._loop = loop

    def _give_keeper(self) -> None:
        from csi_driver.datapath import fuse_keeper

        assert self.keeper_dir is not None
        try:
            if self.keeper_external:
                # the keeper is a container of its own (the chart): wait for it, never start a second one
                client = self._keeper()
                deadline = time.monotonic() + 30.0
                while client.ping() is None:
                    if time.monotonic() > deadline:
                        raise fuse_keeper.KeeperUnavailable("the FUSE keeper container does not answer")
                    time.sleep(0.2)
            elif self.keeper_abort_after is not None:
                fuse_keeper.ensure_keeper(self.keeper_dir, abort_after=self.keeper_abort_after)
            else:
                fuse_keeper.ensure_keeper(self.keeper_dir)
            self._keeper().put(self.mount_point, self._fd,
                               {"dev": fuse_session.mount_dev(self.mount_point), "init": self.init})
            if not self._serve_lease():
                raise fuse_keeper.KeeperError("the keeper let go of the connection just handed to it")
        except (fuse_keeper.KeeperError, OSError, RuntimeError) as e:
            # serving goes on; only a restart of this process would then fail the I/O (as without a keeper)
            self._keeper_error = str(e)
            log.error("FUSE keeper unavailable, the export at %s will not survive a restart: %s",
                      self.mount_point, e)

    def _adopt(self) -> bool:
        """Take over the connection the keeper holds for this mount point, if it is still the one mounted."""
        from csi_driver.datapath import fuse_keeper

        try:
            got = self._keeper().get(self.mount_point)
        except fuse_keeper.KeeperError:
            return False
        if got is None:
            return False
        fd, meta = got
        dev = fuse_session.mount_dev(self.mount_point)
        if dev is None or dev != meta.get("dev") or not meta.get("init"):
            log.warning("the FUSE keeper's connection for %s is not the one mounted there: dropping it",
                        self.mount_point)
            os.close(fd)
            with contextlib.suppress(fuse_keeper.KeeperError):
                self._keeper().drop(self.mount_point)
            return False
        if not self._serve_lease():
            # the keeper aborted it between get and serve (no process served it for too long): ours is a
            # copy of a connection it has given up; closing it ends the connection
            log.warning("the FUSE keeper gave up the connection for %s meanwhile", self.mount_point)
            os.close(fd)
            return False
        self._fd = fd
        self.init = {str(k): int(v) for k, v in meta["init"].items()}
        self._inited.set()
        self._run()
        self.origin = "adopted"
        if self.init.get("resend"):
            # requests the previous process read and never answered: the kernel queues them again
            try:
                os.write(fd, w.notify_resend())
            except OSError as e:
                log.error("FUSE resend request failed at %s: %s", self.mount_point, e)
        log.info("took over the FUSE connection at %s (%s)", self.mount_point,
                 "resending unanswered requests" if self.init.get("resend") else "no resend in this kernel")
        return True

    def _serve_lease(self) -> bool:
        """Open this process's lease on the connection the keeper holds (while it is open the keeper aborts
        nothing); False when the keeper holds it no more. A keeper without leases (an older one, still running
        from before an upgrade) bounds no pause: serving goes on without one."""
        from csi_driver.datapath import fuse_keeper

        try:
            self._lease = self._keeper().serve(self.mount_point)
        except fuse_keeper.KeeperError as e:
            if str(e) == "absent":
                return False
            log.warning("the FUSE keeper takes no lease for %s (%s): it will not bound a pause", self.mount_point, e)
        return True

    def _aborted_here(self) -> str:
        """Why the connection mounted here is dead, when the keeper aborted it because no process took it
        back in time (its record names the mount's device), else ""."""
        from csi_driver.datapath import fuse_keeper

        assert self.keeper_dir is not None
        rec = fuse_keeper.take_aborted(self.keeper_dir, self.mount_point)
        if rec is None or rec.get("dev") != fuse_session.mount_dev(self.mount_point):
            return ""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(rec.get("at", 0))))
        return (f"the FUSE keeper aborted this volume's engine connection at {at}: no engine process took it "
                f"back within {float(rec.get('after', 0)):g}s")

    def stop(self, timeout: float = 10.0, *, handover: bool = False) -> None:
        """Unmount (lazily if a straggler still holds a file) and stop the request loop.

        handover=True (a restart with volumes in use): stop serving but leave the mount and the connection to
        the keeper; the kernel queues requests until the next process takes it over.
        """
        loop = self._loop
        if loop is None:
            return
        if handover and self.keeper_dir is not None and self.origin:
            loop.stop()
            self._close()
            return
        if self.keeper_dir is not None:
            from csi_driver.datapath import fuse_keeper

            with contextlib.suppress(fuse_keeper.KeeperError):
                self._keeper().drop(self.mount_point)
        try:
            privileged.umount(self.mount_point, runner=self.runner)
        except privileged.CommandError:  # DeviceBusy among them: a straggler holds a file
            with contextlib.suppress(privileged.CommandError):
                privileged.umount(self.mount_point, lazy=True, runner=self.runner)
        loop.stop()
        self._close()

    def _close(self) -> None:
        if self._lease is not None:
            self._lease.close()  # the keeper's abort clock starts (a handover: the next process takes it back)
            self._lease = None
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._loop = None
        self.stats.loop = None
        self.origin = ""

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.alive()

    @property
    def survives_restart(self) -> bool:
        """A restart of this process pauses I/O instead of failing it (a keeper holds the connection and the
        kernel resends unanswered requests)."""
        return not self.restart_fails()

    def restart_fails(self) -> str:
        """Why a restart of this process would fail the exported volumes' I/O, or "" when it would not."""
        if not self.origin:
            return "the FUSE export is not running"
        if self.keeper_dir is None:
            return "no FUSE keeper holds the connection"
        if self._keeper_error:
            return f"the FUSE keeper is unavailable ({self._keeper_error})"
        if not self.init.get("resend"):
            return "this kernel cannot resend unanswered FUSE requests (needs Linux 6.9)"
        return ""

    # ------------------------------------------------------------------ exports

    def path(self, name: str) -> str:
        return os.path.join(self.mount_point, name)

    def add(self, name: str, target: BlockTarget, *, read_only: bool = False) -> str:
        """Export target as <mount>/<name>; re-adding the same name replaces the target. Returns the path.

        A re-add (an idempotent stage) updates the entry in place: the loop device's open handle on the file
        must keep working, and handles of a replaced entry fail with EIO.
        """
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad export name {name!r}")
        # Lock order: the engine's lock, then this one (the engine calls ExportBypass under its lock), so the
        # target (the engine) is asked for its size before taking it, never while holding it.
        size = target.size
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                node = self._nodes.get(name)
                entry = self._entries[name] = self._by_node[node] = _Entry(name, node, target, read_only, size)
            else:
                if self._loop is not None:
                    self._loop.revoke(entry.node)  # the engine grants again for the new target
                entry.target, entry.read_only, entry.size = target, read_only, size
        return self.path(name)

    def remove(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return False
            self._by_node.pop(entry.node, None)
            if self._loop is not None:
                self._loop.revoke(entry.node)
            self._nodes.drop(name)
        return True

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def refresh_size(self, name: str) -> int:
        """Re-read the target's size (after the engine grew the volume) and let the kernel see it."""
        with self._lock:
            entry = self._entries[name]
        size = entry.target.size  # not under the lock (lock order: see add)
        with self._lock:
            entry.size = size
        # attr_valid is 0, so this stat makes the kernel fetch the new size (loop reads the inode's size)
        os.stat(self.path(name))
        return entry.size

    def _node_entry(self, node: int) -> _Entry | None:
        with self._lock:
            return self._by_node.get(node)

    def _name_entry(self, name: str) -> _Entry | None:
        with self._lock:
            return self._entries.get(name)


class ExportBypass:
    """The engine's `Bypass` (csi_driver/engine/bypass.py) over this export's compiled loop: volume ids are
    export names. Read-only exports get no write grant (the handler's EROFS must not be bypassed)."""

    def __init__(self, export: FuseExport) -> None:
        self.x = export

    def _node(self, volume_id: str) -> tuple[int, bool] | None:
        e = self.x._name_entry(volume_id)
        return None if e is None else (e.node, e.read_only)

    def grant(self, volume_id: str, fd: int, size: int, grain: int, read: bytes, write: bytes) -> None:
        n, loop = self._node(volume_id), self.x._loop
        if n is None or loop is None:
            return
        loop.grant(n[0], fd, size, grain, read, bytes(len(write)) if n[1] else write)

    def revoke(self, volume_id: str) -> None:
        n, loop = self._node(volume_id), self.x._loop
        if n is not None and loop is not None:
            loop.revoke(n[0])

    def unread(self, volume_id: str, grain: int) -> None:
        n, loop = self._node(volume_id), self.x._loop
        if n is not None and loop is not None:
            loop.unread(n[0], grain)

    def take_dirty(self, volume_id: str) -> bool:
        n, loop = self._node(volume_id), self.x._loop
        return n is not None and loop is not None and loop.take_dirty(n[0])


def clear_stale_mount(mount_point: str, *, runner: privileged.Runner | None = None) -> None:
    """Lazily unmount a FUSE mount left at mount_point by a dead engine process (its files give ENOTCONN).

    Loop devices still attached to its files keep the dead connection alive until they are detached;
    the lazy unmount only frees the directory for the new mount.
    """
    for m in reversed(privileged.mounts_at(mount_point)):
        if m.fstype.startswith("fuse"):
            log.warning("removing stale FUSE mount at %s (%s)", mount_point, m.source)
            privileged.umount(mount_point, lazy=True, runner=runner)


class _Failed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


_START = time.time_ns() // 1_000_000_000
_DIR_MODE = stat.S_IFDIR | 0o750


class _Handler:
    """The FUSE requests the compiled loop does not answer itself: one whole request in, one whole reply out.

    Attributes and entries are never cached by the kernel (valid 0): sizes change on expand, files come and go.
    Engine failures answer EIO; a handle of a removed export answers EIO too (it must not reach the engine).
    """

    def __init__(self, export: FuseExport) -> None:
        self.x = export
        st = export.stats
        self._series = {w.READ: st.series("read"), w.WRITE: st.series("write"), w.FSYNC: st.series("fsync"),
                        w.FALLOCATE: st.series("fallocate")}
        self._ops = {
            w.INIT: self._init, w.LOOKUP: self._lookup, w.GETATTR: self._getattr, w.SETATTR: self._setattr,
            w.OPEN: self._open, w.READ: self._read, w.WRITE: self._write, w.FSYNC: self._fsync,
            w.FLUSH: self._ok, w.RELEASE: self._release, w.OPENDIR: self._opendir, w.READDIR: self._readdir,
            w.RELEASEDIR: self._ok, w.FSYNCDIR: self._ok, w.STATFS: self._statfs, w.FALLOCATE: self._fallocate,
            w.ACCESS: self._ok, w.DESTROY: self._ok,
        }

    def __call__(self, req: bytes) -> bytes | None:
        _len, opcode, unique, nodeid, *_ = w.IN_HEADER.unpack_from(req)
        if opcode in w.NO_REPLY:
            return None
        op = self._ops.get(opcode)
        if op is None:
            return w.out(unique, error=errno.ENOSYS)
        series = self._series.get(opcode)
        t0 = _now()
        body = memoryview(req)[w.IN_HEADER.size:]
        try:
            reply, nbytes = op(nodeid, body)
        except _Failed as f:
            if series is not None:
                series.failed(_now() - t0)
            return w.out(unique, error=f.code)
        except Exception as e:  # a bug here must not leave the kernel waiting
            log.exception("FUSE op %d failed: %s", opcode, e)
            if series is not None:
                series.failed(_now() - t0)
            return w.out(unique, error=errno.EIO)
        if series is not None:
            series.observe(_now() - t0, nbytes)
        return w.out(unique, reply)

    # ------------------------------------------------------------------ session and directory

    def _init(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        major, minor, readahead, flags, flags2 = w.INIT_IN.unpack_from(body)
        if major != w.KERNEL_VERSION or minor < w.MIN_MINOR:
            self.x.init = {"error": errno.EPROTO}
            self.x._inited.set()
            raise _Failed(errno.EPROTO)
        kernel = flags | (flags2 << 32 if flags & w.INIT_EXT else 0)
        want = (w.ASYNC_READ | w.BIG_WRITES | w.ASYNC_DIO | w.MAX_PAGES | w.INIT_EXT) & kernel
        self.x.init = {"minor": min(minor, w.OUR_MINOR), "flags": want, "max_write": IO_SIZE,
                       "resend": int(bool(kernel & w.HAS_RESEND))}
        reply = w.INIT_OUT.pack(w.KERNEL_VERSION, w.OUR_MINOR, min(readahead, IO_SIZE), want & 0xFFFFFFFF,
                                64, 48, IO_SIZE, 1, IO_SIZE // 4096, 0, want >> 32, 0)
        self.x._inited.set()
        return reply, 0

    def _ok(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        return b"", 0

    def _file_attr(self, e: _Entry) -> bytes:
        mode = stat.S_IFREG | (0o400 if e.read_only else 0o600)
        return w.attr(e.node, e.size, mode, 1, _START)

    def _attr(self, nodeid: int) -> bytes:
        if nodeid == _NodeIds.ROOT:
            return w.attr(nodeid, 0, _DIR_MODE, 2 + len(self.x.names()), _START)
        e = self.x._node_entry(nodeid)
        if e is None:
            raise _Failed(errno.ENOENT)
        return self._file_attr(e)

    def _lookup(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        name = bytes(body).split(b"\0", 1)[0].decode(errors="replace")
        e = self.x._name_entry(name) if nodeid == _NodeIds.ROOT else None
        if e is None:
            raise _Failed(errno.ENOENT)
        return w.ENTRY_OUT_HEAD.pack(e.node, 0, 0, 0, 0, 0) + self._file_attr(e), 0

    def _getattr(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        return w.ATTR_OUT_HEAD.pack(0, 0, 0) + self._attr(nodeid), 0

    def _setattr(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        valid, _pad, _fh, size = w.SETATTR_IN.unpack_from(body)
        if valid & w.FATTR_SIZE:
            e = self.x._node_entry(nodeid)
            if e is None:
                raise _Failed(errno.ENOENT)
            if size != e.size:
                raise _Failed(errno.EPERM)  # the volume's size changes through the engine (expand) only
        return w.ATTR_OUT_HEAD.pack(0, 0, 0) + self._attr(nodeid), 0

    def _opendir(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        return w.OPEN_OUT.pack(0, 0, 0), 0

    def _readdir(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        _fh, offset, size, _flags = w.READ_IN.unpack_from(body)
        names = [(".", _NodeIds.ROOT, 4), ("..", _NodeIds.ROOT, 4)]
        with self.x._lock:
            names += [(e.name, e.node, 8) for _n, e in sorted(self.x._entries.items())]
        out = bytearray()
        for i in range(offset, len(names)):
            name, ino, dtype = names[i]
            d = w.dirent(ino, i + 1, name.encode(), dtype)
            if len(out) + len(d) > size:
                break
            out += d
        return bytes(out), 0

    def _statfs(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        return w.KSTATFS.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0), 0

    # ------------------------------------------------------------------ files

    def _live(self, nodeid: int, fh: int = 0) -> _Entry:
        # fh is the node id (open's reply), so a successor process resolves handles it never gave out
        e = self.x._node_entry(fh or nodeid)
        if e is None:
            raise _Failed(errno.EIO)  # removed while a handle is still open: must not reach the engine
        return e

    def _open(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        flags, _open_flags = w.OPEN_IN.unpack_from(body)
        e = self.x._node_entry(nodeid)
        if e is None:
            raise _Failed(errno.ENOENT)
        if e.read_only and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise _Failed(errno.EROFS)
        with self.x._lock:
            e.opens += 1
        # no page cache of the export (loop adds none either); direct writes of one file may run in parallel
        return w.OPEN_OUT.pack(e.node, w.FOPEN_DIRECT_IO | w.FOPEN_PARALLEL_DIRECT_WRITES, 0), 0

    def _release(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        fh, _flags, _rflags = w.RELEASE_IN.unpack_from(body)
        e = self.x._node_entry(fh or nodeid)
        if e is not None:
            with self.x._lock:
                e.opens = max(0, e.opens - 1)
        return b"", 0

    def _read(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        fh, offset, size, _flags = w.READ_IN.unpack_from(body)
        e = self._live(nodeid, fh)
        if offset >= e.size:
            return b"", 0
        size = min(size, e.size - offset)
        try:
            data = e.target.read(offset, size)
        except Exception as ex:
            log.error("read %s @%d+%d failed: %s", e.name, offset, size, ex)
            raise _Failed(errno.EIO) from ex
        return data, len(data)

    def _write(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        fh, offset, size, _flags = w.WRITE_IN.unpack_from(body)
        data = bytes(body[w.WRITE_IN_SIZE:w.WRITE_IN_SIZE + size])
        e = self._live(nodeid, fh)
        if e.read_only:
            raise _Failed(errno.EROFS)
        if offset + len(data) > e.size:
            raise _Failed(errno.ENOSPC)
        try:
            e.target.write(offset, data)
        except Exception as ex:
            log.error("write %s @%d+%d failed: %s", e.name, offset, len(data), ex)
            raise _Failed(errno.EIO) from ex
        return w.WRITE_OUT.pack(len(data), 0), len(data)

    def _fsync(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        fh, _flags, _pad = w.FSYNC_IN.unpack_from(body)
        e = self._live(nodeid, fh)
        try:
            e.target.flush()
        except Exception as ex:
            log.error("flush %s failed: %s", e.name, ex)
            raise _Failed(errno.EIO) from ex
        return b"", 0

    def _fallocate(self, nodeid: int, body: memoryview) -> tuple[bytes, int]:
        fh, offset, length, mode, _pad = w.FALLOCATE_IN.unpack_from(body)
        e = self._live(nodeid, fh)
        if e.read_only:
            raise _Failed(errno.EROFS)
        if mode & (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_ZERO_RANGE):
            end = min(offset + length, e.size)
            if end <= offset:
                return b"", length
            try:
                # discarded ranges read back as zeros, which is what both modes promise
                e.target.discard(offset, end - offset)
            except Exception as ex:
                log.error("discard %s @%d+%d failed: %s", e.name, offset, length, ex)
                raise _Failed(errno.EIO) from ex
            return b"", length
        if mode & ~_FALLOC_FL_KEEP_SIZE == 0:
            if offset + length > e.size and not mode & _FALLOC_FL_KEEP_SIZE:
                raise _Failed(errno.EFBIG)
            return b"", length  # preallocation: the volume size is fixed, nothing to do
        raise _Failed(errno.EOPNOTSUPP)
