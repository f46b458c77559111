"""Fuzz the live server: random (often malformed) requests to every unary CSI method, and random bytes.

Every answer must be a deliberate status code (never INTERNAL/UNKNOWN/UNAVAILABLE), and the server must stay
up and ready. Requests are generated from the message descriptors, biased towards the values that matter:
real ids of existing objects, traversal-like ids, boundary sizes, known and unknown parameter keys.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_driver.proto_gen import csi_pb2
from tests.csi.conftest import CsiServer, GiB, MiB

C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.OUT_OF_RANGE, C.FAILED_PRECONDITION,
           C.ABORTED, C.RESOURCE_EXHAUSTED, C.UNIMPLEMENTED}
SERVICES = ("Identity", "Controller", "GroupController", "Node")
SEED_IDS: list[str] = []  # filled by the fixture with ids of real objects
SEEN: Counter[tuple[str, str]] = Counter()  # (method, code) answered, printed at the end
ODD_STRINGS = ["", "../../etc/passwd", "/abs/path", "a" * 129, "vol-\x00x", "fake-vol-id", ".hidden", "-dash",
               "x" * 300, "ünïcödé", "snap-0000000000000000", "group-0000000000000000", "1.0~vol-a", "inf~x"]
PARAM_KEYS = ["grainSize", "copyRate", "cleanRate", "csi.storage.k8s.io/pvc/name", "unknownKey"]
PARAM_VALUES = ["64Ki", "256Ki", "0", "-1", "151", "1e3", "", "abc", "262144", " 0 "]
# sizes: real small/medium ones, boundaries, and huge ones the filesystem cannot hold (must be OUT_OF_RANGE)
INT64_VALUES = [0, 1, -1, 4096, MiB, 64 * MiB, GiB, 10 * GiB, 1 << 62, (1 << 63) - 1, -(1 << 63)]


def unary_methods() -> list[MethodDescriptor]:
    out = []
    for name in SERVICES:
        for m in csi_pb2.DESCRIPTOR.services_by_name[name].methods:
            if not m.client_streaming and not m.server_streaming:
                out.append(m)
    return out


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def text_values() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=40),
                     st.builds(lambda: list(SEED_IDS)).flatmap(lambda ids: st.sampled_from(ids or [""])))


def scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return text_values()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(min_value=0, max_value=max(v.number for v in f.enum_type.values) + 2)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.one_of(st.integers(-(1 << 31), (1 << 31) - 1), st.sampled_from([0, 1, -1, 2, 3]))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT64_VALUES), st.integers(-(1 << 20), 64 * GiB))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, (1 << 32) - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, (1 << 64) - 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=False, width=32)
    raise NotImplementedError(t)


def field_values(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(f):
        if f.name in ("parameters", "mutable_parameters"):
            keys = st.one_of(st.sampled_from(PARAM_KEYS), st.text(max_size=12))
            values = st.one_of(st.sampled_from(PARAM_VALUES), st.text(max_size=8))
        else:
            keys, values = st.text(max_size=16), text_values()
        return st.dictionaries(keys, values, max_size=4)
    if f.message_type is not None:
        if depth >= 3:
            return st.just([] if _repeated(f) else None)
        inner = messages(f.message_type, depth + 1)
        return st.lists(inner, max_size=3) if _repeated(f) else inner
    return st.lists(scalar(f), max_size=4) if _repeated(f) else scalar(f)


def build(desc: Descriptor, values: dict[str, Any]) -> Message:
    msg = message_factory.GetMessageClass(desc)()
    for name, value in values.items():
        if value is None:
            continue
        f = desc.fields_by_name[name]
        target = getattr(msg, name) if (_repeated(f) or f.message_type is not None) else None
        if _is_map(f):
            target.update(value)
        elif _repeated(f):
            target.extend(value)
        elif f.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    fields = {f.name: st.one_of(st.none(), field_values(f, depth)) for f in desc.fields}
    return st.fixed_dictionaries(fields).map(lambda d: build(desc, d))


# -- near-valid requests: a valid template with a few fields replaced by random values, so the fuzz also
# reaches the code behind validation (engine calls, idempotency checks, locks)

AM = csi_pb2.VolumeCapability.AccessMode


def _seed() -> st.SearchStrategy[str]:
    return st.builds(lambda: list(SEED_IDS)).flatmap(lambda ids: st.sampled_from(ids or ["vol-none"]))


def _name() -> st.SearchStrategy[str]:
    return st.text(alphabet="abcdefgh-0123", min_size=1, max_size=12)


def _caps() -> st.SearchStrategy[list[csi_pb2.VolumeCapability]]:
    mode = st.sampled_from([AM.SINGLE_NODE_WRITER, AM.SINGLE_NODE_MULTI_WRITER, AM.MULTI_NODE_READER_ONLY])
    mount = st.builds(lambda m, fs: csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs), access_mode=AM(mode=m)),
        mode, st.sampled_from(["", "ext4", "xfs", "ntfs"]))
    block = st.builds(lambda m: csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                                         access_mode=AM(mode=m)), mode)
    return st.lists(st.one_of(mount, block), min_size=1, max_size=2)


def _range() -> st.SearchStrategy[csi_pb2.CapacityRange]:
    size = st.sampled_from([0, MiB, 8 * MiB, 64 * MiB, 100 * MiB + 1])
    return st.builds(lambda r, lim: csi_pb2.CapacityRange(required_bytes=r, limit_bytes=lim), size, size)


def _params() -> st.SearchStrategy[dict[str, str]]:
    return st.sampled_from([{}, {"grainSize": "64Ki"}, {"copyRate": "0"}, {"cleanRate": "10"},
                            {"copyRate": "0", "csi.storage.k8s.io/pvc/name": "p"}])


def _source() -> st.SearchStrategy[csi_pb2.VolumeContentSource | None]:
    snap = st.builds(lambda i: csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=i)), _seed())
    vol = st.builds(lambda i: csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=i)), _seed())
    return st.one_of(st.none(), snap, vol)


def _create_volume(name: str, caps: Any, rng: Any, params: Any, src: Any) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=caps, capacity_range=rng, parameters=params)
    if src is not None:
        req.volume_content_source.CopyFrom(src)
    return req


TEMPLATES: dict[str, st.SearchStrategy[Message]] = {
    "CreateVolume": st.builds(_create_volume, _name(), _caps(), _range(), _params(), _source()),
    "DeleteVolume": st.builds(lambda i: csi_pb2.DeleteVolumeRequest(volume_id=i), _seed()),
    "CreateSnapshot": st.builds(lambda n, i, c: csi_pb2.CreateSnapshotRequest(
        name=n, source_volume_id=i, parameters=c), _name(), _seed(), st.sampled_from([{}, {"copyRate": "0"}])),
    "DeleteSnapshot": st.builds(lambda i: csi_pb2.DeleteSnapshotRequest(snapshot_id=i), _seed()),
    "GetSnapshot": st.builds(lambda i: csi_pb2.GetSnapshotRequest(snapshot_id=i), _seed()),
    "ControllerGetVolume": st.builds(lambda i: csi_pb2.ControllerGetVolumeRequest(volume_id=i), _seed()),
    "ControllerExpandVolume": st.builds(lambda i, r: csi_pb2.ControllerExpandVolumeRequest(
        volume_id=i, capacity_range=r), _seed(), _range()),
    "ValidateVolumeCapabilities": st.builds(lambda i, c, p: csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=i, volume_capabilities=c, parameters=p), _seed(), _caps(), _params()),
    "ListVolumes": st.builds(lambda m: csi_pb2.ListVolumesRequest(max_entries=m), st.integers(0, 3)),
    "ListSnapshots": st.builds(lambda m, i: csi_pb2.ListSnapshotsRequest(max_entries=m, source_volume_id=i),
                               st.integers(0, 3), _seed()),
    "CreateVolumeGroupSnapshot": st.builds(lambda n, ids: csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=n, source_volume_ids=sorted(set(ids))), _name(), st.lists(_seed(), min_size=1, max_size=3)),
    "DeleteVolumeGroupSnapshot": st.builds(lambda i: csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=i), _seed()),
    "GetVolumeGroupSnapshot": st.builds(lambda i: csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=i),
                                        _seed()),
}


def mutated(method: MethodDescriptor) -> st.SearchStrategy[Message]:
    """The template with up to two fields taken from a random message of the same type."""
    template = TEMPLATES.get(method.name)
    if template is None:
        return messages(method.input_type)
    names = [f.name for f in method.input_type.fields]

    def mix(base: Message, other: Message, chosen: list[str]) -> Message:
        for name in chosen:
            base.ClearField(name)
            f = method.input_type.fields_by_name[name]
            if _is_map(f):
                getattr(base, name).update(getattr(other, name))
            elif _repeated(f) or f.message_type is not None:
                getattr(base, name).MergeFrom(getattr(other, name))
            else:
                setattr(base, name, getattr(other, name))
        return base

    return st.builds(mix, template, messages(method.input_type), st.lists(st.sampled_from(names), max_size=2))


def invoke(srv: CsiServer, method: MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    call = srv.channel.unary_unary(f"/csi.v1.{method.containing_service.name}/{method.name}")
    try:
        call(payload, timeout=60)
        code = C.OK
    except grpc.RpcError as e:
        if e.code() not in ALLOWED:
            pytest.fail(f"{method.name}: {e.code()} {e.details()}")
        code = e.code()
    SEEN[(method.name, code.name)] += 1
    return code


def plant_seeds(srv: CsiServer) -> None:
    """(Re)create a volume, a snapshot and a group snapshot (earlier fuzz cases may have deleted them)."""
    tag = uuid.uuid4().hex[:8]
    v = srv.create_volume(f"fuzz-seed-{tag}", 8 * MiB)
    s = srv.create_snapshot(f"fuzz-seed-snap-{tag}", v.volume_id)
    group = srv.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=f"fuzz-seed-group-{tag}", source_volume_ids=[v.volume_id])).group_snapshot
    SEED_IDS[:] = [v.volume_id, s.snapshot_id, group.group_snapshot_id, group.snapshots[0].snapshot_id]


@pytest.fixture(scope="module")
def fuzz_server(server: CsiServer) -> Iterator[CsiServer]:
    yield server
    # still alive and ready, and nothing unexpected was logged
    assert server.proc is not None and server.proc.poll() is None
    assert server.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    assert "unexpected error" not in server.log()
    print("\nfuzz answers:", dict(sorted(SEEN.items())))


@pytest.fixture
def seeded(fuzz_server: CsiServer) -> CsiServer:
    plant_seeds(fuzz_server)
    return fuzz_server


@pytest.mark.parametrize("method", unary_methods(), ids=lambda m: m.name)
def test_random_requests(seeded: CsiServer, method: MethodDescriptor) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(req=st.one_of(messages(method.input_type), mutated(method), mutated(method)))
    def run(req: Message) -> None:
        invoke(seeded, method, req.SerializeToString())

    run()


@pytest.mark.parametrize("method", unary_methods(), ids=lambda m: m.name)
def test_random_bytes(seeded: CsiServer, method: MethodDescriptor) -> None:
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=st.binary(max_size=64))
    def run(payload: bytes) -> None:
        invoke(seeded, method, payload)

    run()
