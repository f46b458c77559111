"""One error mapping: csi_driver.status.status_for, for the CSI servicers and the engine API alike, and the engine
wire's round trip (an error raised in the node engine process is raised again, same class and code, in serve)."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest

from csi_driver.engine import errors
from csi_driver.proto_gen import engine_pb2 as pb
from csi_driver.proto_gen import engine_pb2_grpc as pb_grpc
from csi_driver.remote import wire
from csi_driver.remote.client import RemoteBackend
from csi_driver.sockets import bind
from csi_driver.status import status_for

C = grpc.StatusCode


def test_every_engine_error_names_a_real_status_code() -> None:
    for name, cls in errors.error_classes().items():
        assert cls.status in C.__members__, f"{name}.status = {cls.status!r}"


def test_privileged_errors_have_their_codes() -> None:
    from csi_driver.datapath import privileged

    busy = privileged.DeviceBusy(["umount", "/x"], 32, "", "target is busy")
    timeout = privileged.CommandTimeout(["mkfs.ext4", "/dev/loop9"], None, "", "", "timed out after 1s")
    missing = privileged.CommandNotFound(["mkfs.xfs"], None, "", "no such file", "not installed")
    failed = privileged.CommandError(["losetup"], 1, "", "boom")
    assert status_for(busy).code == C.FAILED_PRECONDITION
    assert status_for(timeout).code == C.DEADLINE_EXCEEDED
    assert status_for(missing).code == C.FAILED_PRECONDITION
    st = status_for(failed)
    assert st.code == C.INTERNAL and st.unexpected and st.error_class == "CommandError"
    assert "boom" in st.message


class _Failing(pb_grpc.EngineServicer):
    """An engine API server whose GetVolume raises whatever the test put in `exc`."""

    exc: BaseException = errors.EngineError("unset")

    def GetVolume(self, request: pb.GetVolumeRequest, context: grpc.ServicerContext) -> pb.VolumeResponse:
        st = wire.encode(self.exc)
        context.set_trailing_metadata(((wire.ERROR_KEY, st.error_class or "EngineError"),))
        context.abort(st.code, st.message)


@pytest.fixture
def failing(tmp_path: Path):  # type: ignore[no-untyped-def]
    servicer = _Failing()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_EngineServicer_to_server(servicer, server)
    endpoint = f"unix://{tmp_path}/engine.sock"
    bind(server, endpoint)
    server.start()
    client = RemoteBackend(endpoint)
    try:
        yield servicer, client
    finally:
        client.close()
        server.stop(0)


def _raised(servicer: _Failing, client: RemoteBackend, exc: BaseException) -> BaseException:
    servicer.exc = exc
    with pytest.raises(errors.EngineError) as ei:
        client.get_volume("vol-1")
    return ei.value


def test_engine_errors_cross_the_wire_as_themselves(failing) -> None:  # type: ignore[no-untyped-def]
    from csi_driver.datapath import privileged

    servicer, client = failing
    for exc in (errors.NotFound("volume vol-1 not found"), errors.NoSpace("full"), errors.InvalidState("busy"),
                privileged.DeviceBusy(["umount", "/x"], 32, "", "target is busy")):
        got = _raised(servicer, client, exc)
        assert type(got) is type(exc)
        assert str(got) == status_for(exc).message
        assert status_for(got).code == status_for(exc).code
    # a raw OSError from a host call still maps once, by errno, and is raised again as the engine's class
    import errno

    got = _raised(servicer, client, OSError(errno.ENOSPC, "No space left on device"))
    assert type(got) is errors.NoSpace and status_for(got).code == C.RESOURCE_EXHAUSTED
    # a bug: INTERNAL, still an engine error on the client side
    got = _raised(servicer, client, KeyError("k"))
    assert type(got) is errors.EngineError and status_for(got).code == C.INTERNAL


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, error_class: str) -> None:
        self._code, self._details, self._cls = code, details, error_class

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((wire.ERROR_KEY, self._cls),) if self._cls else ()


def test_unknown_error_class_falls_back_to_its_status() -> None:
    # a newer engine process may raise a class this serve does not know: its status code still decides
    got = wire.decode(_RpcError(C.OUT_OF_RANGE, "past the end", "FromANewerEngine"), "unix:///x")
    assert type(got) is errors.OutOfRange and str(got) == "past the end"
    got = wire.decode(_RpcError(C.DEADLINE_EXCEEDED, "slow", "FromANewerEngine"), "unix:///x")
    assert type(got) is errors.Timeout
    # no class name: the engine process did not answer at all
    got = wire.decode(_RpcError(C.UNAVAILABLE, "connection refused", ""), "unix:///x")
    assert isinstance(got, wire.EngineUnavailable)


def test_no_engine_is_unavailable(tmp_path: Path) -> None:
    client = RemoteBackend(f"unix://{tmp_path}/nobody.sock")
    with pytest.raises(wire.EngineUnavailable) as ei:
        client.capacity()
    assert status_for(ei.value).code == C.UNAVAILABLE
    client.close()
