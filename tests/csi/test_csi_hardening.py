"""Issue 22, item 7: small hardening fixes at the CSI layer, each shown through the real in-process server
(real gRPC over a unix socket, real engine)."""

from __future__ import annotations

import grpc
import pytest

from csi_driver.proto_gen import csi_pb2
from tests.csi.conftest import MiB, mount_cap, rpc_code
from tests.csi.test_csi_inprocess import InProc, inproc  # noqa: F401 (fixture)

C = grpc.StatusCode
HUGE = 2**63 - 1  # the largest int64 a CapacityRange can hold


def test_huge_required_bytes_is_out_of_range(inproc: InProc) -> None:  # noqa: F811
    ctl = inproc.controller
    assert rpc_code(ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
        name="huge", volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=HUGE))) == C.OUT_OF_RANGE
    vid = inproc.volume("small", 4 * MiB)
    assert rpc_code(ctl.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=HUGE))) == C.OUT_OF_RANGE
    assert rpc_code(ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
        name="huge-clone", volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=HUGE),
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid)))) == C.OUT_OF_RANGE
    # nothing was left behind, and the volume kept its size
    assert [e.volume.volume_id for e in ctl.ListVolumes(csi_pb2.ListVolumesRequest()).entries] == [vid]


@pytest.mark.parametrize("rate", [" 50", "50 ", "\uff15\uff10", "\u0665\u0660", "+50", "5_0"])
def test_copy_rate_takes_ascii_digits_only(inproc: InProc, rate: str) -> None:  # noqa: F811
    assert rpc_code(inproc.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
        name="rate", volume_capabilities=[mount_cap()], parameters={"copyRate": rate})) == C.INVALID_ARGUMENT
    assert rpc_code(inproc.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        name="rate", source_volume_id=inproc.volume("v"), parameters={"copyRate": rate})) == C.INVALID_ARGUMENT
    assert rpc_code(inproc.controller.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(
        volume_id=inproc.volume("v"), mutable_parameters={"copyRate": rate})) == C.INVALID_ARGUMENT


def test_snapshot_whose_copy_stopped_is_not_ready(inproc: InProc) -> None:  # noqa: F811
    eng, ctl = inproc.engine, inproc.controller
    src = inproc.volume("snap-src", 4 * MiB)
    snap = ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=src)).snapshot
    assert snap.ready_to_use
    (mapping,) = [m for m in eng.list_mappings(volume_id=snap.snapshot_id) if m.target_id == snap.snapshot_id]
    eng.stop_mapping(mapping.id, force=True)  # what a copy out of space ends in: the snapshot lost its data
    got = ctl.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    assert got.ready_to_use is False
    (listed,) = ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)).entries
    assert listed.snapshot.ready_to_use is False


def test_engine_refuses_a_size_no_file_offset_reaches(inproc: InProc) -> None:  # noqa: F811
    from csi_driver.engine import errors

    eng = inproc.engine
    with pytest.raises(errors.OutOfRange):
        eng.create_volume("e-huge", HUGE)
    vid = eng.create_volume("e-small", 4 * MiB).id
    with pytest.raises(errors.OutOfRange):
        eng.resize_volume(vid, HUGE)
    with pytest.raises(errors.OutOfRange):
        eng.clone(vid, "e-huge-clone", size=HUGE)
    assert eng.get_volume(vid).size == 4 * MiB


@pytest.mark.parametrize("path", ["//", "///", "//./", "/./"])
def test_node_paths_that_spell_the_root_directory_are_refused(inproc: InProc, path: str) -> None:  # noqa: F811
    """os.path.normpath keeps a leading '//' (POSIX leaves it implementation-defined), so '//' passed the
    'not the root directory' check: the data path would mount over / (CSI: INVALID_ARGUMENT)."""
    vid = inproc.volume("root-path")
    assert rpc_code(inproc.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=path, volume_capability=mount_cap())) == C.INVALID_ARGUMENT
    assert rpc_code(inproc.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path="/tmp/stage", target_path=path,
        volume_capability=mount_cap())) == C.INVALID_ARGUMENT
