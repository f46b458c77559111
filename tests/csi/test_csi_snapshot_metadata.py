"""The CSI SnapshotMetadata service over the CSI socket of a real `serve` (changed-block tracking, issue 12).

Errors need only the controller (any machine). The data tests write known extents to a block volume through the
node data path (FUSE export, loop device: root), snapshot, write more, snapshot, and check Allocated and Delta
against the bytes, paging and resume, and that base + the delta's ranges read from the target rebuild the
target byte for byte (what a backup tool does), with the engine in `serve` and as its own process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc
from tests.csi.conftest import CsiServer, MiB
from tests.datapath.conftest import KERNEL_SKIP

C = grpc.StatusCode
VARIABLE = csi_pb2.BlockMetadataType.VARIABLE_LENGTH
BLOCK = 4096
GRAIN = 256 * 1024  # the default grain size


def _stub(channel: grpc.Channel) -> csi_pb2_grpc.SnapshotMetadataStub:
    return csi_pb2_grpc.SnapshotMetadataStub(channel)


def allocated(channel: grpc.Channel, snap: str, start: int = 0, max_results: int = 0
              ) -> list[csi_pb2.GetMetadataAllocatedResponse]:
    return list(_stub(channel).GetMetadataAllocated(csi_pb2.GetMetadataAllocatedRequest(
        snapshot_id=snap, starting_offset=start, max_results=max_results), timeout=60))


def delta(channel: grpc.Channel, base: str, target: str, start: int = 0, max_results: int = 0
          ) -> list[csi_pb2.GetMetadataDeltaResponse]:
    return list(_stub(channel).GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(
        base_snapshot_id=base, target_snapshot_id=target, starting_offset=start, max_results=max_results),
        timeout=60))


def ranges(msgs: list, capacity: int) -> list[tuple[int, int]]:  # type: ignore[type-arg]
    """The tuples of a stream, checked: one type, one capacity, ascending, no overlap, inside the volume."""
    out = []
    for m in msgs:
        assert m.block_metadata_type == VARIABLE and m.volume_capacity_bytes == capacity
        out += [(b.byte_offset, b.size_bytes) for b in m.block_metadata]
    end = 0
    for off, n in out:
        assert n > 0 and off >= end and off + n <= capacity, out
        end = off + n
    return out


def stream_code(fn: object) -> C:
    try:
        list(fn())  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return C.OK


# ------------------------------------------------------------------------------------ errors (controller only)


def test_errors(server: CsiServer) -> None:
    ch = server.channel
    assert ch is not None
    vol = server.create_volume("cbt-err", 8 * MiB)
    other = server.create_volume("cbt-err-other", 8 * MiB)
    s1 = server.create_snapshot("cbt-err-s1", vol.volume_id)
    s2 = server.create_snapshot("cbt-err-s2", vol.volume_id)
    so = server.create_snapshot("cbt-err-so", other.volume_id)
    full = server.create_snapshot("cbt-err-full", vol.volume_id, parameters={"copyRate": "150"})
    s3 = server.create_snapshot("cbt-err-s3", vol.volume_id)

    assert ranges(allocated(ch, s1.snapshot_id), 8 * MiB) == []        # never written: nothing allocated
    assert ranges(delta(ch, s1.snapshot_id, s2.snapshot_id), 8 * MiB) == []
    cases = {
        "allocated: snapshot_id missing": (lambda: allocated(ch, ""), C.INVALID_ARGUMENT),
        "allocated: malformed id": (lambda: allocated(ch, "../etc"), C.INVALID_ARGUMENT),
        "allocated: unknown": (lambda: allocated(ch, "test-node.snap-0000000000000000"), C.NOT_FOUND),
        "allocated: a volume id": (lambda: allocated(ch, vol.volume_id), C.NOT_FOUND),
        "allocated: offset at the end": (lambda: allocated(ch, s1.snapshot_id, 8 * MiB), C.OUT_OF_RANGE),
        "allocated: offset past the end": (lambda: allocated(ch, s1.snapshot_id, 1 << 40), C.OUT_OF_RANGE),
        "allocated: negative offset": (lambda: allocated(ch, s1.snapshot_id, -1), C.INVALID_ARGUMENT),
        "allocated: negative max_results": (lambda: allocated(ch, s1.snapshot_id, 0, -1), C.INVALID_ARGUMENT),
        "delta: base missing": (lambda: delta(ch, "", s2.snapshot_id), C.INVALID_ARGUMENT),
        "delta: target missing": (lambda: delta(ch, s1.snapshot_id, ""), C.INVALID_ARGUMENT),
        "delta: unknown base": (lambda: delta(ch, "test-node.snap-0000000000000000", s2.snapshot_id),
                                C.NOT_FOUND),
        "delta: unknown target": (lambda: delta(ch, s1.snapshot_id, "test-node.snap-0000000000000000"),
                                  C.NOT_FOUND),
        "delta: volume as target": (lambda: delta(ch, s1.snapshot_id, vol.volume_id), C.NOT_FOUND),
        "delta: different volumes": (lambda: delta(ch, s1.snapshot_id, so.snapshot_id), C.INVALID_ARGUMENT),
        "delta: base newer": (lambda: delta(ch, s2.snapshot_id, s1.snapshot_id), C.FAILED_PRECONDITION),
        "delta: base is target": (lambda: delta(ch, s1.snapshot_id, s1.snapshot_id), C.FAILED_PRECONDITION),
        "delta: offset at the end": (lambda: delta(ch, s1.snapshot_id, s2.snapshot_id, 8 * MiB), C.OUT_OF_RANGE),
        "delta: negative offset": (lambda: delta(ch, s1.snapshot_id, s2.snapshot_id, -5), C.INVALID_ARGUMENT),
    }
    got = {what: stream_code(fn) for what, (fn, _) in cases.items()}
    assert got == {what: code for what, (_, code) in cases.items()}
    # a snapshot copied in full (copy rate 150) is split from its cascade: no tracking, a full backup instead
    from tests.waiting import wait_for

    def split() -> bool:
        return stream_code(lambda: delta(ch, full.snapshot_id, s3.snapshot_id)) == C.FAILED_PRECONDITION
    wait_for(split, timeout=30, what="the full-copy snapshot to split from its cascade")
    # the older snapshots read through it (vol -> s3 | full -> s2 -> s1): they track against it, not past it
    assert stream_code(lambda: delta(ch, s1.snapshot_id, full.snapshot_id)) == C.OK
    assert stream_code(lambda: delta(ch, s2.snapshot_id, s3.snapshot_id)) == C.FAILED_PRECONDITION


# ------------------------------------------------------------------------------------ data (node data path)


def _pattern(seed: int, length: int) -> bytes:
    import hashlib

    return (hashlib.sha256(str(seed).encode()).digest() * (length // 32 + 1))[:length]


def _pwrite(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread(dev: str, offset: int, length: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _grains_of(writes: dict[int, bytes]) -> set[int]:
    return {g for off, data in writes.items() for g in range(off // GRAIN, (off + len(data) - 1) // GRAIN + 1)}


def _covered_grains(rs: list[tuple[int, int]]) -> set[int]:
    return {g for off, n in rs for g in range(off // GRAIN, (off + n - 1) // GRAIN + 1)}


def _covers_blocks(rs: list[tuple[int, int]], a: bytes, b: bytes) -> None:
    """Every 4 KiB block where a and b differ lies inside one of the ranges."""
    for blk in range(0, len(a), BLOCK):
        if a[blk:blk + BLOCK] != b[blk:blk + BLOCK]:
            assert any(off <= blk and blk + BLOCK <= off + n for off, n in rs), f"changed block {blk} not covered"


SIZE = 16 * MiB


@pytest.fixture(scope="module", params=["embedded", "process"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if KERNEL_SKIP is not None:
        pytest.skip(f"the data tests write through the node data path: {KERNEL_SKIP}")
    from tests.datapath.csi_node import make_cluster

    yield from make_cluster(request, tmp_path_factory)


@pytest.mark.root
def test_allocated_delta_and_rebuild(cluster, tmp_path_factory: pytest.TempPathFactory) -> None:  # type: ignore[no-untyped-def]
    from tests.datapath.conftest import leftovers

    work = str(tmp_path_factory.mktemp("cbt"))
    ch = cluster.srv.channel
    vol = cluster.create("block", SIZE)
    stg, dev = cluster.attach(vol.volume_id, "block", work)
    attached = [(vol.volume_id, stg, dev)]
    try:
        first = {0: _pattern(1, BLOCK), 3 * MiB + 512: _pattern(2, MiB), SIZE - 8192: _pattern(3, 8192)}
        for off, data in first.items():
            _pwrite(dev, off, data)
        s1 = cluster.snapshot(vol.volume_id)
        second = {5 * MiB + 100: _pattern(4, BLOCK), 3 * MiB + 600 * 1024: _pattern(5, 64 * 1024),
                  10 * MiB: _pattern(6, 2 * MiB), 0: _pattern(1, BLOCK)}   # the last one rewrites the same bytes
        for off, data in second.items():
            _pwrite(dev, off, data)
        s2 = cluster.snapshot(vol.volume_id)
        _pwrite(dev, 14 * MiB, _pattern(7, MiB))                            # after s2: in neither
        img1, img2 = bytearray(SIZE), bytearray(SIZE)
        for off, data in first.items():
            img1[off:off + len(data)] = data
            img2[off:off + len(data)] = data
        for off, data in second.items():
            img2[off:off + len(data)] = data

        # Allocated: every written byte covered, no grain reported that was never written
        a1 = ranges(allocated(ch, s1.snapshot_id), SIZE)
        a2 = ranges(allocated(ch, s2.snapshot_id), SIZE)
        _covers_blocks(a1, bytes(img1), bytes(SIZE))
        _covers_blocks(a2, bytes(img2), bytes(SIZE))
        assert _covered_grains(a1) <= _grains_of(first)
        assert _covered_grains(a2) <= _grains_of(first) | _grains_of(second)

        # Delta: every changed 4 KiB block covered, nothing beyond the grains written between the two
        d = ranges(delta(ch, s1.snapshot_id, s2.snapshot_id), SIZE)
        _covers_blocks(d, bytes(img1), bytes(img2))
        assert _covered_grains(d) <= _grains_of(second)
        assert 14 * MiB // GRAIN not in _covered_grains(d)

        # paging: one tuple per message, the same tuples; resume at the end of a tuple; a start inside a tuple
        for get, whole in ((lambda **kw: allocated(ch, s2.snapshot_id, **kw), a2),
                           (lambda **kw: delta(ch, s1.snapshot_id, s2.snapshot_id, **kw), d)):
            msgs = get(max_results=1)
            assert all(len(m.block_metadata) <= 1 for m in msgs)
            assert ranges(msgs, SIZE) == whole
            off, n = whole[0]
            assert ranges(get(start=off + n), SIZE) == whole[1:]
            inside = off + n // 2
            assert ranges(get(start=inside, max_results=2), SIZE) == [(inside, off + n - inside)] + whole[1:]

        # a backup tool: base image + the delta's ranges read from the target = the target, byte for byte
        images = {}
        for snap in (s1, s2):
            r = cluster.create("block", SIZE, snapshot=snap.snapshot_id)
            rstg, rdev = cluster.attach(r.volume_id, "block", work)
            attached.append((r.volume_id, rstg, rdev))
            images[snap.snapshot_id] = _pread(rdev, 0, SIZE)
        assert images[s1.snapshot_id] == bytes(img1) and images[s2.snapshot_id] == bytes(img2)
        rebuilt = bytearray(images[s1.snapshot_id])
        target_dev = attached[-1][2]
        for off, n in d:
            rebuilt[off:off + n] = _pread(target_dev, off, n)
        assert rebuilt == images[s2.snapshot_id]
    finally:
        for vid, s, t in reversed(attached):
            cluster.detach(vid, s, t)
    assert not leftovers(work)
