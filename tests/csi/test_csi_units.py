"""Small pure pieces: error mapping, parameters, sizes, paging tokens, locks, secret stripping, endpoint parsing,
and the rule that advertised capabilities match the implemented RPCs."""

from __future__ import annotations

import errno

import grpc
import pytest

from csi_driver.api import Volume
from csi_driver.csi import errors as csi_errors
from csi_driver.csi import objects as o
from csi_driver.csi.controller import ControllerServicer, choose_size
from csi_driver.csi.group_controller import GroupControllerServicer
from csi_driver.csi.locks import KeyedTryLock
from csi_driver.csi.logs import strip_secrets
from csi_driver.csi.node import NodeServicer
from csi_driver.csi.params import parse_snapshot_params, parse_volume_params
from csi_driver.csi.settings import Settings
from csi_driver.embedded import EmbeddedBackend
from csi_driver.engine import errors as engine_errors
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc
from csi_driver.sockets import parse_endpoint
from csi_driver.status import status_for

C = grpc.StatusCode
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# ---------------------------------------------------------------------------------------------- errors

EXPECTED = {
    engine_errors.InvalidArgument: C.INVALID_ARGUMENT,
    engine_errors.NotFound: C.NOT_FOUND,
    engine_errors.AlreadyExists: C.ALREADY_EXISTS,
    engine_errors.OutOfRange: C.OUT_OF_RANGE,
    engine_errors.InvalidState: C.FAILED_PRECONDITION,
    engine_errors.NoSpace: C.RESOURCE_EXHAUSTED,
    engine_errors.VolumeOffline: C.FAILED_PRECONDITION,
    engine_errors.EngineLocked: C.UNAVAILABLE,
    engine_errors.EngineClosed: C.UNAVAILABLE,
    engine_errors.Timeout: C.DEADLINE_EXCEEDED,
}


@pytest.mark.parametrize("cls, code", list(EXPECTED.items()))
def test_engine_errors_map_by_class_hierarchy(cls: type[Exception], code: grpc.StatusCode) -> None:
    st = status_for(cls("boom"))
    assert (st.code, st.message, st.error_class, st.unexpected) == (code, "boom", cls.__name__, False)
    sub = type(f"Special{cls.__name__}", (cls,), {})  # a future subclass lands on its parent's code
    assert status_for(sub("x")).code == code


def test_every_engine_error_class_is_mapped() -> None:
    base = engine_errors.EngineError
    classes = {c for c in vars(engine_errors).values() if isinstance(c, type) and issubclass(c, base) and c is not base}
    assert classes == set(EXPECTED)


def test_unexpected_errors_are_internal() -> None:
    st = status_for(KeyError("k"))
    assert (st.code, st.message, st.unexpected) == (C.INTERNAL, "internal error: KeyError: 'k'", True)
    st = status_for(engine_errors.EngineError("odd"))
    assert (st.code, st.unexpected) == (C.INTERNAL, True)
    assert status_for(OSError(errno.EFBIG, "too big")).code == C.OUT_OF_RANGE
    assert status_for(OSError(errno.ENOSPC, "full")).code == C.RESOURCE_EXHAUSTED
    st = status_for(csi_errors.aborted("busy"))
    assert (st.code, st.message, st.unexpected) == (C.ABORTED, "busy", False)


# ---------------------------------------------------------------------------------------------- parameters


def test_volume_params() -> None:
    assert parse_volume_params({}) == parse_volume_params({"copyRate": "50", "cleanRate": "50"})
    p = parse_volume_params({"grainSize": "64Ki", "copyRate": "0", "cleanRate": "150",
                             "csi.storage.k8s.io/pvc/name": "x", "csi.storage.k8s.io/fstype": "xfs"})
    assert (p.grain_size, p.copy_rate, p.clean_rate) == (64 * KiB, 0, 150)
    assert parse_volume_params({"grainSize": "262144"}).grain_size == 256 * KiB
    for bad, field in [({"grainSize": "1Mi"}, "grainSize"), ({"copyRate": "151"}, "copyRate"),
                       ({"cleanRate": "-1"}, "cleanRate"), ({"copyRate": "1.5"}, "copyRate"),
                       ({"Copyrate": "5"}, "Copyrate")]:
        with pytest.raises(csi_errors.CsiError) as e:
            parse_volume_params(bad)
        assert e.value.code == C.INVALID_ARGUMENT and field in e.value.message


def test_snapshot_params() -> None:
    assert parse_snapshot_params({}).copy_rate == 0
    assert parse_snapshot_params({"copyRate": "30", "csi.storage.k8s.io/volumesnapshot/name": "s"}).copy_rate == 30
    with pytest.raises(csi_errors.CsiError):
        parse_snapshot_params({"grainSize": "64Ki"})


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("required, limit, grain, source, expect", [
    (0, 0, 256 * KiB, 0, GiB),  # default size
    (1, 0, 256 * KiB, 0, 256 * KiB),  # rounded up to a grain
    (0, 10 * MiB, 256 * KiB, 0, 10 * MiB),  # default clamped to the limit
    (MiB + 1, 2 * MiB, 64 * KiB, 0, MiB + 64 * KiB),
    (0, 0, 256 * KiB, 8 * MiB, 8 * MiB),  # from a source: its size
    (MiB, 0, 256 * KiB, 8 * MiB, 8 * MiB),  # never smaller than the source
    (16 * MiB, 0, 256 * KiB, 8 * MiB, 16 * MiB),  # larger than the source is fine
    (MiB, 2 * MiB + 7, 256 * KiB, 0, MiB),
])
def test_choose_size(required: int, limit: int, grain: int, source: int, expect: int) -> None:
    assert choose_size(required, limit, grain, source, GiB) == expect


@pytest.mark.parametrize("required, limit, source", [(1, 1000, 0), (0, 4 * MiB, 8 * MiB), (MiB + 1, MiB + 2, 0)])
def test_choose_size_out_of_range(required: int, limit: int, source: int) -> None:
    with pytest.raises(csi_errors.CsiError) as e:
        choose_size(required, limit, 256 * KiB, source, GiB)
    assert e.value.code == C.OUT_OF_RANGE


# ---------------------------------------------------------------------------------------------- paging, locks


def _vols(n: int) -> list[Volume]:
    return [Volume(id=f"vol-{i:03d}", name=f"n{i}", size=1, grain_size=1, created_at=100.0 + i // 2)
            for i in range(n)]


def test_paginate_keyset() -> None:
    vols = _vols(7)
    page, token = o.paginate(vols, 3, "")
    assert [v.id for v in page] == ["vol-000", "vol-001", "vol-002"] and token
    page2, token2 = o.paginate(vols, 3, token)
    assert [v.id for v in page2] == ["vol-003", "vol-004", "vol-005"]
    # deleting the entry the token points at changes nothing for the next page
    page2b, _ = o.paginate([v for v in vols if v.id != "vol-002"], 3, token)
    assert page2b == page2
    last, none = o.paginate(vols, 3, token2)
    assert [v.id for v in last] == ["vol-006"] and none == ""
    assert o.paginate(vols, 0, "")[0] == vols
    for bad in ("", "x", "1.0", "1.0~", "abc~vol-1", "inf~../x", "nan~vol-1"):
        if bad:
            with pytest.raises(csi_errors.CsiError) as e:
                o.paginate(vols, 1, bad)
            assert e.value.code == C.ABORTED


def test_try_lock_all_or_nothing() -> None:
    locks = KeyedTryLock()
    with locks.hold("a", "b"):
        with pytest.raises(csi_errors.CsiError) as e, locks.hold("c", "b"):
            pass
        assert e.value.code == C.ABORTED
        assert locks.busy() == {"a", "b"}  # "c" was not left behind
    assert locks.busy() == set()
    with pytest.raises(RuntimeError), locks.hold("x"):
        raise RuntimeError
    assert locks.busy() == set()


# ---------------------------------------------------------------------------------------------- secrets


def _messages_with_secrets() -> list[type]:
    out = []
    for name, desc in csi_pb2.DESCRIPTOR.message_types_by_name.items():
        if "secrets" in desc.fields_by_name:
            out.append(getattr(csi_pb2, name))
    return out


@pytest.mark.parametrize("cls", _messages_with_secrets(), ids=lambda c: c.__name__)
def test_strip_secrets(cls: type) -> None:
    msg = cls()
    msg.secrets["password"] = "pa55word-value"
    if "volume_id" in msg.DESCRIPTOR.fields_by_name:
        msg.volume_id = "vol-1"
    clean = strip_secrets(msg)
    assert "pa55word-value" not in str(clean) and dict(clean.secrets) == {"password": "***"}
    assert msg.secrets["password"] == "pa55word-value"  # the original is untouched


# ---------------------------------------------------------------------------------------------- endpoint


@pytest.mark.parametrize("endpoint, expect", [
    ("unix:///csi/csi.sock", ("unix", "/csi/csi.sock")),
    ("unix:/csi/csi.sock", ("unix", "/csi/csi.sock")),
    ("/run/x.sock", ("unix", "/run/x.sock")),
    ("tcp://127.0.0.1:10000", ("tcp", "127.0.0.1:10000")),
])
def test_parse_endpoint(endpoint: str, expect: tuple[str, str]) -> None:
    assert parse_endpoint(endpoint) == expect


@pytest.mark.parametrize("endpoint", ["http://x", "unix://", "tcp://nohost", "csi.sock"])
def test_parse_endpoint_rejects(endpoint: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(endpoint)


# ---------------------------------------------------------------------------------------------- capabilities

CTL_METHODS = {
    "CREATE_DELETE_VOLUME": ("CreateVolume", "DeleteVolume"),
    "PUBLISH_UNPUBLISH_VOLUME": ("ControllerPublishVolume", "ControllerUnpublishVolume"),
    "LIST_VOLUMES": ("ListVolumes",),
    "GET_CAPACITY": ("GetCapacity",),
    "CREATE_DELETE_SNAPSHOT": ("CreateSnapshot", "DeleteSnapshot"),
    "LIST_SNAPSHOTS": ("ListSnapshots",),
    "CLONE_VOLUME": ("CreateVolume",),
    "PUBLISH_READONLY": ("ControllerPublishVolume",),
    "EXPAND_VOLUME": ("ControllerExpandVolume",),
    "LIST_VOLUMES_PUBLISHED_NODES": ("ListVolumes",),
    "VOLUME_CONDITION": ("ControllerGetVolume",),
    "GET_VOLUME": ("ControllerGetVolume",),
    "SINGLE_NODE_MULTI_WRITER": ("CreateVolume",),
    "MODIFY_VOLUME": ("ControllerModifyVolume",),
    "GET_SNAPSHOT": ("GetSnapshot",),
}
CTL_ALWAYS = {"ControllerGetCapabilities", "ValidateVolumeCapabilities"}
NODE_METHODS = {
    "STAGE_UNSTAGE_VOLUME": ("NodeStageVolume", "NodeUnstageVolume"),
    "GET_VOLUME_STATS": ("NodeGetVolumeStats",),
    "EXPAND_VOLUME": ("NodeExpandVolume",),
    "VOLUME_CONDITION": ("NodeGetVolumeStats",),
    "SINGLE_NODE_MULTI_WRITER": ("NodePublishVolume",),
}
# NodePublish/NodeUnpublish are not capability-gated: every node plugin answers them
NODE_ALWAYS = {"NodeGetInfo", "NodeGetCapabilities", "NodePublishVolume", "NodeUnpublishVolume"}


def _implemented(cls: type, base: type) -> set[str]:
    return {n for n in dir(base) if n[0].isupper() and getattr(cls, n) is not getattr(base, n)}


def test_controller_capabilities_match_implementation() -> None:
    s = Settings(driver_name="d", vendor_version="1", node_id="n")
    advertised = {csi_pb2.ControllerServiceCapability.RPC.Type.Name(c.rpc.type) for c in s.controller_capabilities()}
    assert set(CTL_METHODS) == set(csi_pb2.ControllerServiceCapability.RPC.Type.keys()) - {"UNKNOWN"}
    implemented = _implemented(ControllerServicer, csi_pb2_grpc.ControllerServicer)
    for cap in advertised:
        assert set(CTL_METHODS[cap]) <= implemented, cap
    needed = {m for cap in advertised for m in CTL_METHODS[cap]} | CTL_ALWAYS
    assert implemented == needed
    assert "PUBLISH_UNPUBLISH_VOLUME" not in advertised and "MODIFY_VOLUME" in advertised


def test_group_and_node_capabilities_match_implementation() -> None:
    s = Settings(driver_name="d", vendor_version="1", node_id="n")
    assert _implemented(GroupControllerServicer, csi_pb2_grpc.GroupControllerServicer) == {
        "GroupControllerGetCapabilities", "CreateVolumeGroupSnapshot", "DeleteVolumeGroupSnapshot",
        "GetVolumeGroupSnapshot"}
    assert [c.rpc.type for c in s.group_controller_capabilities()] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    node_adv = {csi_pb2.NodeServiceCapability.RPC.Type.Name(c.rpc.type) for c in s.node_capabilities()}
    assert node_adv == {"STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME", "VOLUME_CONDITION",
                        "SINGLE_NODE_MULTI_WRITER"}
    implemented = _implemented(NodeServicer, csi_pb2_grpc.NodeServicer)
    assert implemented == {m for cap in node_adv for m in NODE_METHODS.get(cap, ())} | NODE_ALWAYS


def test_plugin_capabilities_per_mode() -> None:
    def services(mode: str) -> set[str]:
        s = Settings(driver_name="d", vendor_version="1", node_id="n", mode=mode)
        return {csi_pb2.PluginCapability.Service.Type.Name(c.service.type)
                for c in s.plugin_capabilities() if c.HasField("service")}

    assert services("all") == services("controller") == {
        "CONTROLLER_SERVICE", "GROUP_CONTROLLER_SERVICE", "VOLUME_ACCESSIBILITY_CONSTRAINTS",
        "SNAPSHOT_METADATA_SERVICE"}
    assert services("node") == {"VOLUME_ACCESSIBILITY_CONSTRAINTS"}
    s = Settings(driver_name="d", vendor_version="1", node_id="n", mode="all", snapshot_metadata=False)
    assert "SNAPSHOT_METADATA_SERVICE" not in {csi_pb2.PluginCapability.Service.Type.Name(c.service.type)
                                                for c in s.plugin_capabilities() if c.HasField("service")}


def test_snapshot_metadata_servicer_implements_both_streams() -> None:
    from csi_driver.csi.snapshot_metadata import SnapshotMetadataServicer

    assert _implemented(SnapshotMetadataServicer, csi_pb2_grpc.SnapshotMetadataServicer) == {
        "GetMetadataAllocated", "GetMetadataDelta"}


def test_stream_pages_cut_at_the_starting_offset_and_split_per_message() -> None:
    from csi_driver.api import ExtentPage
    from csi_driver.csi.snapshot_metadata import stream_pages

    extents = [(0, 10), (20, 10), (40, 10), (60, 10), (80, 20)]
    calls: list[tuple[int, int]] = []

    def fetch(start: int, limit: int) -> ExtentPage:
        calls.append((start, limit))
        # as the engine: extents ending after start, the one holding it from its (10-byte) grain
        return ExtentPage(size=100, extents=tuple((max(o, start // 10 * 10), o + n - max(o, start // 10 * 10))
                                                  for o, n in extents if o + n > start)[:limit])

    msgs = list(stream_pages(fetch, 25, 2))
    assert [m for _, m in msgs] == [[(25, 5), (40, 10)], [(60, 10), (80, 20)]]
    assert all(cap == 100 for cap, _ in msgs)
    assert list(stream_pages(fetch, 0, 0)) == [(100, extents)]
    assert list(stream_pages(fetch, 95, 0)) == [(100, [(95, 5)])]
    assert list(stream_pages(lambda s, n: ExtentPage(size=100, extents=()), 0, 0)) == [(100, [])]


def test_embedded_backend_without_a_data_path(tmp_path) -> None:
    # (that it satisfies api.StorageBackend is mypy's job: server.make_backend returns it as one)
    backend = EmbeddedBackend.open(str(tmp_path / "state"))
    try:
        assert backend.is_ready()
        with pytest.raises(engine_errors.InvalidState, match="no node data path"):
            backend.node_unstage("vol-x", str(tmp_path / "staging"))
    finally:
        backend.close()
    assert not backend.is_ready()
