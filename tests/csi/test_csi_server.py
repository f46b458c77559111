"""`csi-flashcopy serve` as a process: socket handling, modes, restart with state kept, SIGTERM drain, logs,
readiness, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import threading
import urllib.request
from pathlib import Path

import grpc

from csi_driver.proto_gen import csi_pb2
from tests.csi.conftest import CsiServer, MiB, mount_cap, rpc_code
from tests.waiting import wait_for

C = grpc.StatusCode


def test_socket_is_0600_and_removed_on_exit(server_factory) -> None:
    srv = server_factory("perm").start()
    mode = stat.S_IMODE(os.stat(srv.sock).st_mode)
    assert stat.S_ISSOCK(os.stat(srv.sock).st_mode) and mode == 0o600
    assert srv.stop() == 0
    assert not srv.sock.exists()


def test_stale_socket_is_replaced(server_factory) -> None:
    srv = server_factory("stale")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(srv.sock))
    s.close()  # leaves the socket file behind with nobody listening
    assert srv.sock.exists()
    srv.start()
    assert srv.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name


def test_live_socket_or_other_file_is_not_stolen(server_factory) -> None:
    first = server_factory("live").start()
    second = CsiServer(first.root, extra=())
    second.log_path = first.root / "second.log"
    second.state = first.root / "state2"
    proc_exit = _run_to_exit(second)
    assert proc_exit == 1 and "another server is listening" in second.log()
    assert first.identity.Probe(csi_pb2.ProbeRequest()).ready.value  # still serving

    plain = server_factory("plain")
    plain.sock.write_text("not a socket")
    assert _run_to_exit(plain) == 1 and "is not a socket" in plain.log()
    plain.exit_codes.clear()


def _run_to_exit(srv: CsiServer, timeout: float = 30) -> int:
    import subprocess

    from tests.csi.conftest import REPO

    with open(srv.log_path, "ab") as log:
        proc = subprocess.run(srv.argv(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    return proc.returncode


def test_restart_keeps_everything(server_factory) -> None:
    srv = server_factory("restart").start()
    v = srv.create_volume("pvc-keep", 64 * MiB, parameters={"grainSize": "64Ki", "copyRate": "0"})
    s = srv.create_snapshot("snap-keep", v.volume_id, parameters={"copyRate": "0"})
    clone_req = csi_pb2.CreateVolumeRequest(
        name="pvc-clone", volume_capabilities=[mount_cap()],
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshot_id)))
    clone = srv.controller.CreateVolume(clone_req).volume
    g = srv.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="grp-keep", source_volume_ids=[v.volume_id, clone.volume_id])).group_snapshot
    grown = srv.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=v.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)))
    before_vols = srv.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    before_snaps = srv.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())

    assert srv.restart() == 0

    assert srv.controller.ListVolumes(csi_pb2.ListVolumesRequest()) == before_vols
    assert srv.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()) == before_snaps
    # idempotency by name survives the restart
    again = srv.create_volume("pvc-keep", 128 * MiB, parameters={"grainSize": "64Ki", "copyRate": "0"})
    assert again.volume_id == v.volume_id and again.capacity_bytes == grown.capacity_bytes
    assert srv.create_snapshot("snap-keep", v.volume_id, parameters={"copyRate": "0"}) == s
    assert srv.controller.CreateVolume(clone_req).volume == clone
    got = srv.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id)).group_snapshot
    assert got == g
    assert rpc_code(srv.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(
        snapshot_id=g.snapshots[0].snapshot_id)) == C.FAILED_PRECONDITION


def test_modes(server_factory) -> None:
    ctl = server_factory("ctl", mode="controller").start()
    assert rpc_code(ctl.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest()) == C.UNIMPLEMENTED
    assert ctl.create_volume("in-controller-mode").volume_id
    caps = ctl.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    assert any(c.service.type == c.service.CONTROLLER_SERVICE for c in caps if c.HasField("service"))

    node = server_factory("node", mode="node").start()
    assert node.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id
    assert rpc_code(node.controller.CreateVolume, csi_pb2.CreateVolumeRequest(name="x")) == C.UNIMPLEMENTED
    assert rpc_code(node.group.GroupControllerGetCapabilities,
                    csi_pb2.GroupControllerGetCapabilitiesRequest()) == C.UNIMPLEMENTED
    caps = node.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert services == {csi_pb2.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}


def test_probe_waits_for_the_engine(server_factory) -> None:
    first = server_factory("holder").start()
    waiting = server_factory("waiter")
    waiting.state = first.state  # same state dir: the engine lock is held by the first server
    waiting.start(wait_ready=False)
    # the event: the waiter has tried the engine lock and been refused (it retries; Probe says not ready)
    wait_for(lambda: "state dir busy" in waiting.log(), timeout=30, what="the waiter to find the state dir busy",
             why=waiting.log)
    assert waiting.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
    assert rpc_code(waiting.controller.ListVolumes, csi_pb2.ListVolumesRequest()) == C.UNAVAILABLE
    assert waiting.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name  # identity works meanwhile
    assert first.stop() == 0
    waiting.wait_ready(timeout=30)
    assert rpc_code(waiting.controller.ListVolumes, csi_pb2.ListVolumesRequest()) == C.OK
    assert "state dir busy" in waiting.log()


def test_sigterm_drains_and_keeps_every_acknowledged_volume(server_factory) -> None:
    srv = server_factory("drain").start()
    acked: list[str] = []
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(n: int) -> None:
        channel = grpc.insecure_channel(srv.endpoint)
        from csi_driver.proto_gen import csi_pb2_grpc

        stub = csi_pb2_grpc.ControllerStub(channel)
        i = 0
        while not stop.is_set():
            req = csi_pb2.CreateVolumeRequest(name=f"drain-{n}-{i}", volume_capabilities=[mount_cap()],
                                              capacity_range=csi_pb2.CapacityRange(required_bytes=MiB))
            try:
                vid = stub.CreateVolume(req, timeout=30).volume.volume_id
                with lock:
                    acked.append(vid)
                    codes.append(C.OK)
            except grpc.RpcError as e:
                with lock:
                    codes.append(e.code())
                if e.code() == C.UNAVAILABLE:
                    break
            i += 1
        channel.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 12, timeout=60, what="calls completing before SIGTERM")
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(60)
    stop.set()
    for t in threads:
        t.join(60)
    srv.proc = None
    assert code == 0, srv.log()
    assert acked and set(codes) <= {C.OK, C.UNAVAILABLE, C.CANCELLED}, set(codes)
    assert "shutting down" in srv.log() and "stopped exit_code=0" in srv.log()
    srv.start()
    listed = {e.volume.volume_id for e in srv.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
    assert set(acked) <= listed


def json_lines(text: str) -> list[dict]:
    """Every log line parsed as JSON: every line is ours (no library prints its own)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), lines
    return [json.loads(line) for line in lines]


def test_json_logs_and_no_secrets_even_at_debug(server_factory) -> None:
    srv = server_factory("json", log_format="json", log_level="debug").start()
    srv.create_volume("json-vol", secrets={"apikey": "SUPER-SECRET-123"})
    srv.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="vol-absent",
                                                            secrets={"apikey": "SUPER-SECRET-456"}))
    assert rpc_code(srv.controller.CreateVolume, csi_pb2.CreateVolumeRequest(name="bad")) == C.INVALID_ARGUMENT
    srv.stop()
    records = json_lines(srv.log())
    rpcs = [r for r in records if r.get("msg") == "rpc"]
    create = [r for r in rpcs if r["method"] == "CreateVolume" and r.get("name") == "json-vol"]
    assert len(create) == 1
    assert create[0]["code"] == "OK" and create[0]["duration_ms"] >= 0 and create[0]["result_volume_id"]
    bad = [r for r in rpcs if r["method"] == "CreateVolume" and r.get("name") == "bad"]
    assert bad[0]["code"] == "INVALID_ARGUMENT" and "volume_capabilities" in bad[0]["error"]
    # debug request dumps exist but carry no secret values
    assert any(r.get("msg") == "request" for r in records)
    assert "SUPER-SECRET" not in srv.log()


def test_metrics_endpoint(server_factory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = server_factory("metrics", extra=("--metrics-address", f"127.0.0.1:{port}")).start()
    srv.create_volume("metered")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'flashcopy_csi_rpc_duration_seconds_count{code="OK",method="CreateVolume"} 1.0' in body  # docs/metrics.md
    health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert health.status == 200


def test_bad_endpoint_exits_nonzero(server_factory) -> None:
    srv = server_factory("badep", extra=())
    srv_argv = srv.argv()
    srv_argv[srv_argv.index("--endpoint") + 1] = "http://nope"
    import subprocess

    from tests.csi.conftest import REPO

    proc = subprocess.run(srv_argv, cwd=REPO, capture_output=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert proc.returncode == 1 and b"unsupported endpoint" in proc.stderr
    assert not Path(srv.state).exists() or not any(Path(srv.state).iterdir())


def test_non_unix_engine_endpoint_and_empty_node_id_exit_2(server_factory) -> None:
    import subprocess

    from tests.csi.conftest import REPO

    srv = server_factory("refuse")
    for extra in (["--engine", "process", "--engine-endpoint", "tcp://127.0.0.1:9"], ["--node-id", ""]):
        proc = subprocess.run(srv.argv() + extra, cwd=REPO, capture_output=True, timeout=30,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
        assert proc.returncode == 2, proc.stderr
        assert not srv.sock.exists()


def test_environment_variables_configure_serve(tmp_path_factory) -> None:
    """The sidecar convention: CSI_ENDPOINT etc. instead of flags."""
    import subprocess

    from tests.csi.conftest import REPO, short_tmp

    root = short_tmp(tmp_path_factory, "env")
    env = dict(os.environ, PYTHONPATH=str(REPO), CSI_ENDPOINT=f"unix://{root}/env.sock",
               CSI_FLASHCOPY_STATE_DIR=str(root / "state"), CSI_NODE_ID="env-node", CSI_MODE="node",
               CSI_DRIVER_NAME="env.flashcopy.example", CSI_MAX_VOLUMES_PER_NODE="7", CSI_LOG_FORMAT="json",
               CSI_ENGINE_MODE="embedded")
    proc = subprocess.Popen([sys.executable, "-m", "csi_driver", "serve"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE)
    try:
        def socket_up() -> bool:
            assert proc.poll() is None, f"serve exited {proc.returncode}"
            return (root / "env.sock").exists()

        wait_for(socket_up, timeout=30, what="the socket named by CSI_ENDPOINT")
        from csi_driver.proto_gen import csi_pb2_grpc

        with grpc.insecure_channel(f"unix://{root}/env.sock") as ch:
            info = csi_pb2_grpc.NodeStub(ch).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
            assert info.node_id == "env-node" and info.max_volumes_per_node == 7
            assert dict(info.accessible_topology.segments) == {"topology.env.flashcopy.example/node": "env-node"}
            name = csi_pb2_grpc.IdentityStub(ch).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10).name
            assert name == "env.flashcopy.example"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert all(json_lines(err.decode()))
