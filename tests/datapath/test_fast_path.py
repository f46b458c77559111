"""The compiled FUSE loop's fast path (bypass grants) under real loop devices, against the engine's semantics.

- the extension is built wherever a C compiler is (else the whole data path silently runs the slow way);
- owned grains of a volume with no dependents are served without a Python call; a snapshot revokes, its
  copy-on-write goes through the engine, and the grants come back after the commit;
- snapshots taken while fast writers run are points in time: every slot of the snapshot holds a record that was
  written before the snapshot returned, and none older than what was acknowledged before it began (B3);
- a stateful run of device writes, reads, discards, snapshots, restores and flushes matches a bytes model.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from csi_driver.datapath import fuse_session
from csi_driver.engine import errors
from tests.datapath.conftest import KERNEL_SKIP
from tests.datapath.fuse_requests import MemTarget
from tests.waiting import wait_for

MiB = 1 << 20
needs_kernel = pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")


def test_compiled_loop_is_built_where_a_compiler_is() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the pure-Python FUSE loop serves every request here")
    assert fuse_session.FAST, "csi_driver/datapath/_fuseloop.c was not built (pip install -e . builds it)"


class Node:
    """An engine, its data path, and one staged raw block volume opened with O_DIRECT."""

    def __init__(self, size: int = 8 * MiB) -> None:
        from csi_driver.datapath import DataPath
        from csi_driver.engine import Engine

        self.dir = tempfile.mkdtemp(prefix="fast-", dir="/var/tmp")
        self.engine = Engine.open(self.dir)
        self.dp = DataPath(self.engine)
        self.dp.start()
        self.vid = self.engine.create_volume("v", size).id
        self.staging = os.path.join(self.dir, "staging")
        self.dp.stage(self.vid, self.staging, block=True)
        rec = self.dp.record(self.vid)
        assert rec is not None
        self.fd = os.open(rec.loop_device, os.O_RDWR | os.O_DIRECT)
        self.buf = mmap.mmap(-1, MiB)  # page aligned for O_DIRECT

    def counters(self) -> dict[str, object]:
        loop = self.dp.export._loop
        assert loop is not None
        return loop.counters()

    def slow_io(self) -> int:
        """Reads and writes the Python handler answered (the engine's path)."""
        st = self.dp.export.stats
        return st.series("read").count + st.series("write").count

    def write(self, off: int, data: bytes) -> None:
        self.buf[:len(data)] = data
        assert os.pwritev(self.fd, [memoryview(self.buf)[:len(data)]], off) == len(data)

    def read(self, off: int, n: int) -> bytes:
        assert os.preadv(self.fd, [memoryview(self.buf)[:n]], off) == n
        return bytes(self.buf[:n])

    def close(self) -> None:
        os.close(self.fd)
        self.dp.unstage(self.vid, self.staging)
        self.dp.stop()
        self.engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def node() -> Iterator[Node]:
    if not fuse_session.FAST:
        pytest.skip("the compiled FUSE loop is not built")
    n = Node()
    yield n
    n.close()


@needs_kernel
@pytest.mark.root
def test_owned_grains_bypass_python_until_a_snapshot(node: Node) -> None:
    e, vid = node.engine, node.vid
    slow0, fast0 = node.slow_io(), node.counters()["write"][0]  # type: ignore[index]
    for i in range(64):
        node.write(i * 64 * 1024, bytes([i]) * 65536)
    assert node.counters()["write"][0] - fast0 == 64 and node.slow_io() == slow0  # type: ignore[index,operator]
    assert node.read(5 * 65536, 4096) == bytes([5]) * 4096
    os.fsync(node.fd)  # the fsync is the engine's (slow path): it syncs the bypassed writes (B4)
    snap, _ = e.snapshot(vid, "s")
    assert e.granted(vid) is not None
    read_mask, write_mask = e.granted(vid)  # type: ignore[misc]
    assert write_mask == 0 and read_mask != 0  # every grain has a dependent: copy-on-write first
    slow1 = node.slow_io()
    node.write(0, b"\xff" * 4096)
    assert node.slow_io() == slow1 + 1  # the engine did the copy-on-write
    assert e.read(snap.id, 0, 4096) == b"\x00" * 4096 and node.read(0, 4096) == b"\xff" * 4096
    e.flush(vid)  # the copied grain's bit is durable: its in-place writes may be bypassed again
    assert e.granted(vid)[1] & 1  # type: ignore[index]
    fast1 = node.counters()["write"][0]  # type: ignore[index]

    def fast_again() -> bool:
        # a background commit may withdraw grants for a moment (only ever conservative): try until one is fast
        node.write(4096, b"\xee" * 4096)
        return bool(node.counters()["write"][0] > fast1)  # type: ignore[index]

    wait_for(fast_again, what="an in-place write through the fast path")
    assert e.read(snap.id, 0, 8192) == b"\x00" * 8192
    assert e.read(vid, 0, 8192) == b"\xff" * 4096 + b"\xee" * 4096


@needs_kernel
@pytest.mark.root
def test_snapshots_under_fast_writers_are_points_in_time(node: Node) -> None:
    """A writer cycles sequence-numbered records through the slots while snapshots are taken. In each snapshot,
    slot s holds the record the writer last wrote there before the snapshot returned, never a later one, and not
    one older than the last acknowledged before the snapshot began (revocation drains in-flight fast I/O)."""
    e, vid = node.engine, node.vid
    slots, rec = 64, 64 * 1024
    fd = os.open(node.dp.record(vid).loop_device, os.O_RDWR | os.O_DIRECT)  # type: ignore[union-attr]
    acked = [0]
    issued = [0]
    stop = threading.Event()
    err: list[BaseException] = []

    def writer() -> None:
        buf = mmap.mmap(-1, rec)
        try:
            while not stop.is_set():
                i = acked[0] + 1
                buf[:8] = i.to_bytes(8, "little")
                issued[0] = i
                os.pwritev(fd, [buf], (i % slots) * rec)
                acked[0] = i
        except BaseException as ex:  # reported below
            err.append(ex)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        snaps = []
        for k in range(12):
            start = acked[0]
            wait_for(lambda s0=start: acked[0] >= s0 + 16 or bool(err), what="the writer")  # type: ignore[misc]
            lo = acked[0]
            s, _ = e.snapshot(vid, f"s{k}")
            hi = issued[0]
            snaps.append((s.id, lo, hi))
            e.flush(vid)  # grants come back: the next snapshot has fast writes to revoke
    finally:
        stop.set()
        t.join(30)
        os.close(fd)
    assert not err, err
    assert acked[0] >= 12 * 16
    for sid, lo, hi in snaps:
        data = e.read(sid, 0, slots * rec)
        for slot in range(slots):
            got = int.from_bytes(data[slot * rec:slot * rec + 8], "little")
            # the newest record of this slot acknowledged before the snapshot began
            floor = max((i for i in range(max(1, lo - slots + 1), lo + 1) if i % slots == slot), default=0)
            assert got <= hi, f"snapshot {sid} slot {slot}: record {got} written after it returned ({hi})"
            assert got >= floor, f"snapshot {sid} slot {slot}: record {got} older than acknowledged {floor}"
            assert got == 0 or got % slots == slot


GRAIN = 64 * 1024
SIZE = 2 * MiB


class DeviceModel(RuleBasedStateMachine):
    """Device I/O through the fast path and the engine, against bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.n = Node(SIZE)
        self.model = bytearray(SIZE)
        self.snaps: list[tuple[str, bytes]] = []

    @rule(block=st.integers(0, SIZE // 4096 - 1), blocks=st.integers(1, 40), fill=st.integers(1, 255))
    def write(self, block: int, blocks: int, fill: int) -> None:
        off = block * 4096
        n = min(blocks * 4096, SIZE - off)
        self.n.write(off, bytes([fill]) * n)
        self.model[off:off + n] = bytes([fill]) * n

    @rule(block=st.integers(0, SIZE // 4096 - 1), blocks=st.integers(1, 64))
    def read(self, block: int, blocks: int) -> None:
        off = block * 4096
        n = min(blocks * 4096, SIZE - off)
        assert self.n.read(off, n) == bytes(self.model[off:off + n])

    @rule(grain=st.integers(0, SIZE // GRAIN - 1), grains=st.integers(1, 4))
    def discard(self, grain: int, grains: int) -> None:
        off = grain * GRAIN
        n = min(grains * GRAIN, SIZE - off)
        self.n.engine.discard(self.n.vid, off, n)
        self.model[off:off + n] = bytes(n)

    @rule()
    def snapshot(self) -> None:
        if len(self.snaps) < 4:
            s, _ = self.n.engine.snapshot(self.n.vid, f"s{len(self.snaps)}")
            self.snaps.append((s.id, bytes(self.model)))

    @rule(i=st.integers(0, 3))
    def restore(self, i: int) -> None:
        if self.snaps:
            sid, data = self.snaps[i % len(self.snaps)]
            try:
                self.n.engine.restore(sid, self.n.vid)
            except errors.InvalidState as e:  # one restore at a time: the volume is unchanged
                assert "already the target" in str(e)
                return
            self.model[:] = data

    @rule()
    def flush(self) -> None:
        os.fsync(self.n.fd)

    @invariant()
    def snapshots_keep_their_instant(self) -> None:
        for sid, data in self.snaps:
            assert self.n.engine.read(sid, 0, SIZE) == data

    def teardown(self) -> None:
        assert self.n.read(0, SIZE // 2) == bytes(self.model[:SIZE // 2])
        self.n.close()


@needs_kernel
@pytest.mark.root
def test_device_io_through_the_fast_path_matches_a_model() -> None:
    if not fuse_session.FAST:
        pytest.skip("the compiled FUSE loop is not built")
    run = DeviceModel.TestCase
    run.settings = settings(max_examples=12, stateful_step_count=25, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
    run().runTest()


@needs_kernel
@pytest.mark.root
def test_the_python_loop_serves_an_export_without_the_extension(tmp_path: object) -> None:
    """What a machine without a C compiler runs: the same handler, no fast path, no grants offered."""
    from csi_driver.datapath.fuse_export import FuseExport

    x = FuseExport(os.path.join(str(tmp_path), "mnt"), fast=False)
    assert x.bypass is None
    x.start()
    try:
        assert isinstance(x._loop, fuse_session.PyLoop)
        mem = MemTarget(MiB)
        path = x.add("v", mem)
        assert os.listdir(x.mount_point) == ["v"] and os.stat(path).st_size == MiB
        fd = os.open(path, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"abc" * 1000, 8192) == 3000
            os.fsync(fd)
            assert os.pread(fd, 3000, 8192) == b"abc" * 1000 == mem.buf[8192:11192]
            with pytest.raises(OSError):
                os.ftruncate(fd, 10)  # the size changes through the engine only
        finally:
            os.close(fd)
        snap = x.stats.snapshot()
        assert snap["write"].count == 1 and snap["read"].count == 1 and snap["fsync"].count == 1
    finally:
        x.stop()
    assert fuse_session.mount_dev(x.mount_point) is None
