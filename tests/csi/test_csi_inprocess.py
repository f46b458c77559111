"""The driver served in-process (real gRPC over a unix socket, real engine), where the test also holds the
engine: exact point-in-time data behind CreateSnapshot/CreateVolume/CreateVolumeGroupSnapshot, volume
condition of a broken copy, try-locks answering ABORTED, Probe before the engine is open."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver.csi.driver import BackendSlot, Driver
from csi_driver.csi.settings import Settings
from csi_driver.embedded import EmbeddedBackend
from csi_driver.engine import Engine
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc
from csi_driver.server import build_server
from csi_driver.sockets import bind
from tests.csi.conftest import NODE_ID, CsiStubs, MiB, mount_cap, rpc_code

C = grpc.StatusCode


@dataclass
class InProc(CsiStubs):
    driver: Driver
    engine: Engine
    channel: grpc.Channel

    def volume(self, name: str, size: int = 4 * MiB, **params: str) -> str:
        return self.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[mount_cap()], parameters=params,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size))).volume.volume_id


def _settings() -> Settings:
    return Settings(driver_name="flashcopy.csi.dev", vendor_version="test", node_id=NODE_ID)


@pytest.fixture
def inproc() -> Iterator[InProc]:
    root = Path(tempfile.mkdtemp(prefix="csi-inproc-"))
    backend = EmbeddedBackend.open(str(root / "state"))
    driver = Driver(_settings(), BackendSlot(backend))
    server = build_server(driver, max_workers=4)
    bind(server, f"unix://{root}/csi.sock")
    server.start()
    channel = grpc.insecure_channel(f"unix://{root}/csi.sock")
    try:
        yield InProc(driver, backend.engine, channel)
    finally:
        channel.close()
        server.stop(5).wait()
        driver.slot.close()


def pattern(byte: int, size: int) -> bytes:
    return bytes([byte]) * size


def test_snapshot_is_an_exact_point_in_time_copy(inproc: InProc) -> None:
    eng = inproc.engine
    vid = inproc.volume("pit", 4 * MiB)
    eng.write(vid, 0, pattern(0xA1, 4 * MiB))
    eng.write(vid, 1000, b"hello")  # not grain aligned
    before = eng.read(vid, 0, 4 * MiB)
    snap = inproc.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="pit-snap", source_volume_id=vid)).snapshot
    eng.write(vid, 0, pattern(0xB2, 3 * MiB))  # the source moves on
    assert eng.read(snap.snapshot_id, 0, 4 * MiB) == before
    # a volume restored from it is usable at once and shows the snapshot's data
    restored = inproc.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pit-restore", volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB),
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))).volume
    assert eng.read(restored.volume_id, 0, 4 * MiB) == before
    assert eng.read(restored.volume_id, 4 * MiB, 4 * MiB) == bytes(4 * MiB)  # the extra range reads as zeros
    # writes to the restored volume do not touch the snapshot
    eng.write(restored.volume_id, 0, pattern(0xC3, MiB))
    assert eng.read(snap.snapshot_id, 0, 4 * MiB) == before
    # a clone of the live volume shows its current data
    clone = inproc.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pit-clone", volume_capabilities=[mount_cap()],
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid)))).volume
    assert eng.read(clone.volume_id, 0, 4 * MiB) == eng.read(vid, 0, 4 * MiB)
    # deleting the snapshot while the restored volume still reads through it keeps the data intact
    inproc.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert eng.read(restored.volume_id, MiB, 3 * MiB) == before[MiB:]
    # full-copy snapshot class: becomes independent in the background
    full = inproc.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="pit-full", source_volume_id=vid, parameters={"copyRate": "150"})).snapshot
    assert eng.wait_copies(timeout=60)
    assert eng.read(full.snapshot_id, 0, 4 * MiB) == eng.read(vid, 0, 4 * MiB)


def test_group_snapshot_is_one_instant(inproc: InProc) -> None:
    eng = inproc.engine
    vids = [inproc.volume(f"g{i}", 2 * MiB) for i in range(4)]
    for i, v in enumerate(vids):
        eng.write(v, 0, pattern(i + 1, 2 * MiB))
    g = inproc.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="gsnap", source_volume_ids=vids)).group_snapshot
    for v in vids:
        eng.write(v, 0, pattern(0xEE, 2 * MiB))
    by_source = {s.source_volume_id: s.snapshot_id for s in g.snapshots}
    for i, v in enumerate(vids):
        assert eng.read(by_source[v], 0, 2 * MiB) == pattern(i + 1, 2 * MiB)
    # one engine consistency group, named by the group snapshot id
    assert [x.name for x in eng.list_groups()] == [g.group_snapshot_id]
    inproc.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id))
    assert eng.list_groups() == []


def test_volume_condition_reports_a_broken_copy(inproc: InProc) -> None:
    eng = inproc.engine
    src = inproc.volume("cond-src", 4 * MiB)
    eng.write(src, 0, pattern(7, 4 * MiB))
    clone = inproc.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="cond-clone", volume_capabilities=[mount_cap()], parameters={"copyRate": "0"},
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=src)))).volume.volume_id
    ok = inproc.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=clone))
    assert ok.status.volume_condition.abnormal is False
    (mapping,) = [m for m in eng.list_mappings(volume_id=clone) if m.target_id == clone]
    eng.stop_mapping(mapping.id, force=True)  # stopped before the copy completed: the clone's data is gone
    bad = inproc.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=clone))
    assert bad.status.volume_condition.abnormal is True and bad.status.volume_condition.message
    listed = {e.volume.volume_id: e.status.volume_condition.abnormal
              for e in inproc.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
    assert listed == {src: False, clone: True}
    # a snapshot of an offline volume is refused with FAILED_PRECONDITION
    assert rpc_code(inproc.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        name="of-broken", source_volume_id=clone)) == C.FAILED_PRECONDITION


@pytest.mark.parametrize("key, call", [
    ("volume-name:busy", lambda p, vid: p.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="busy", volume_capabilities=[mount_cap()]))),
    ("volume:{vid}", lambda p, vid: p.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))),
    ("volume:{vid}", lambda p, vid: p.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)))),
    ("snapshot-name:busy", lambda p, vid: p.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="busy", source_volume_id=vid))),
    ("group-name:busy", lambda p, vid: p.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="busy", source_volume_ids=[vid]))),
])
def test_operation_in_flight_is_aborted(inproc: InProc, key: str, call: object) -> None:
    vid = inproc.volume("lock-target")
    with inproc.driver.locks.hold(key.format(vid=vid)):
        with pytest.raises(grpc.RpcError) as e:
            call(inproc, vid)  # type: ignore[operator]
        assert e.value.code() == C.ABORTED
    call(inproc, vid)  # type: ignore[operator]  # free again
    assert inproc.driver.locks.busy() == set()


def test_probe_before_engine_open() -> None:
    root = Path(tempfile.mkdtemp(prefix="csi-probe-"))
    slot = BackendSlot()
    driver = Driver(_settings(), slot)
    server = build_server(driver, max_workers=2)
    bind(server, f"unix://{root}/csi.sock")
    server.start()
    channel = grpc.insecure_channel(f"unix://{root}/csi.sock")
    try:
        ident = csi_pb2_grpc.IdentityStub(channel)
        ctl = csi_pb2_grpc.ControllerStub(channel)
        assert ident.Probe(csi_pb2.ProbeRequest()).ready.value is False
        assert rpc_code(ctl.ListVolumes, csi_pb2.ListVolumesRequest()) == C.UNAVAILABLE
        slot.set(EmbeddedBackend.open(str(root / "state")))
        assert ident.Probe(csi_pb2.ProbeRequest()).ready.value is True
        assert rpc_code(ctl.ListVolumes, csi_pb2.ListVolumesRequest()) == C.OK
        slot.close()
        assert ident.Probe(csi_pb2.ProbeRequest()).ready.value is False
        assert rpc_code(ctl.ListVolumes, csi_pb2.ListVolumesRequest()) == C.UNAVAILABLE
    finally:
        channel.close()
        server.stop(2).wait()
