"""Shared fixtures: a real `csi-flashcopy serve` subprocess on a unix socket, and gRPC stubs talking to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
NODE_ID = "test-node"
TOPOLOGY_KEY = "topology.flashcopy.csi.dev/node"
MiB = 1 << 20
GiB = 1 << 30


def mount_cap(mode: int = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
              fs_type: str = "ext4") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block_cap(mode: int = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


class CsiStubs:
    """The CSI service stubs over `self.channel` (shared by the subprocess and the in-process servers)."""

    channel: grpc.Channel

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self.channel)

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def group(self) -> csi_pb2_grpc.GroupControllerStub:
        return csi_pb2_grpc.GroupControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)


class CsiServer(CsiStubs):
    """One `csi-flashcopy serve` process; restartable on the same state dir."""

    def __init__(self, root: Path, *, mode: str = "all", extra: tuple[str, ...] = (),
                 log_format: str = "text", log_level: str = "info") -> None:
        self.root = root
        self.sock = root / "csi.sock"
        self.state = root / "state"
        self.mode = mode
        self.extra = extra
        self.log_format = log_format
        self.log_level = log_level
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.exit_codes: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"unix://{self.sock}"

    def argv(self) -> list[str]:
        # the engine embedded unless a test asks otherwise: `auto` would start a detached node engine
        # process that outlives the server (tests/datapath/test_engine_process.py covers that mode)
        engine = [] if any(a.split("=")[0] == "--engine" for a in self.extra) else ["--engine", "embedded"]
        return [sys.executable, "-m", "csi_driver", "serve", "--endpoint", self.endpoint,
                "--state-dir", str(self.state), "--node-id", NODE_ID, "--mode", self.mode,
                "--log-format", self.log_format, "--log-level", self.log_level, *engine, *self.extra]

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> CsiServer:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for key in ("CSI_ENDPOINT", "CSI_MODE", "CSI_NODE_ID", "CSI_DRIVER_NAME", "CSI_ENGINE_MODE"):
            env.pop(key, None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        self.proc = subprocess.Popen(self.argv(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        proc = self.proc

        def socket_up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{self.log()}")
            return self.sock.exists()

        wait_for(socket_up, timeout=timeout, what="the server's socket", interval=0.02, why=self.log)
        self.channel = grpc.insecure_channel(self.endpoint)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(lambda: self.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value, timeout=timeout,
                 what="Probe ready", why=self.log, ignore=(grpc.RpcError,))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self.proc = None
        self.exit_codes.append(code)
        return code

    def restart(self) -> int:
        code = self.stop()
        self.start()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


    # -- small helpers used across the suites

    def create_volume(self, name: str, size: int = 64 * MiB, **kw: object) -> csi_pb2.Volume:
        req = csi_pb2.CreateVolumeRequest(name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                                          volume_capabilities=[mount_cap()], **kw)
        return self.controller.CreateVolume(req, timeout=30).volume

    def create_snapshot(self, name: str, source: str, **kw: object) -> csi_pb2.Snapshot:
        req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=source, **kw)
        return self.controller.CreateSnapshot(req, timeout=30).snapshot


def short_tmp(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    # unix socket paths are limited to ~107 bytes: pytest's tmp dirs can be longer than that
    path = Path(tmp_path_factory.mktemp(name))
    if len(str(path / "csi.sock")) > 100:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix=f"csi-{name}-"))
    return path


@pytest.fixture
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[type[CsiServer]]:
    """Make servers (stopped at the end of the test; each must have exited 0)."""
    made: list[CsiServer] = []

    def factory(name: str = "srv", **kw: object) -> CsiServer:
        srv = CsiServer(short_tmp(tmp_path_factory, name), **kw)  # type: ignore[arg-type]
        made.append(srv)
        return srv

    yield factory  # type: ignore[misc]
    for srv in made:
        srv.stop()
        assert all(c == 0 for c in srv.exit_codes), f"server exit codes {srv.exit_codes}:\n{srv.log()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CsiServer]:
    """One `serve --mode all` for a whole test module."""
    srv = CsiServer(short_tmp(tmp_path_factory, "mod")).start()
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()


def rpc_code(fn: object, *args: object, **kw: object) -> grpc.StatusCode:
    """Call a stub method, return its status code (OK on success)."""
    try:
        fn(*args, timeout=30, **kw)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK
