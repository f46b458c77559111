"""32 concurrent clients creating, snapshotting (also in groups), cloning and deleting through one `serve` process:
no deadlock (every call returns within its deadline), no lost volume (everything acknowledged and not deleted
is listed), no leak (nothing listed that nobody made; after deleting everything no data file is left)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from csi_driver.engine import Engine
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc
from tests.csi.conftest import MiB, mount_cap
from tests.waiting import wait_for

C = grpc.StatusCode
CLIENTS = 32
ROUNDS = 4
DEADLINE = 120.0


def retrying(fn: Callable[..., Any], req: Any) -> Any:
    """Call until the answer is not ABORTED (an operation on the same name/id was in flight)."""
    for _ in range(400):
        try:
            return fn(req, timeout=DEADLINE)
        except grpc.RpcError as e:
            if e.code() != C.ABORTED:
                raise
            time.sleep(random.uniform(0.001, 0.02))  # retry backoff (what a sidecar does), not a wait
    raise AssertionError("still ABORTED after 400 tries")


def vol_req(name: str, source: csi_pb2.VolumeContentSource | None = None) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap()],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB))
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return req


def test_32_clients(server_factory) -> None:
    srv = server_factory("conc").start()
    shared = srv.create_volume("shared-source", 16 * MiB).volume_id
    lock = threading.Lock()
    live_volumes: set[str] = {shared}
    live_snapshots: set[str] = set()
    contended: dict[str, set[str]] = {}
    groups: set[str] = set()
    errors: list[str] = []
    aborted = [0]

    def client(n: int) -> None:
        rng = random.Random(n)
        channel = grpc.insecure_channel(srv.endpoint)
        ctl = csi_pb2_grpc.ControllerStub(channel)
        grp = csi_pb2_grpc.GroupControllerStub(channel)
        try:
            for r in range(ROUNDS):
                vid = retrying(ctl.CreateVolume, vol_req(f"c{n}-r{r}")).volume.volume_id
                with lock:
                    live_volumes.add(vid)
                # everybody snapshots the shared source at once, and their own volume
                sid_shared = retrying(ctl.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
                    name=f"s-shared-{n}-{r}", source_volume_id=shared)).snapshot.snapshot_id
                sid = retrying(ctl.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
                    name=f"s{n}-r{r}", source_volume_id=vid)).snapshot.snapshot_id
                with lock:
                    live_snapshots.update({sid, sid_shared})
                clone = retrying(ctl.CreateVolume, vol_req(f"clone{n}-r{r}", csi_pb2.VolumeContentSource(
                    snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=sid)))).volume.volume_id
                with lock:
                    live_volumes.add(clone)
                # a consistency group over the new volume, its clone and the shared source
                g = retrying(grp.CreateVolumeGroupSnapshot, csi_pb2.CreateVolumeGroupSnapshotRequest(
                    name=f"g{n}-r{r}", source_volume_ids=[vid, clone, shared])).group_snapshot
                assert len(g.snapshots) == 3
                if rng.random() < 0.5:
                    retrying(grp.DeleteVolumeGroupSnapshot, csi_pb2.DeleteVolumeGroupSnapshotRequest(
                        group_snapshot_id=g.group_snapshot_id))
                else:
                    with lock:
                        live_snapshots.update(x.snapshot_id for x in g.snapshots)
                        groups.add(g.group_snapshot_id)
                # several clients race for the same name: one volume, every answer names it (or ABORTED)
                name = f"contended-{r}-{n % 4}"
                try:
                    got = ctl.CreateVolume(vol_req(name), timeout=DEADLINE).volume.volume_id
                    with lock:
                        contended.setdefault(name, set()).add(got)
                        live_volumes.add(got)
                except grpc.RpcError as e:
                    if e.code() != C.ABORTED:
                        raise
                    with lock:
                        aborted[0] += 1
                # delete the source volume and its snapshot while the clone still reads through them
                if rng.random() < 0.7:
                    retrying(ctl.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
                    retrying(ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))
                    with lock:
                        live_snapshots.discard(sid)
                        live_volumes.discard(vid)
                if rng.random() < 0.5:
                    retrying(ctl.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=sid_shared))
                    with lock:
                        live_snapshots.discard(sid_shared)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(f"client {n}: {e!r}")
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(n,), name=f"client-{n}") for n in range(CLIENTS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not [t.name for t in threads if t.is_alive()], "clients still running: deadlock?"
    assert not errors, errors[:5]
    elapsed = time.monotonic() - start

    for name, ids in contended.items():
        assert len(ids) == 1, f"{name} answered with {ids}"
    listed_vols = {e.volume.volume_id for e in srv.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
    listed_snaps = {e.snapshot.snapshot_id
                    for e in srv.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries}
    assert listed_vols == live_volumes  # none lost, none leaked
    assert listed_snaps == live_snapshots
    # every surviving clone is healthy
    for vid in listed_vols:
        got = srv.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
        assert not got.status.volume_condition.abnormal, got

    # delete everything; after a restart of the engine nothing remains on disk
    for gid in groups:
        srv.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid))
    listed_snaps = {e.snapshot.snapshot_id
                    for e in srv.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries}
    for sid in listed_snaps:
        srv.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
    for vid in listed_vols:
        srv.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert list(srv.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries) == []
    assert srv.stop() == 0
    eng = Engine.open(str(srv.state))
    try:
        assert eng.wait_copies(timeout=120)
        assert eng.list_volumes() == [] and eng.list_groups() == []
        wait_for(lambda: os.listdir(os.path.join(srv.state, "volumes")) == [], timeout=60,
                 what="every data file reclaimed")
    finally:
        eng.close()
    print(f"32 clients x {ROUNDS} rounds: {elapsed:.1f}s, {aborted[0]} ABORTED answers on contended names")
