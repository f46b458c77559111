"""Every implemented RPC, each CSI error rule, idempotency and paging, over a real gRPC channel on a unix socket
to a real `csi-flashcopy serve --mode all` subprocess."""

from __future__ import annotations

import uuid

import grpc
import pytest

from csi_driver.proto_gen import csi_pb2
from tests.csi.conftest import NODE_ID, TOPOLOGY_KEY, CsiServer, GiB, MiB, block_cap, mount_cap, rpc_code

C = grpc.StatusCode
AM = csi_pb2.VolumeCapability.AccessMode
CTL_RPC = csi_pb2.ControllerServiceCapability.RPC


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def snap_source(sid: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=sid))


def vol_source(vid: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid))


# ---------------------------------------------------------------------------------------------- Identity


def test_identity(server: CsiServer) -> None:
    info = server.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "flashcopy.csi.dev" and info.vendor_version
    caps = server.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = {csi_pb2.PluginCapability.Service.Type.Name(c.service.type) for c in caps if c.HasField("service")}
    assert services == {"CONTROLLER_SERVICE", "GROUP_CONTROLLER_SERVICE", "VOLUME_ACCESSIBILITY_CONSTRAINTS",
                        "SNAPSHOT_METADATA_SERVICE"}
    expansion = [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")]
    assert expansion == [csi_pb2.PluginCapability.VolumeExpansion.ONLINE]
    assert server.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_capabilities(server: CsiServer) -> None:
    caps = server.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
    names = {CTL_RPC.Type.Name(c.rpc.type) for c in caps}
    assert names == {"CREATE_DELETE_VOLUME", "LIST_VOLUMES", "GET_CAPACITY", "CREATE_DELETE_SNAPSHOT",
                     "LIST_SNAPSHOTS", "CLONE_VOLUME", "EXPAND_VOLUME", "VOLUME_CONDITION", "GET_VOLUME",
                     "SINGLE_NODE_MULTI_WRITER", "GET_SNAPSHOT", "MODIFY_VOLUME"}
    gcaps = server.group.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in gcaps.capabilities] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    ncaps = server.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    assert {csi_pb2.NodeServiceCapability.RPC.Type.Name(c.rpc.type) for c in ncaps.capabilities} == {
        "STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME", "VOLUME_CONDITION", "SINGLE_NODE_MULTI_WRITER"}


def test_node_get_info(server: CsiServer) -> None:
    info = server.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: NODE_ID}
    assert info.max_volumes_per_node == 0


def test_not_advertised_rpcs_are_unimplemented(server: CsiServer) -> None:
    req = csi_pb2.ControllerPublishVolumeRequest(volume_id="vol-x", node_id=NODE_ID, volume_capability=mount_cap())
    assert rpc_code(server.controller.ControllerPublishVolume, req) == C.UNIMPLEMENTED


# ---------------------------------------------------------------------------------------------- CreateVolume


def test_create_volume_shape_and_idempotency(server: CsiServer) -> None:
    name = uniq("pvc")
    req = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=100 * MiB + 1),
        volume_capabilities=[mount_cap(), block_cap()],
        parameters={"grainSize": "64Ki", "csi.storage.k8s.io/pvc/name": "data", "copyRate": "70"},
    )
    v1 = server.controller.CreateVolume(req).volume
    assert v1.capacity_bytes == 100 * MiB + 64 * 1024  # rounded up to the 64 KiB grain
    assert v1.volume_id.startswith(f"{NODE_ID}.vol-")  # ids name the node holding the volume
    assert [dict(t.segments) for t in v1.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]
    assert v1.volume_context["grainSize"] == str(64 * 1024)
    assert not v1.HasField("content_source")
    # same name + same arguments (defaults spelled out, other sidecar metadata): the same volume
    req2 = csi_pb2.CreateVolumeRequest()
    req2.CopyFrom(req)
    req2.parameters["cleanRate"] = "50"
    req2.parameters["csi.storage.k8s.io/pvc/namespace"] = "ns"
    assert server.controller.CreateVolume(req2).volume == v1
    # same name, different capacity / parameters: ALREADY_EXISTS
    bigger = csi_pb2.CreateVolumeRequest()
    bigger.CopyFrom(req)
    bigger.capacity_range.required_bytes = 1 * GiB
    assert rpc_code(server.controller.CreateVolume, bigger) == C.ALREADY_EXISTS
    other = csi_pb2.CreateVolumeRequest()
    other.CopyFrom(req)
    other.parameters["copyRate"] = "10"
    assert rpc_code(server.controller.CreateVolume, other) == C.ALREADY_EXISTS


def test_create_volume_default_and_limit_sizes(server: CsiServer) -> None:
    v = server.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=uniq("nocap"), volume_capabilities=[mount_cap()])).volume
    assert v.capacity_bytes == 1 * GiB
    v = server.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=uniq("limit"), volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(limit_bytes=10 * MiB + 5))).volume
    assert v.capacity_bytes == 10 * MiB  # the largest grain multiple under the limit
    req = csi_pb2.CreateVolumeRequest(name=uniq("tiny"), volume_capabilities=[mount_cap()],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=1, limit_bytes=1000))
    assert rpc_code(server.controller.CreateVolume, req) == C.OUT_OF_RANGE


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.ClearField("name"), "name"),
        (lambda r: r.ClearField("volume_capabilities"), "volume_capabilities"),
        (lambda r: r.volume_capabilities[0].ClearField("access_mode"), "access_mode"),
        (lambda r: r.volume_capabilities[0].ClearField("mount"), "access_type"),
        (lambda r: r.volume_capabilities[0].access_mode.__setattr__("mode", AM.MULTI_NODE_MULTI_WRITER),
         "volume_capabilities[0]"),
        (lambda r: r.volume_capabilities[0].mount.__setattr__("fs_type", "zfs"), "volume_capabilities[0]"),
        (lambda r: r.capacity_range.__setattr__("required_bytes", -1), "required_bytes"),
        (lambda r: r.capacity_range.__setattr__("limit_bytes", 1), "capacity_range"),
        (lambda r: r.parameters.__setitem__("bogus", "1"), "parameters[bogus]"),
        (lambda r: r.parameters.__setitem__("grainSize", "128Ki"), "parameters[grainSize]"),
        (lambda r: r.parameters.__setitem__("copyRate", "151"), "parameters[copyRate]"),
        (lambda r: r.parameters.__setitem__("cleanRate", "fast"), "parameters[cleanRate]"),
        (lambda r: r.mutable_parameters.__setitem__("iops", "5"), "mutable_parameters"),
        (lambda r: r.volume_content_source.snapshot.__setattr__("snapshot_id", "../../etc"), "snapshot_id"),
        (lambda r: r.__setattr__("name", "x" * 129), "name"),
        (lambda r: r.__setattr__("name", "bad\nname"), "name"),
    ],
)
def test_create_volume_invalid_argument(server: CsiServer, mutate: object, field: str) -> None:
    req = csi_pb2.CreateVolumeRequest(name=uniq("bad"), volume_capabilities=[mount_cap()],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=MiB))
    mutate(req)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as e:
        server.controller.CreateVolume(req)
    assert e.value.code() == C.INVALID_ARGUMENT
    assert field in e.value.details()


def test_create_volume_topology(server: CsiServer) -> None:
    elsewhere = csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={TOPOLOGY_KEY: "other"})])
    req = csi_pb2.CreateVolumeRequest(name=uniq("topo"), volume_capabilities=[mount_cap()],
                                      accessibility_requirements=elsewhere)
    assert rpc_code(server.controller.CreateVolume, req) == C.RESOURCE_EXHAUSTED
    here = csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={TOPOLOGY_KEY: "other"}),
                                                  csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID})],
                                       preferred=[csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID})])
    req = csi_pb2.CreateVolumeRequest(name=uniq("topo"), volume_capabilities=[mount_cap()],
                                      accessibility_requirements=here)
    assert server.controller.CreateVolume(req).volume.volume_id


def test_clone_and_restore(server: CsiServer) -> None:
    src = server.create_volume(uniq("src"), 64 * MiB)
    snap = server.create_snapshot(uniq("snap"), src.volume_id)
    assert snap.ready_to_use and snap.size_bytes == 64 * MiB and snap.source_volume_id == src.volume_id
    # restore: same size, larger, smaller (OUT_OF_RANGE), idempotent, wrong source kind
    name = uniq("restore")
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap()],
                                      volume_content_source=snap_source(snap.snapshot_id))
    restored = server.controller.CreateVolume(req).volume
    assert restored.capacity_bytes == 64 * MiB
    assert restored.content_source == snap_source(snap.snapshot_id)  # echoed
    assert server.controller.CreateVolume(req).volume.volume_id == restored.volume_id
    bigger = server.create_volume(uniq("restore-big"), 128 * MiB, volume_content_source=snap_source(snap.snapshot_id))
    assert bigger.capacity_bytes == 128 * MiB
    small = csi_pb2.CreateVolumeRequest(
        name=uniq("restore-small"), volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB, limit_bytes=32 * MiB),
        volume_content_source=snap_source(snap.snapshot_id))
    assert rpc_code(server.controller.CreateVolume, small) == C.OUT_OF_RANGE
    # same name, another source: ALREADY_EXISTS
    other = csi_pb2.CreateVolumeRequest()
    other.CopyFrom(req)
    other.volume_content_source.CopyFrom(vol_source(src.volume_id))
    assert rpc_code(server.controller.CreateVolume, other) == C.ALREADY_EXISTS
    # clone of a volume
    clone = server.create_volume(uniq("clone"), 64 * MiB, volume_content_source=vol_source(src.volume_id))
    assert clone.content_source == vol_source(src.volume_id)
    # sources that do not exist, or exist as the other kind: NOT_FOUND
    for source in (snap_source("snap-00000000"), vol_source("vol-00000000"),
                   snap_source(src.volume_id), vol_source(snap.snapshot_id)):
        req = csi_pb2.CreateVolumeRequest(name=uniq("nosrc"), volume_capabilities=[mount_cap()],
                                          volume_content_source=source)
        assert rpc_code(server.controller.CreateVolume, req) == C.NOT_FOUND


# ---------------------------------------------------------------------------------------------- DeleteVolume


def test_delete_volume(server: CsiServer) -> None:
    v = server.create_volume(uniq("del"))
    snap = server.create_snapshot(uniq("del-snap"), v.volume_id)
    clone = server.create_volume(uniq("del-clone"), volume_content_source=vol_source(v.volume_id))
    # succeeds while a snapshot and a clone depend on it; idempotent
    for _ in range(2):
        server.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
    assert rpc_code(server.controller.ControllerGetVolume,
                    csi_pb2.ControllerGetVolumeRequest(volume_id=v.volume_id)) == C.NOT_FOUND
    # the dependents still work
    assert server.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    restored = server.create_volume(uniq("after"), volume_content_source=snap_source(snap.snapshot_id))
    assert restored.volume_id
    got = server.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=clone.volume_id))
    assert not got.status.volume_condition.abnormal
    # deleting a snapshot through DeleteVolume does nothing (it is not a volume)
    server.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=snap.snapshot_id))
    assert server.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    assert rpc_code(server.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest()) == C.INVALID_ARGUMENT
    assert rpc_code(server.controller.DeleteVolume,
                    csi_pb2.DeleteVolumeRequest(volume_id="../x")) == C.INVALID_ARGUMENT
    assert rpc_code(server.controller.DeleteVolume,
                    csi_pb2.DeleteVolumeRequest(volume_id="vol-never-was")) == C.OK


def test_name_reuse_after_delete(server: CsiServer) -> None:
    name = uniq("reuse")
    v1 = server.create_volume(name)
    server.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v1.volume_id))
    v2 = server.create_volume(name)
    assert v2.volume_id != v1.volume_id


# ---------------------------------------------------------------------------------------------- queries


def test_controller_get_volume_and_validate(server: CsiServer) -> None:
    v = server.create_volume(uniq("get"))
    got = server.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=v.volume_id))
    assert got.volume == v
    assert got.status.volume_condition.abnormal is False
    assert rpc_code(server.controller.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest()) \
        == C.INVALID_ARGUMENT
    assert rpc_code(server.controller.ControllerGetVolume,
                    csi_pb2.ControllerGetVolumeRequest(volume_id="vol-unknown")) == C.NOT_FOUND

    ok = server.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=v.volume_id, volume_capabilities=[mount_cap(), block_cap(AM.SINGLE_NODE_READER_ONLY)]))
    assert len(ok.confirmed.volume_capabilities) == 2
    no = server.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=v.volume_id, volume_capabilities=[mount_cap(AM.MULTI_NODE_MULTI_WRITER)]))
    assert not no.HasField("confirmed") and "MULTI_NODE_MULTI_WRITER" in no.message
    no = server.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=v.volume_id, volume_capabilities=[mount_cap()], parameters={"grainSize": "64Ki"}))
    assert not no.HasField("confirmed") and "parameters" in no.message
    assert rpc_code(server.controller.ValidateVolumeCapabilities, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=v.volume_id)) == C.INVALID_ARGUMENT
    assert rpc_code(server.controller.ValidateVolumeCapabilities, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="vol-unknown", volume_capabilities=[mount_cap()])) == C.NOT_FOUND


def test_get_capacity(server: CsiServer) -> None:
    cap = server.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    assert cap.available_capacity > 0
    elsewhere = server.controller.GetCapacity(csi_pb2.GetCapacityRequest(
        accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: "other-node"})))
    assert elsewhere.available_capacity == 0
    unsupported = server.controller.GetCapacity(csi_pb2.GetCapacityRequest(
        volume_capabilities=[mount_cap(AM.MULTI_NODE_READER_ONLY)]))
    assert unsupported.available_capacity == 0
    assert rpc_code(server.controller.GetCapacity,
                    csi_pb2.GetCapacityRequest(parameters={"nope": "1"})) == C.INVALID_ARGUMENT


def test_expand_volume(server: CsiServer) -> None:
    v = server.create_volume(uniq("grow"), 64 * MiB)
    req = csi_pb2.ControllerExpandVolumeRequest(volume_id=v.volume_id,
                                                capacity_range=csi_pb2.CapacityRange(required_bytes=200 * MiB))
    resp = server.controller.ControllerExpandVolume(req)
    assert resp.capacity_bytes == 200 * MiB and resp.node_expansion_required
    assert server.controller.ControllerExpandVolume(req).capacity_bytes == 200 * MiB  # idempotent
    # asking for less than it has: no shrink, current size reported
    req.capacity_range.required_bytes = 10 * MiB
    assert server.controller.ControllerExpandVolume(req).capacity_bytes == 200 * MiB
    got = server.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=v.volume_id))
    assert got.volume.capacity_bytes == 200 * MiB
    assert rpc_code(server.controller.ControllerExpandVolume,
                    csi_pb2.ControllerExpandVolumeRequest(volume_id=v.volume_id)) == C.INVALID_ARGUMENT
    assert rpc_code(server.controller.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id="vol-unknown", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))) == C.NOT_FOUND
    huge = csi_pb2.ControllerExpandVolumeRequest(volume_id=v.volume_id,
                                                 capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 62))
    assert rpc_code(server.controller.ControllerExpandVolume, huge) == C.OUT_OF_RANGE


def test_list_volumes_paging(server: CsiServer) -> None:
    made = {server.create_volume(uniq("page")).volume_id for _ in range(7)}
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = server.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=3, starting_token=token))
        assert len(resp.entries) <= 3
        seen += [e.volume.volume_id for e in resp.entries]
        for e in resp.entries:
            assert e.status.HasField("volume_condition")
        pages += 1
        token = resp.next_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and made <= set(seen) and pages >= 3
    full = server.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert [e.volume.volume_id for e in full.entries] == seen and not full.next_token
    # snapshots are not volumes
    assert all(".snap-" not in e.volume.volume_id for e in full.entries)
    # a token stays valid when the last entry of its page is deleted meanwhile
    first = server.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
    server.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=first.entries[-1].volume.volume_id))
    rest = server.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=first.next_token))
    assert [e.volume.volume_id for e in rest.entries] == seen[2:]
    for bad in ("invalid-token", "1.5~../etc", "nan~vol-x"):
        assert rpc_code(server.controller.ListVolumes, csi_pb2.ListVolumesRequest(starting_token=bad)) == C.ABORTED
    assert rpc_code(server.controller.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=-1)) \
        == C.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------------------- snapshots


def test_snapshot_rules(server: CsiServer) -> None:
    v1 = server.create_volume(uniq("sv1"))
    v2 = server.create_volume(uniq("sv2"))
    name = uniq("snap")
    s = server.create_snapshot(name, v1.volume_id)
    assert s.snapshot_id.startswith(f"{NODE_ID}.snap-") and s.ready_to_use and s.creation_time.seconds > 0
    assert not s.group_snapshot_id
    assert server.create_snapshot(name, v1.volume_id) == s  # idempotent
    assert rpc_code(server.controller.CreateSnapshot,
                    csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=v2.volume_id)) == C.ALREADY_EXISTS
    assert rpc_code(server.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=v1.volume_id, parameters={"copyRate": "20"})) == C.ALREADY_EXISTS
    # a snapshot and a volume may share a CSI name (separate namespaces)
    same = server.create_volume(name)
    assert same.volume_id != s.snapshot_id
    # full-copy snapshot class
    full = server.create_snapshot(uniq("full"), v1.volume_id, parameters={"copyRate": "100"})
    assert full.ready_to_use
    for req, code in [
        (csi_pb2.CreateSnapshotRequest(source_volume_id=v1.volume_id), C.INVALID_ARGUMENT),
        (csi_pb2.CreateSnapshotRequest(name=uniq("n")), C.INVALID_ARGUMENT),
        (csi_pb2.CreateSnapshotRequest(name=uniq("n"), source_volume_id="vol-missing"), C.NOT_FOUND),
        (csi_pb2.CreateSnapshotRequest(name=uniq("n"), source_volume_id=s.snapshot_id), C.NOT_FOUND),
        (csi_pb2.CreateSnapshotRequest(name=uniq("n"), source_volume_id="a/b"), C.INVALID_ARGUMENT),
        (csi_pb2.CreateSnapshotRequest(name=uniq("n"), source_volume_id=v1.volume_id,
                                       parameters={"grainSize": "64Ki"}), C.INVALID_ARGUMENT),
        (csi_pb2.CreateSnapshotRequest(name=uniq("n"), source_volume_id=v1.volume_id,
                                       parameters={"copyRate": "-1"}), C.INVALID_ARGUMENT),
    ]:
        assert rpc_code(server.controller.CreateSnapshot, req) == code, req

    got = server.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=s.snapshot_id)).snapshot
    assert got == s
    assert rpc_code(server.controller.GetSnapshot, csi_pb2.GetSnapshotRequest()) == C.INVALID_ARGUMENT
    assert rpc_code(server.controller.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id="snap-none")) \
        == C.NOT_FOUND
    assert rpc_code(server.controller.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id=v1.volume_id)) \
        == C.NOT_FOUND

    # DeleteSnapshot: works while a restored volume still reads through it; idempotent
    restored = server.create_volume(uniq("r"), volume_content_source=snap_source(s.snapshot_id))
    for _ in range(2):
        server.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    assert rpc_code(server.controller.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id=s.snapshot_id)) \
        == C.NOT_FOUND
    got = server.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=restored.volume_id))
    assert not got.status.volume_condition.abnormal
    assert rpc_code(server.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest()) == C.INVALID_ARGUMENT
    # a volume id given to DeleteSnapshot is no snapshot: nothing happens
    server.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=v2.volume_id))
    assert server.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=v2.volume_id))


def test_list_snapshots(server: CsiServer) -> None:
    v1 = server.create_volume(uniq("lv1"))
    v2 = server.create_volume(uniq("lv2"))
    of_v1 = {server.create_snapshot(uniq("ls"), v1.volume_id).snapshot_id for _ in range(3)}
    of_v2 = {server.create_snapshot(uniq("ls"), v2.volume_id).snapshot_id for _ in range(2)}
    by_source = server.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=v1.volume_id))
    assert {e.snapshot.snapshot_id for e in by_source.entries} == of_v1
    one = next(iter(of_v2))
    by_id = server.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=one))
    assert [e.snapshot.snapshot_id for e in by_id.entries] == [one]
    both = server.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=one,
                                                                        source_volume_id=v1.volume_id))
    assert list(both.entries) == []
    for missing in ("snap-none", "not/an/id", v1.volume_id):
        assert list(server.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=missing)).entries) \
            == []
    assert list(server.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id="vol-none")).entries) == []
    # paging
    seen: list[str] = []
    token = ""
    while True:
        page = server.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=2, starting_token=token))
        assert len(page.entries) <= 2
        seen += [e.snapshot.snapshot_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and (of_v1 | of_v2) <= set(seen)
    assert rpc_code(server.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(starting_token="zzz")) \
        == C.ABORTED


# ---------------------------------------------------------------------------------------------- group snapshots


def test_group_snapshots(server: CsiServer) -> None:
    vols = [server.create_volume(uniq("gv")).volume_id for _ in range(3)]
    name = uniq("group")
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=vols,
                                                   secrets={"token": "group-secret-value"})
    g = server.group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert g.group_snapshot_id.startswith("group-") and g.ready_to_use
    assert sorted(s.source_volume_id for s in g.snapshots) == sorted(vols)
    assert all(s.group_snapshot_id == g.group_snapshot_id and s.ready_to_use for s in g.snapshots)
    # the one instant: every member's creation time within the group call
    times = [s.creation_time.ToNanoseconds() for s in g.snapshots]
    assert max(times) - min(times) < 5 * 10**9
    # idempotent (same sources in any order); other sources/parameters: ALREADY_EXISTS
    again = csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=list(reversed(vols)))
    assert server.group.CreateVolumeGroupSnapshot(again).group_snapshot == g
    assert rpc_code(server.group.CreateVolumeGroupSnapshot, csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=name, source_volume_ids=vols[:2])) == C.ALREADY_EXISTS
    assert rpc_code(server.group.CreateVolumeGroupSnapshot, csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=name, source_volume_ids=vols, parameters={"copyRate": "5"})) == C.ALREADY_EXISTS
    # members are snapshots: listed, restorable, not deletable alone
    sid = g.snapshots[0].snapshot_id
    listed = server.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=sid)).entries
    assert listed[0].snapshot.group_snapshot_id == g.group_snapshot_id
    assert server.create_volume(uniq("from-member"), volume_content_source=snap_source(sid)).volume_id
    assert rpc_code(server.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=sid)) \
        == C.FAILED_PRECONDITION
    # Get (with and without snapshot_ids check)
    get = server.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in g.snapshots]))
    assert get.group_snapshot == g
    assert rpc_code(server.group.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id, snapshot_ids=[sid])) == C.INVALID_ARGUMENT
    # Delete: a snapshot_ids mismatch is INVALID_ARGUMENT and deletes nothing
    assert rpc_code(server.group.DeleteVolumeGroupSnapshot, csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id, snapshot_ids=[sid, "snap-other"])) == C.INVALID_ARGUMENT
    assert server.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id)).group_snapshot == g
    for _ in range(2):
        server.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in g.snapshots]))
    assert rpc_code(server.group.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id)) == C.NOT_FOUND
    assert list(server.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=sid)).entries) == []
    # the name is free again
    assert server.group.CreateVolumeGroupSnapshot(again).group_snapshot.group_snapshot_id != g.group_snapshot_id
    # the secret never reached the log
    assert "group-secret-value" not in server.log()


def test_group_snapshot_errors(server: CsiServer) -> None:
    v = server.create_volume(uniq("gerr")).volume_id
    G = server.group
    for req, code in [
        (csi_pb2.CreateVolumeGroupSnapshotRequest(source_volume_ids=[v]), C.INVALID_ARGUMENT),
        (csi_pb2.CreateVolumeGroupSnapshotRequest(name=uniq("g")), C.INVALID_ARGUMENT),
        (csi_pb2.CreateVolumeGroupSnapshotRequest(name=uniq("g"), source_volume_ids=[v, v]), C.INVALID_ARGUMENT),
        (csi_pb2.CreateVolumeGroupSnapshotRequest(name=uniq("g"), source_volume_ids=[v, "x/y"]),
         C.INVALID_ARGUMENT),
        (csi_pb2.CreateVolumeGroupSnapshotRequest(name=uniq("g"), source_volume_ids=[v, "vol-none"]), C.NOT_FOUND),
        (csi_pb2.CreateVolumeGroupSnapshotRequest(name=uniq("g"), source_volume_ids=[v],
                                                  parameters={"what": "x"}), C.INVALID_ARGUMENT),
    ]:
        assert rpc_code(G.CreateVolumeGroupSnapshot, req) == code, req
    # nothing half-made by the NOT_FOUND attempt
    snaps = server.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=v)).entries
    assert list(snaps) == []
    assert rpc_code(G.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest()) == C.INVALID_ARGUMENT
    assert rpc_code(G.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id="fake-vol-id")) == C.NOT_FOUND
    assert rpc_code(G.DeleteVolumeGroupSnapshot, csi_pb2.DeleteVolumeGroupSnapshotRequest()) == C.INVALID_ARGUMENT
    assert rpc_code(G.DeleteVolumeGroupSnapshot, csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id="fake-vol-id")) == C.OK


def test_node_unpublish_nothing_published(server: CsiServer) -> None:
    assert rpc_code(server.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="vol-x", target_path="/tmp/nothing-here")) == C.OK
    assert rpc_code(server.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
        target_path="/tmp/x")) == C.INVALID_ARGUMENT
    assert rpc_code(server.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="vol-x")) == C.INVALID_ARGUMENT


def test_malformed_request_bytes(server: CsiServer) -> None:
    call = server.channel.unary_unary("/csi.v1.Controller/CreateVolume")  # raw bytes in and out
    with pytest.raises(grpc.RpcError) as e:
        call(b"\xff\xff\xff\xff", timeout=10)
    assert e.value.code() == C.INVALID_ARGUMENT


def test_one_log_line_per_rpc(server: CsiServer) -> None:
    name = uniq("logged")
    v = server.create_volume(name, secrets={"password": "hunter2-do-not-log"})
    lines = [ln for ln in server.log().splitlines() if "method=CreateVolume" in ln and f"name={name}" in ln]
    assert len(lines) == 1
    line = lines[0]
    assert "code=OK" in line and "duration_ms=" in line and f"result_volume_id={v.volume_id}" in line
    assert "hunter2" not in server.log()
