"""Issue 22, item 1: who may call what on a node engine, over real gRPC channels to a real `csi-flashcopy engine`.

The engine listens on its unix socket and on 127.0.0.1 with mutual TLS, its certificates from
`csi-flashcopy certs` (remote.tls.write_certificates): a CA, the controller's certificate, the shared node
certificate and per-node ones. On the TCP port only the controller's certificate is served, and only the
controller's RPCs (remote.access); a node certificate of the same CA is refused; the Node verbs are refused
to everyone on TCP. The engine checks ids and host paths as the CSI layer does, on the unix socket too. The
controller side refuses an engine whose certificate names another node than the one its Lease claims.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.proto_gen import engine_pb2 as pb
from csi_driver.proto_gen import engine_pb2_grpc as pb_grpc
from csi_driver.remote import access
from csi_driver.remote.tls import CONTROLLER_NAME, TlsFiles, channel_options, node_name, write_certificates
from tests.csi.conftest import REPO
from tests.datapath.conftest import leftovers, needs_kernel
from tests.k8s.test_k8s_flow import _free_port
from tests.waiting import wait_for

C = grpc.StatusCode
NODE = "node-a.example.internal"  # an FQDN node name: the per-node certificate still names it exactly
MiB = 1 << 20


@dataclass
class Engine:
    root: Path
    port: int
    tls: Path  # the directory given as certs --out
    proc: subprocess.Popen[bytes]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def files(self, identity: str) -> TlsFiles:
        return TlsFiles.load(str(self.tls / identity))

    def tcp(self, identity: str, node: str = NODE) -> pb_grpc.EngineStub:
        ch = grpc.secure_channel(self.addr, self.files(identity).channel_credentials(), options=channel_options(node))
        return pb_grpc.EngineStub(ch)

    def unix(self) -> pb_grpc.EngineStub:
        return pb_grpc.EngineStub(grpc.insecure_channel(f"unix:{self.root / 'state' / 'engine.sock'}"))

    def log(self) -> str:
        return (self.root / "engine.log").read_text(errors="replace")


def start_engine(root: Path, tls_dir: Path, port: int, node: str = NODE) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO), CSI_FLASHCOPY_FUSE_KEEPER="off")
    with open(root / "engine.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "csi_driver", "engine", "--state-dir", str(root / "state"), "--listen",
             f"127.0.0.1:{port}", "--tls-dir", str(tls_dir), "--node-id", node], cwd=REPO, env=env,
            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if os.geteuid() != 0:
        pytest.skip("the node engine mounts its FUSE export: needs root")
    root = tmp_path_factory.mktemp("access")
    tls = root / "certs"
    write_certificates(str(tls), nodes=[NODE, "node-b"])
    port = _free_port()
    e = Engine(root, port, tls, start_engine(root, tls / "nodes" / NODE, port))
    stub = e.tcp("controller")

    def up() -> bool:
        if e.proc.poll() is not None:
            raise RuntimeError(f"engine exited {e.proc.returncode}:\n{e.log()}")
        try:
            stub.Ping(pb.PingRequest(), timeout=2)
            return True
        except grpc.RpcError:
            return False

    wait_for(up, timeout=60, what="the engine's TCP port", why=e.log)
    yield e
    e.proc.send_signal(signal.SIGTERM)
    assert e.proc.wait(60) == 0, e.log()[-3000:]
    assert not leftovers(str(root))


def code(call: Callable[..., Any], request: Any) -> C:
    try:
        call(request, timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return C.OK


def _volume(engine: Engine, name: str) -> str:
    r = engine.unix().CreateVolume(pb.CreateVolumeRequest(name=name, size=4 * MiB, grain_size=256 * 1024),
                                   timeout=10)
    return str(r.volume.id)


def test_every_rpc_is_either_a_controller_or_a_node_verb() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["Engine"].methods_by_name)
    assert methods == access.CONTROLLER_RPCS | access.NODE_RPCS
    assert not access.CONTROLLER_RPCS & access.NODE_RPCS
    assert not set(access.TCP_POLICY) & access.NODE_RPCS  # no Node verb is served on TCP, to anyone


@needs_kernel
def test_a_node_certificate_of_the_same_ca_is_refused(engine: Engine) -> None:
    vid = _volume(engine, "kept")
    for identity in ("node", f"nodes/{NODE}", "nodes/node-b"):
        stub = engine.tcp(identity)
        assert code(stub.Ping, pb.PingRequest()) == C.PERMISSION_DENIED, identity
        assert code(stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid)) == C.PERMISSION_DENIED
        assert code(stub.CreateVolume, pb.CreateVolumeRequest(
            name="forged", size=4 * MiB, grain_size=256 * 1024)) == C.PERMISSION_DENIED
        assert code(stub.PrepareGroup, pb.PrepareGroupRequest(group_name="g", items=[
            pb.SnapshotItem(source_id=vid, name="s")])) == C.PERMISSION_DENIED
    assert engine.unix().GetVolume(pb.GetVolumeRequest(volume_id=vid), timeout=10).volume.id == vid
    assert "call refused" in engine.log()


@needs_kernel
def test_the_controller_certificate_is_served_controller_rpcs_only(engine: Engine) -> None:
    stub = engine.tcp("controller")
    assert stub.Ping(pb.PingRequest(), timeout=10).pid == engine.proc.pid
    v = stub.CreateVolume(pb.CreateVolumeRequest(name="by-controller", size=4 * MiB, grain_size=256 * 1024),
                          timeout=10).volume
    staging = engine.root / "staging"
    staging.mkdir(exist_ok=True)
    target = engine.root / "target"
    # the Node verbs stay on the unix socket: refused on TCP whatever the certificate
    for call, req in (
        (stub.NodeStage, pb.NodeStageRequest(volume_id=v.id, staging_path=str(staging), block=True)),
        (stub.NodePublish, pb.NodePublishRequest(volume_id=v.id, staging_path=str(staging),
                                                 target_path=str(target), block=True)),
        (stub.NodeUnpublish, pb.NodeUnpublishRequest(volume_id=v.id, target_path="/root/.ssh")),
        (stub.NodeUnstage, pb.NodeUnstageRequest(volume_id=v.id, staging_path=str(staging))),
        (stub.NodeStats, pb.NodeStatsRequest(volume_id=v.id, volume_path=str(target))),
        (stub.NodeExpand, pb.NodeExpandRequest(volume_id=v.id, volume_path=str(target), required_bytes=MiB)),
    ):
        assert code(call, req) == C.PERMISSION_DENIED, req
    assert not target.exists()
    assert [x for x in leftovers(str(engine.root)) if "/state/exports " not in x] == []  # only the FUSE export
    stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.id), timeout=10)


@needs_kernel
@pytest.mark.parametrize("path", ["relative/target", "/a/../etc", "//", "/", "/./", "//etc", "", "/a\nb"])
def test_bad_host_paths_are_invalid_on_the_unix_socket(engine: Engine, path: str) -> None:
    vid = _volume(engine, f"paths-{abs(hash(path))}")
    ok = str(engine.root / "ok")
    u = engine.unix()
    assert code(u.NodePublish, pb.NodePublishRequest(volume_id=vid, staging_path=ok, target_path=path,
                                                     block=True)) == C.INVALID_ARGUMENT
    assert code(u.NodePublish, pb.NodePublishRequest(volume_id=vid, staging_path=path, target_path=ok,
                                                     block=True)) == C.INVALID_ARGUMENT
    assert code(u.NodeStage, pb.NodeStageRequest(volume_id=vid, staging_path=path, block=True)) == C.INVALID_ARGUMENT
    assert code(u.NodeUnpublish, pb.NodeUnpublishRequest(volume_id=vid, target_path=path)) == C.INVALID_ARGUMENT
    assert code(u.NodeUnstage, pb.NodeUnstageRequest(volume_id=vid, staging_path=path)) == C.INVALID_ARGUMENT
    assert code(u.NodeStats, pb.NodeStatsRequest(volume_id=vid, volume_path=path)) == C.INVALID_ARGUMENT
    u.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=10)


@needs_kernel
def test_ids_attrs_and_flags_are_checked_on_the_unix_socket(engine: Engine) -> None:
    u = engine.unix()
    ok = str(engine.root / "ok")
    for bad_id in ("../x", "a/b", "", "-x", "x" * 200):
        assert code(u.NodeStage, pb.NodeStageRequest(volume_id=bad_id, staging_path=ok, block=True)) == \
            C.INVALID_ARGUMENT, bad_id
        assert code(u.DeleteVolume, pb.DeleteVolumeRequest(volume_id=bad_id)) == C.INVALID_ARGUMENT, bad_id
    assert code(u.CreateVolume, pb.CreateVolumeRequest(name="v", size=MiB, grain_size=256 * 1024,
                                                       volume_id="../../etc")) == C.INVALID_ARGUMENT
    big = {f"k{i}": "v" for i in range(1000)}
    assert code(u.CreateVolume, pb.CreateVolumeRequest(name="attrs", size=MiB, grain_size=256 * 1024,
                                                       attrs=big)) == C.INVALID_ARGUMENT
    assert code(u.CreateVolume, pb.CreateVolumeRequest(name="attrs", size=MiB, grain_size=256 * 1024,
                                                       attrs={"k": "v" * 100_000})) == C.INVALID_ARGUMENT
    vid = _volume(engine, "flags")
    assert code(u.Snapshot, pb.SnapshotRequest(source_id=vid, name="s", attrs=big)) == C.INVALID_ARGUMENT
    assert code(u.SnapshotGroup, pb.SnapshotGroupRequest(group_name="g", items=[
        pb.SnapshotItem(source_id=vid, name="s", volume_id="a/b")])) == C.INVALID_ARGUMENT
    assert code(u.NodeStage, pb.NodeStageRequest(volume_id=vid, staging_path=ok, fs_type="ext4",
                                                 mount_flags=["ro\nrw"])) == C.INVALID_ARGUMENT
    assert code(u.NodeExpand, pb.NodeExpandRequest(volume_id=vid, volume_path=ok,
                                                   required_bytes=-1)) == C.INVALID_ARGUMENT
    # nothing was made of the refused requests
    names = {v.name for v in u.FindVolumes(pb.FindVolumesRequest(), timeout=10).volumes}
    assert "attrs" not in names and "v" not in names
    u.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=10)


@needs_kernel
def test_the_controller_refuses_an_engine_naming_another_node(engine: Engine) -> None:
    from csi_driver.remote.client import RemoteBackend
    from csi_driver.remote.wire import EngineUnavailable

    ctl = engine.files("controller")
    right = RemoteBackend(engine.addr, tls=ctl, node_id=NODE)
    wrong = RemoteBackend(engine.addr, tls=ctl, node_id="node-b")  # a Lease pointing node-b at this engine
    try:
        assert right.ping().pid == engine.proc.pid
        with pytest.raises(EngineUnavailable) as err:
            wrong.ping()
        print(err.value)
    finally:
        right.close()
        wrong.close()
    assert ctl.names == (CONTROLLER_NAME,) and engine.files(f"nodes/{NODE}").names == (node_name(NODE),)


def test_an_engine_refuses_to_start_with_a_certificate_for_another_node(tmp_path: Path) -> None:
    tls = tmp_path / "certs"
    write_certificates(str(tls), nodes=["node-b"])
    for wrong in ("controller", "nodes/node-b"):
        with pytest.raises(ValueError, match="needs a node certificate naming"):
            TlsFiles.load(str(tls / wrong)).check_engine(NODE)
    TlsFiles.load(str(tls / "node")).check_engine(NODE)  # the wildcard covers it
    TlsFiles.load(str(tls / "nodes" / "node-b")).check_engine("node-b")
    with pytest.raises(ValueError, match="controller certificate"):
        TlsFiles.load(str(tls / "node")).check_controller()
    # run again: the CA is kept, a new node's directory is added, nothing is overwritten
    before = (tls / "controller" / "tls.crt").read_bytes()
    added = write_certificates(str(tls), nodes=["node-b", "node-c"])
    assert added == [str(tls / "nodes" / "node-c")]
    assert (tls / "controller" / "tls.crt").read_bytes() == before
    assert TlsFiles.load(str(tls / "nodes" / "node-c")).ca == TlsFiles.load(str(tls / "controller")).ca
    with pytest.raises(ValueError, match="node name"):
        write_certificates(str(tls), nodes=["../evil"])
