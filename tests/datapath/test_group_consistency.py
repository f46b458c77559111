"""Group snapshots of 3 mounted volumes are write-order consistent under a dependent-write workload.

Each writer runs a chain across the volumes: a log record on A, then a data record on B, then a commit
record on C, then the next log record on A... Every write is O_SYNC and the next one is issued only after
it returned, so when a later write of the chain has reached its device, every earlier one has too. A group
snapshot (CreateVolumeGroupSnapshot: every filesystem frozen, one consistency-group start, thawed) taken
while the writers run must therefore restore, for every writer, exactly a prefix of its chain: never a
commit without its data, never data without its log record. The prefix must also lie between what had
completed before the RPC was sent and what had completed when it returned (plus the one write in flight).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from csi_driver.proto_gen import csi_pb2
from tests.datapath.conftest import needs_kernel
from tests.datapath.csi_node import ENGINE_MODES, NodeCluster, make_cluster
from tests.waiting import wait_for

REC = 4096
WRITERS = 3
ROUNDS = 3
ROLES = ("log", "data", "commit")  # chain order, one role per volume


@pytest.fixture(scope="module", params=ENGINE_MODES)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    yield from make_cluster(request, tmp_path_factory)


def record(rnd: int, writer: int, role: str, seq: int) -> bytes:
    head = f"round={rnd} writer={writer} role={role} seq={seq}\n".encode()
    body = hashlib.sha256(head).digest() * (REC // 32)
    return (head + body)[:REC]


class Writer(threading.Thread):
    """One dependent-write chain over the three mounted volumes."""

    def __init__(self, rnd: int, idx: int, mounts: list[str], stop: threading.Event):
        super().__init__(name=f"writer-{idx}", daemon=True)
        self.rnd, self.idx, self.stop_event = rnd, idx, stop
        self.paths = [f"{m}/r{rnd}-{role}-{idx}" for m, role in zip(mounts, ROLES, strict=True)]
        self.completed = 0  # chain writes that have returned
        self.error: BaseException | None = None

    def run(self) -> None:
        fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644) for p in self.paths]
        try:
            i = 0
            while not self.stop_event.is_set():
                seq, role_idx = divmod(i, 3)
                data = record(self.rnd, self.idx, ROLES[role_idx], seq)
                assert os.pwrite(fds[role_idx], data, seq * REC) == REC
                i += 1
                self.completed = i  # only after the write returned: the next one depends on it
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            for fd in fds:
                os.close(fd)


def restored_prefix(rnd: int, writer: int, mounts: list[str]) -> int:
    """Length of this writer's chain found in the restored volumes; fails unless it is an exact prefix."""
    counts = []
    for m, role in zip(mounts, ROLES, strict=True):
        path = f"{m}/r{rnd}-{role}-{writer}"
        data = open(path, "rb").read() if os.path.exists(path) else b""  # noqa: SIM115
        n = 0
        while (n + 1) * REC <= len(data) and data[n * REC:(n + 1) * REC] == record(rnd, writer, role, n):
            n += 1
        rest = data[n * REC:]
        # after the last complete record: nothing, or zeros of a size update that beat its data (never
        # a record of a later sequence number, nor foreign bytes)
        assert rest.count(0) == len(rest), f"{path}: {len(rest)} unexpected bytes after {n} records"
        counts.append(n)
    present = {3 * seq + r for r, n in enumerate(counts) for seq in range(n)}
    k = len(present)
    assert present == set(range(k)), (
        f"writer {writer}: restored records per role {dict(zip(ROLES, counts, strict=True))} are not a prefix "
        "of the dependent-write chain (a later write is present without an earlier one)")
    return k


def test_checker_rejects_a_torn_chain(tmp_path) -> None:
    """The checker has teeth: a commit without its data, or a later record after a gap, is refused."""
    mounts = [str(tmp_path / role) for role in ROLES]
    for m in mounts:
        os.makedirs(m)

    def put(role_idx: int, seqs: range) -> None:
        with open(f"{mounts[role_idx]}/r0-{ROLES[role_idx]}-0", "wb") as f:
            for seq in seqs:
                f.write(record(0, 0, ROLES[role_idx], seq))

    put(0, range(3))
    put(1, range(2))
    put(2, range(2))
    assert restored_prefix(0, 0, mounts) == 7  # a0 b0 c0 a1 b1 c1 a2
    put(2, range(3))  # commit 2 without data 2
    with pytest.raises(AssertionError, match="not a prefix"):
        restored_prefix(0, 0, mounts)
    put(2, range(2))
    with open(f"{mounts[1]}/r0-data-0", "ab") as f:
        f.write(b"\0" * REC + record(0, 0, "data", 3))  # a later record after a hole
    with pytest.raises(AssertionError, match="unexpected bytes"):
        restored_prefix(0, 0, mounts)


@needs_kernel
@pytest.mark.root
def test_group_snapshot_is_write_order_consistent(cluster: NodeCluster, workdir: str) -> None:
    vols = [cluster.create("ext4") for _ in ROLES]
    attached = [cluster.attach(v.volume_id, "ext4", workdir) for v in vols]
    mounts = [t for _, t in attached]
    rng = random.Random(1234)
    taken = []
    for rnd in range(ROUNDS):
        stop = threading.Event()
        writers = [Writer(rnd, i, mounts, stop) for i in range(WRITERS)]
        for w in writers:
            w.start()
        wait_for(lambda ws=writers: all(w.completed >= 5 for w in ws), timeout=60, what="every writer under way")
        time.sleep(rng.random() * 0.4)  # a random snapshot instant within the writes (pacing, not a wait)
        before = [w.completed for w in writers]
        resp = cluster.srv.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name=f"group-{uuid.uuid4().hex[:10]}", source_volume_ids=[v.volume_id for v in vols]), timeout=120)
        after = [w.completed for w in writers]
        time.sleep(0.2)  # the writers go on past the snapshot
        stop.set()
        for w in writers:
            w.join(30)
            assert not w.is_alive() and w.error is None, w.error
        final = [w.completed for w in writers]
        group = resp.group_snapshot
        assert group.ready_to_use and len(group.snapshots) == 3

        by_source = {s.source_volume_id: s for s in group.snapshots}
        restores = [cluster.create("ext4", snapshot=by_source[v.volume_id].snapshot_id) for v in vols]
        rattached = [cluster.attach(r.volume_id, "ext4", workdir) for r in restores]
        rmounts = [t for _, t in rattached]
        for i in range(WRITERS):
            k = restored_prefix(rnd, i, rmounts)
            assert before[i] <= k <= after[i] + 1, (
                f"round {rnd} writer {i}: restored {k} chain writes, but {before[i]} had completed before the "
                f"snapshot was asked for and {after[i]} when it returned")
            assert k < final[i], f"round {rnd} writer {i}: the snapshot holds writes made after it"
            taken.append(k)
        print(f"round {rnd}: restored chain lengths {taken[-WRITERS:]} (completed before the RPC {before}, "
              f"when it returned {after}, at the end {final})")
        for r, (stg, tgt) in zip(restores, rattached, strict=True):
            cluster.detach(r.volume_id, stg, tgt)
            cluster.delete(r.volume_id)
        cluster.srv.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id), timeout=60)
    assert all(k > 0 for k in taken), taken  # the writers really were mid-chain at every snapshot
    logs = cluster.srv.log() + cluster.engine_log()
    assert logs.count("froze 3 filesystem(s)") >= ROUNDS, "the group snapshots were not taken frozen"
    for v, (stg, tgt) in zip(vols, attached, strict=True):
        cluster.detach(v.volume_id, stg, tgt)
        cluster.delete(v.volume_id)
