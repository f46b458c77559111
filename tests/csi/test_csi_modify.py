"""ControllerModifyVolume and CreateVolume's mutable_parameters (VolumeAttributesClass): copyRate/cleanRate
change a volume's running mappings at once.

In-process server (real gRPC over a unix socket, real engine with its background copier), so the test reads
the effect where it happens: the mapping's rates and progress in the engine's report.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from csi_driver.api import CopyStatus
from csi_driver.csi.errors import CsiError
from csi_driver.csi.params import MutableParams, parse_mutable_params
from csi_driver.csi.settings import Settings
from csi_driver.proto_gen import csi_pb2
from tests.csi.conftest import MiB, mount_cap, rpc_code
from tests.csi.test_csi_inprocess import InProc, inproc  # noqa: F401 - the fixture
from tests.waiting import wait_for

C = grpc.StatusCode


def clone_of(ip: InProc, name: str, source_id: str, *, params: dict[str, str] | None = None,
             mutable: dict[str, str] | None = None) -> str:
    return ip.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap()], parameters=params or {}, mutable_parameters=mutable or {},
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source_id)))).volume.volume_id


def modify(ip: InProc, volume_id: str, **mutable: str) -> csi_pb2.ControllerModifyVolumeResponse:
    return ip.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
        volume_id=volume_id, mutable_parameters=mutable))


def copies_into(ip: InProc, volume_id: str) -> list[CopyStatus]:
    return [m for m in ip.driver.backend.report().mappings if m.target_id == volume_id]


def the_copy(ip: InProc, volume_id: str) -> CopyStatus:
    maps = copies_into(ip, volume_id)
    assert len(maps) == 1, maps
    return maps[0]


def error(fn: Callable[..., object], *args: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code(), e.value.details()


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_mutable_params_shares_the_storage_class_rules() -> None:
    assert parse_mutable_params({}) == MutableParams() and not MutableParams()
    assert parse_mutable_params({"copyRate": "150", "cleanRate": "0"}) == MutableParams(150, 0)
    assert parse_mutable_params({"csi.storage.k8s.io/pvc/name": "x", "copyRate": "7"}) == MutableParams(7, None)
    for params, message in (
        ({"copyRate": "151"}, "mutable_parameters[copyRate]: must be 0-150, got 151"),
        ({"copyRate": " 150"}, "mutable_parameters[copyRate]: must be an integer 0-150, got ' 150'"),
        ({"cleanRate": "fast"}, "mutable_parameters[cleanRate]: must be an integer 0-150, got 'fast'"),
        ({"grainSize": "64Ki"}, "mutable_parameters[grainSize]: immutable"),
        ({"iops": "5"}, "mutable_parameters[iops]: unknown parameter (supported: copyRate, cleanRate)"),
        # every key is checked before any value: the unknown key is named even next to a valid rate
        ({"copyRate": "10", "XXX_FakeKey": "v"}, "mutable_parameters[XXX_FakeKey]: unknown parameter"),
    ):
        with pytest.raises(CsiError) as e:
            parse_mutable_params(params)
        assert e.value.code == C.INVALID_ARGUMENT and e.value.message.startswith(message), e.value.message


def test_modify_volume_is_advertised() -> None:
    s = Settings(driver_name="d", vendor_version="1", node_id="n")
    rpc = csi_pb2.ControllerServiceCapability.RPC
    assert rpc.MODIFY_VOLUME in [c.rpc.type for c in s.controller_capabilities()]


# ---------------------------------------------------------------------------------------------- errors


def test_modify_volume_errors(inproc: InProc) -> None:  # noqa: F811
    ip = inproc
    ctl = ip.controller
    vid = ip.volume("mod-err")
    snap = ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="mod-err-snap", source_volume_id=vid)).snapshot
    req = csi_pb2.ControllerModifyVolumeRequest
    assert error(ctl.ControllerModifyVolume, req(mutable_parameters={"copyRate": "1"})) == (
        C.INVALID_ARGUMENT, "volume_id: required")
    assert error(ctl.ControllerModifyVolume, req(volume_id="../x"))[0] == C.INVALID_ARGUMENT
    assert error(ctl.ControllerModifyVolume, req(volume_id="vol-0000000000000000"))[0] == C.NOT_FOUND
    # a snapshot id is not a volume (a VolumeAttributesClass applies to PVCs)
    assert error(ctl.ControllerModifyVolume, req(volume_id=snap.snapshot_id))[0] == C.NOT_FOUND
    code, details = error(ctl.ControllerModifyVolume, req(volume_id=vid, mutable_parameters={"XXX_FakeKey": "v"}))
    assert code == C.INVALID_ARGUMENT and "mutable_parameters[XXX_FakeKey]" in details
    code, details = error(ctl.ControllerModifyVolume, req(volume_id=vid, mutable_parameters={"grainSize": "64Ki"}))
    assert code == C.INVALID_ARGUMENT and "mutable_parameters[grainSize]: immutable" in details
    code, details = error(ctl.ControllerModifyVolume, req(volume_id=vid, mutable_parameters={"copyRate": "-1"}))
    assert code == C.INVALID_ARGUMENT and "mutable_parameters[copyRate]: must be an integer 0-150, got '-1'" in details
    # a volume that is no copy target: accepted, nothing to change; empty parameters too
    modify(ip, vid, copyRate="100", cleanRate="20")
    modify(ip, vid)
    assert copies_into(ip, vid) == []


def test_create_volume_validates_mutable_parameters(inproc: InProc) -> None:  # noqa: F811
    ip = inproc
    src = ip.volume("cv-src")
    for mutable, field in (({"XXX_FakeKey": "v"}, "mutable_parameters[XXX_FakeKey]"),
                           ({"grainSize": "64Ki"}, "mutable_parameters[grainSize]"),
                           ({"copyRate": "200"}, "mutable_parameters[copyRate]")):
        code, details = error(lambda m=mutable: clone_of(ip, "cv-bad", src, mutable=m))
        assert code == C.INVALID_ARGUMENT and field in details, details
    # nothing was made by the refused requests
    assert ip.driver.backend.find_volume("csi-volume:cv-bad") is None
    # an empty volume with a VolumeAttributesClass: accepted (no mapping to set)
    empty = ip.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="cv-empty", volume_capabilities=[mount_cap()], mutable_parameters={"copyRate": "150"})).volume
    assert copies_into(ip, empty.volume_id) == []


# ---------------------------------------------------------------------------------------------- the effect


def test_create_with_vac_then_modify_speeds_up_the_copy(inproc: InProc) -> None:  # noqa: F811
    ip = inproc
    src = ip.volume("speed-src", 16 * MiB)
    data = bytes(range(256)) * (16 * MiB // 256)
    ip.engine.write(src, 0, data)
    # StorageClass says copyRate 50, the VolumeAttributesClass at creation pauses the copy (0) and sets cleanRate
    vid = clone_of(ip, "speed-clone", src, params={"copyRate": "50"}, mutable={"copyRate": "0", "cleanRate": "7"})
    m = the_copy(ip, vid)
    assert (m.copy_rate, m.clean_rate) == (0, 7)
    assert ip.engine.read(vid, 0, len(data)) == data  # usable at once, through the mapping
    before = m.progress
    time.sleep(1.0)
    assert the_copy(ip, vid).progress == before < 100  # paused: no background copy at all
    # the same name and arguments again: the same volume (mutable parameters are state, not identity)
    assert clone_of(ip, "speed-clone", src, params={"copyRate": "50"}, mutable={"copyRate": "0"}) == vid

    t0 = time.monotonic()
    modify(ip, vid, copyRate="150")
    m = the_copy(ip, vid)
    assert (m.copy_rate, m.clean_rate) == (150, 7)  # cleanRate untouched: only the keys given change
    # complete: the clone owns every grain (an incremental clone keeps its mapping, at 100 %, for a refresh)
    wait_for(lambda: all(c.progress >= 100 for c in copies_into(ip, vid)), timeout=30, interval=0.02,
             what="the copy at rate 150 completes")
    elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed  # 16 MiB at 2 GiB/s
    assert ip.engine.read(vid, 0, len(data)) == data
    modify(ip, vid, copyRate="150")  # idempotent, also once the copy is over


def test_modify_is_all_or_nothing_and_pauses_a_running_copy(inproc: InProc) -> None:  # noqa: F811
    ip = inproc
    src = ip.volume("atom-src", 64 * MiB)
    ip.engine.write(src, 0, b"\x5a" * (64 * MiB))
    vid = clone_of(ip, "atom-clone", src, params={"copyRate": "60", "cleanRate": "30"})
    for bad in ({"copyRate": "0", "XXX_FakeKey": "v"}, {"copyRate": "0", "cleanRate": "151"},
                {"copyRate": "0", "grainSize": "64Ki"}):
        assert rpc_code(ip.controller.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vid, mutable_parameters=bad)) == C.INVALID_ARGUMENT
        m = the_copy(ip, vid)
        assert (m.copy_rate, m.clean_rate) == (60, 30), bad
    modify(ip, vid, copyRate="0")
    time.sleep(0.3)  # let a copy step that was under way finish
    paused = the_copy(ip, vid).progress
    time.sleep(1.0)
    m = the_copy(ip, vid)
    assert m.copy_rate == 0 and m.progress == paused < 100, (paused, m)
