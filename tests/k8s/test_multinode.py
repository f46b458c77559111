"""Three nodes and one controller behind the real control plane of ../shared/peers/k8s.

Three `csi-flashcopy engine` processes (own state dirs, node ids, 127.0.0.1 ports, mutual TLS, their Leases in
the namespace) stand in for three nodes; `serve --mode controller` finds them through the Leases and serves the
real csi-provisioner (started here with the chart's --strict-topology) and csi-snapshotter. The test creates
the Node/CSINode objects as kubelet and the registrar would. Volumes are pinned to nodes with
WaitForFirstConsumer + the selected-node annotation; data is written through each node's engine (a staged raw
block device) and read back from restores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.k8s.staging import StagedBlock
from tests.k8s.test_k8s_flow import SKIP, Cluster, _free_port, probe_ready, running_peer
from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(SKIP is not None or os.geteuid() != 0,
                                reason=SKIP or "the node engines mount FUSE exports: needs root")

DRIVER = "flashcopy.csi.dev"
KEY = f"topology.{DRIVER}/node"
NS = "flashcopy"
NODES = ("node-a", "node-b", "node-c")
MiB = 1 << 20
WAIT = 90.0


@dataclass
class Engine:
    node: str
    state: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> str:
        return f"unix://{self.state}/engine.sock"


class MultiNode:
    def __init__(self, c: Cluster, root: Path) -> None:
        from csi_driver.remote.tls import write_certificates

        self.c, self.root = c, root
        # a CA, the controller's certificate and one per node (csi-flashcopy certs --node ...)
        self.tls = root / "tls"
        write_certificates(str(self.tls), nodes=NODES)
        self.other_ca = root / "other-tls"
        write_certificates(str(self.other_ca))
        self.engines = {n: Engine(n, root / n, _free_port()) for n in NODES}
        self.controller: subprocess.Popen[bytes] | None = None
        self.sock = c.state / "csi.sock"

    def start_engine(self, node: str) -> None:
        e = self.engines[node]
        log = open(self.root / f"engine-{node}.log", "ab")  # noqa: SIM115 - the process keeps it
        e.proc = subprocess.Popen(
            [sys.executable, "-m", "csi_driver", "engine", "--state-dir", str(e.state), "--listen",
             f"127.0.0.1:{e.port}", "--tls-dir", str(self.tls / "nodes" / node), "--node-id", node, "--namespace", NS,
             "--kubeconfig", str(self.c.kubeconfig)], stdout=log, stderr=subprocess.STDOUT, env=self.c.env)

    def stop_engine(self, node: str, sig: int = signal.SIGTERM) -> None:
        p = self.engines[node].proc
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(30)

    def start_controller(self) -> None:
        log = open(self.root / "controller.log", "ab")  # noqa: SIM115
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "csi_driver", "serve", "--mode", "controller", "--endpoint", f"unix://{self.sock}",
             "--tls-dir", str(self.tls / "controller"), "--namespace", NS, "--kubeconfig", str(self.c.kubeconfig),
             "--node-id", "controller", "--driver-name", DRIVER], stdout=log, stderr=subprocess.STDOUT,
            env=self.c.env)

    def stop_controller(self) -> None:
        if self.controller is not None and self.controller.poll() is None:
            self.controller.terminate()
            self.controller.wait(30)

    def csi(self) -> Any:
        from csi_driver.proto_gen import csi_pb2_grpc

        ch = grpc.insecure_channel(f"unix:{self.sock}")
        return csi_pb2_grpc.ControllerStub(ch), csi_pb2_grpc.GroupControllerStub(ch), ch

    def ready(self) -> bool:
        return probe_ready(self.sock)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                         for p in sorted(self.root.glob("*.log")))


@pytest.fixture(scope="module")
def mn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    from kubernetes import client, config

    root = tmp_path_factory.mktemp("multinode")
    with running_peer(root / "k8s", "snapshotter") as c:
        m = MultiNode(c, root)
        api = config.new_client_from_config(config_file=str(c.kubeconfig))
        core, storage = client.CoreV1Api(api), client.StorageV1Api(api)
        core.create_namespace({"metadata": {"name": NS}})
        for n in NODES:
            core.create_node({"metadata": {"name": n, "labels": {"kubernetes.io/hostname": n, KEY: n}}})
            storage.create_csi_node({"metadata": {"name": n}, "spec": {"drivers": [
                {"name": DRIVER, "nodeID": n, "topologyKeys": [KEY]}]}})
            m.start_engine(n)
        # the operations CRDs (the chart's crds/): the controller's operations loop runs on it too
        c.kubectl("apply", "-f", str(pm.REPO / "charts" / "csi-flashcopy" / "crds"))
        c.kubectl("wait", "--for", "condition=Established", "--timeout=60s", "crd", "--all")
        m.start_controller()
        # the chart's provisioner flags: strict topology (requisite = the selected node), capacity per node
        c.start("csi-provisioner", [str(c.peer_bin / "csi-provisioner"), "--csi-address", str(m.sock),
                                    "--kubeconfig", str(c.kubeconfig), "--leader-election=false",
                                    "--strict-topology", "--feature-gates=Topology=true",
                                    "--extra-create-metadata", "--v", "3"])
        m.api = api  # type: ignore[attr-defined]
        try:
            wait_for(lambda: m.sock.exists(), timeout=WAIT, what="controller socket")
            wait_for(m.ready, timeout=WAIT, what="controller Probe ready (every engine Lease listed)")
            yield m
        except BaseException:
            print(m.logs(), c.logs())
            raise
        finally:
            m.stop_controller()
            for n in NODES:
                m.stop_engine(n)


def _leases(m: MultiNode) -> dict[str, Any]:
    from kubernetes import client

    from csi_driver.k8s.leases import SELECTOR

    out = client.CoordinationV1Api(m.api).list_namespaced_lease(NS, label_selector=SELECTOR)  # type: ignore[attr-defined]
    return {lease.metadata.name: lease for lease in out.items}


def test_engines_keep_leases_with_their_address(mn: MultiNode) -> None:
    from csi_driver.k8s.leases import ADDRESS

    wait_for(lambda: set(_leases(mn)) == set(NODES), timeout=WAIT, what="three engine Leases")
    for n, lease in _leases(mn).items():
        assert lease.metadata.annotations[ADDRESS] == f"127.0.0.1:{mn.engines[n].port}"
        assert lease.spec.holder_identity == n and lease.spec.lease_duration_seconds > 0


def test_engine_port_is_mutual_tls_only(mn: MultiNode) -> None:
    from csi_driver.proto_gen import engine_pb2 as pb
    from csi_driver.proto_gen import engine_pb2_grpc as pb_grpc
    from csi_driver.remote.tls import TlsFiles, channel_options

    addr = f"127.0.0.1:{mn.engines['node-a'].port}"
    wait_for(lambda: (mn.root / "node-a" / "engine.sock").exists(), timeout=WAIT, what="engine up")
    good, other = TlsFiles.load(str(mn.tls / "controller")), TlsFiles.load(str(mn.other_ca / "controller"))

    def ping(ch: grpc.Channel) -> grpc.StatusCode:
        try:
            pb_grpc.EngineStub(ch).Ping(pb.PingRequest(), timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()
        finally:
            ch.close()

    assert ping(grpc.insecure_channel(addr)) == grpc.StatusCode.UNAVAILABLE  # plaintext refused
    no_cert = grpc.ssl_channel_credentials(root_certificates=good.ca)
    assert ping(grpc.secure_channel(addr, no_cert, options=channel_options("node-a"))) == \
        grpc.StatusCode.UNAVAILABLE
    foreign = grpc.ssl_channel_credentials(root_certificates=good.ca, private_key=other.key,
                                           certificate_chain=other.cert)
    assert ping(grpc.secure_channel(addr, foreign, options=channel_options("node-a"))) == grpc.StatusCode.UNAVAILABLE
    # the right CA and the controller's name, but dialled as another node's engine: refused by the controller side
    assert ping(grpc.secure_channel(addr, good.channel_credentials(), options=channel_options("node-b"))) == \
        grpc.StatusCode.UNAVAILABLE
    # a node's certificate of the same CA: the TLS handshake passes, the engine refuses the call by name
    node_b = TlsFiles.load(str(mn.tls / "nodes" / "node-b")).channel_credentials()
    assert ping(grpc.secure_channel(addr, node_b, options=channel_options("node-a"))) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert ping(grpc.secure_channel(addr, good.channel_credentials(), options=channel_options("node-a"))) == \
        grpc.StatusCode.OK


def _capacity(mn: MultiNode, node: str | None) -> int:
    from csi_driver.proto_gen import csi_pb2

    req = csi_pb2.GetCapacityRequest()
    if node:
        req.accessible_topology.segments[KEY] = node
    return mn.csi()[0].GetCapacity(req, timeout=30).available_capacity


def test_capacity_per_topology_segment(mn: MultiNode) -> None:
    wait_for(lambda: all(_capacity(mn, n) > 0 for n in NODES), timeout=WAIT, what="capacity of every node")
    assert _capacity(mn, "no-such-node") == 0


def _storage_class(mn: MultiNode) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.StorageV1Api(mn.api).create_storage_class({  # type: ignore[attr-defined]
            "metadata": {"name": "fc"}, "provisioner": DRIVER, "volumeBindingMode": "WaitForFirstConsumer",
            "parameters": {"grainSize": "64Ki"}})
    except ApiException as e:
        if e.status != 409:
            raise


def _pvc(mn: MultiNode, name: str, node: str, *, source: str | None = None, size: str = "16Mi") -> dict[str, Any]:
    from kubernetes import client

    _storage_class(mn)
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "storageClassName": "fc", "volumeMode": "Block",
                            "resources": {"requests": {"storage": size}}}
    if source:
        spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": source}
    body = {"metadata": {"name": name, "annotations": {"volume.kubernetes.io/selected-node": node}}, "spec": spec}
    client.CoreV1Api(mn.api).create_namespaced_persistent_volume_claim(NS, body)  # type: ignore[attr-defined]
    return body


def _bound_pv(mn: MultiNode, name: str) -> Any:
    from kubernetes import client

    core = client.CoreV1Api(mn.api)  # type: ignore[attr-defined]

    def bound() -> Any:
        pvc = core.read_namespaced_persistent_volume_claim(name, NS)
        return core.read_persistent_volume(pvc.spec.volume_name) if pvc.status.phase == "Bound" else None

    return wait_for(bound, timeout=WAIT, what=f"PVC {name} bound", why=lambda: mn.logs())


def _pv_node(pv: Any) -> str:
    terms = pv.spec.node_affinity.required.node_selector_terms
    return terms[0].match_expressions[0].values[0]


def _snapshot(mn: MultiNode, name: str, pvc: str) -> str:
    from kubernetes import client

    crd = client.CustomObjectsApi(mn.api)  # type: ignore[attr-defined]
    try:
        crd.create_cluster_custom_object("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", {
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass", "metadata": {"name": "fc"},
            "driver": DRIVER, "deletionPolicy": "Delete"})
    except client.exceptions.ApiException as e:
        if e.status != 409:
            raise
    crd.create_namespaced_custom_object("snapshot.storage.k8s.io", "v1", NS, "volumesnapshots", {
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": name},
        "spec": {"volumeSnapshotClassName": "fc", "source": {"persistentVolumeClaimName": pvc}}})

    def ready() -> str | None:
        vs = crd.get_namespaced_custom_object("snapshot.storage.k8s.io", "v1", NS, "volumesnapshots", name)
        st = vs.get("status") or {}
        return st.get("boundVolumeSnapshotContentName") if st.get("readyToUse") else None

    content = wait_for(ready, timeout=WAIT, what=f"VolumeSnapshot {name} ready", why=lambda: mn.logs())
    vsc = crd.get_cluster_custom_object("snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", content)
    return str(vsc["status"]["snapshotHandle"])


def _write_block(mn: MultiNode, node: str, volume_id: str, data: bytes | None) -> bytes:
    """Stage the volume as a raw block device on its node (the node plugin's job), write or read, unstage."""
    d = Staged(mn, node, volume_id)
    try:
        if data is not None:
            os.pwrite(d.fd, data, 0)
            os.fsync(d.fd)
        return os.pread(d.fd, len(data) if data is not None else 4096, 0)
    finally:
        d.close()


def test_volumes_snapshots_and_restores_on_each_node(mn: MultiNode) -> None:
    for n in NODES:
        _pvc(mn, f"data-{n}", n)
    for n in NODES:
        pv = _bound_pv(mn, f"data-{n}")
        handle = pv.spec.csi.volume_handle
        assert _pv_node(pv) == n and handle.startswith(f"{n}.vol-")
        _write_block(mn, n, handle, f"written on {n}".encode().ljust(4096, b"."))
        snap = _snapshot(mn, f"snap-{n}", f"data-{n}")
        assert snap.startswith(f"{n}.snap-")  # the snapshot lives on its source's node
        _pvc(mn, f"restore-{n}", n, source=f"snap-{n}", size="32Mi")
        rpv = _bound_pv(mn, f"restore-{n}")
        assert _pv_node(rpv) == n
        assert _write_block(mn, n, rpv.spec.csi.volume_handle, None).startswith(f"written on {n}".encode())


def test_restore_requested_on_another_node_is_sent_back_to_the_scheduler(mn: MultiNode) -> None:
    from kubernetes import client

    if client.CoreV1Api(mn.api).list_namespaced_persistent_volume_claim(  # type: ignore[attr-defined]
            NS, field_selector="metadata.name=data-node-a").items == []:
        pytest.skip("needs the snapshot of node-a made by the previous test")
    _pvc(mn, "restore-elsewhere", "node-b", source="snap-node-a")
    core = client.CoreV1Api(mn.api)  # type: ignore[attr-defined]

    def rescheduled() -> bool:
        pvc = core.read_namespaced_persistent_volume_claim("restore-elsewhere", NS)
        return "volume.kubernetes.io/selected-node" not in (pvc.metadata.annotations or {})

    # RESOURCE_EXHAUSTED makes external-provisioner drop the selected node: the scheduler picks again
    wait_for(rescheduled, timeout=WAIT, what="selected-node annotation removed", why=lambda: mn.logs())
    log = (mn.root / "controller.log").read_text()
    assert "RESOURCE_EXHAUSTED" in log and "is on node node-a" in log


def _csi_volume(mn: MultiNode, name: str, node: str, snapshot_id: str = "") -> str:
    """A raw block volume of 8 MiB on node through the controller (from snapshot_id when given)."""
    from csi_driver.proto_gen import csi_pb2

    cap = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                   access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB))
    if snapshot_id:
        req.volume_content_source.snapshot.snapshot_id = snapshot_id
    req.accessibility_requirements.requisite.add().segments[KEY] = node
    return mn.csi()[0].CreateVolume(req, timeout=30).volume.volume_id


def _member_counts(mn: MultiNode, group: str, nodes: tuple[str, ...] | None = None) -> dict[str, int]:
    """Member snapshots of the named group on each node (default: every node whose engine runs)."""
    from csi_driver.remote.client import RemoteBackend

    if nodes is None:
        nodes = tuple(n for n, e in mn.engines.items() if e.proc is not None and e.proc.poll() is None)
    out = {}
    for n in nodes:
        b = RemoteBackend(mn.engines[n].sock)
        try:
            out[n] = len(b.find_volumes({"csi.kind": "snapshot", "csi.groupName": group}))
        finally:
            b.close()
    return out


def test_operations_through_the_controller_status_per_node_and_restore_in_place(mn: MultiNode) -> None:
    """The controller's operations loop over every node's engine: one FlashCopyNode per node, and a restore in
    place sent to the node that holds the volume."""
    from kubernetes import client

    n = NODES[1]
    _pvc(mn, "ops-db", n)
    handle = _bound_pv(mn, "ops-db").spec.csi.volume_handle
    _write_block(mn, n, handle, b"before".ljust(4096, b"."))
    _snapshot(mn, "ops-db-s", "ops-db")
    _write_block(mn, n, handle, b"after".ljust(4096, b"."))
    crd = client.CustomObjectsApi(mn.api)  # type: ignore[attr-defined]

    def per_node() -> dict[str, Any] | None:
        items = crd.list_namespaced_custom_object("flashcopy.csi.dev", "v1alpha1", NS, "flashcopynodes")["items"]
        found = {o["metadata"]["name"]: o.get("status") or {} for o in items}
        ok = set(NODES) <= set(found) and any(v["id"] == handle for v in found[n].get("volumes", []))
        return found if ok else None
    found = wait_for(per_node, timeout=WAIT, what="a FlashCopyNode per node", interval=0.5)
    assert all(v["node"] == n for v in found[n]["volumes"])
    r = mn.c.cli("restore", "-n", NS, "--pvc", "ops-db", "--snapshot", "ops-db-s", "--wait", "60", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr + mn.logs()
    assert _write_block(mn, n, handle, None).startswith(b"before")
    r = mn.c.cli("status", "-n", NS, "-o", "json", timeout=60)
    doc = json.loads(r.stdout)
    assert {v["node"] for v in doc["volumes"]} >= {n} and not doc["missingNodes"]


def test_group_snapshot_across_three_nodes(mn: MultiNode) -> None:
    from csi_driver.proto_gen import csi_pb2

    vols = [_csi_volume(mn, f"grp-{n}", n) for n in NODES]
    g = mn.csi()[1].CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="g-three", source_volume_ids=vols), timeout=60).group_snapshot
    assert sorted(s.source_volume_id for s in g.snapshots) == sorted(vols)
    assert {s.snapshot_id.split(".")[0] for s in g.snapshots} == set(NODES)
    got = mn.csi()[1].GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id), timeout=30).group_snapshot
    assert len(got.snapshots) == 3
    assert "group snapshot across nodes" in (mn.root / "controller.log").read_text()
    mn.csi()[1].DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id), timeout=30)


def test_dead_node_fails_only_its_volumes_and_recovers(mn: MultiNode) -> None:
    from csi_driver.proto_gen import csi_pb2

    vols = {n: _csi_volume(mn, f"dead-{n}", n) for n in NODES}
    mn.stop_engine("node-c", signal.SIGKILL)
    ctl, grp, _ = mn.csi()

    def code(fn: Any, req: Any) -> grpc.StatusCode:
        try:
            fn(req, timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    get = ctl.ControllerGetVolume
    assert code(get, csi_pb2.ControllerGetVolumeRequest(volume_id=vols["node-c"])) == grpc.StatusCode.UNAVAILABLE
    assert code(get, csi_pb2.ControllerGetVolumeRequest(volume_id=vols["node-a"])) == grpc.StatusCode.OK
    listed = {e.volume.volume_id for e in ctl.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30).entries}
    assert vols["node-a"] in listed and vols["node-b"] in listed and vols["node-c"] not in listed
    # a group over the dead node: refused, and the live nodes keep no member
    assert code(grp.CreateVolumeGroupSnapshot, csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="g-dead", source_volume_ids=list(vols.values()))) == grpc.StatusCode.UNAVAILABLE
    assert _member_counts(mn, "g-dead") == {"node-a": 0, "node-b": 0}
    mn.start_engine("node-c")
    wait_for(lambda: code(get, csi_pb2.ControllerGetVolumeRequest(volume_id=vols["node-c"])) == grpc.StatusCode.OK,
             timeout=WAIT, what="node-c back", why=lambda: mn.logs())


def test_controller_restart_loses_nothing(mn: MultiNode) -> None:
    from csi_driver.proto_gen import csi_pb2

    before = {e.volume.volume_id for e in mn.csi()[0].ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30).entries}
    assert before
    mn.stop_controller()
    mn.start_controller()

    def listed() -> set[str] | None:
        try:
            return {e.volume.volume_id for e in mn.csi()[0].ListVolumes(csi_pb2.ListVolumesRequest(),
                                                                        timeout=10).entries}
        except grpc.RpcError:
            return None

    wait_for(lambda: listed() == before, timeout=WAIT, what="the same volumes after a controller restart")


def Staged(mn: MultiNode, node: str, volume_id: str) -> StagedBlock:  # noqa: N802 - reads as the class it makes
    """A volume staged and published as a raw block device on its node, through that node's engine."""
    return StagedBlock(mn.engines[node].sock, mn.root / "paths" / volume_id, volume_id)


def test_group_snapshot_under_a_dependent_write_chain_restores_a_prefix(mn: MultiNode) -> None:
    """Write k goes to node k % 3 only after write k-1 (on the previous node) has completed, flushed; the
    group snapshot is taken meanwhile. The restored three volumes must hold exactly writes 0..K-1."""
    import struct
    import threading

    from csi_driver.proto_gen import csi_pb2

    vols = {n: _csi_volume(mn, f"chain-{n}", n) for n in NODES}
    devs = [Staged(mn, n, vols[n]) for n in NODES]
    stop, written = threading.Event(), [0]

    def writer() -> None:
        k = 0
        while not stop.is_set() and k < 3 * 2000:
            d = devs[k % 3]
            os.pwrite(d.fd, struct.pack("<Q", k + 1).ljust(4096, b"\xee"), (k // 3) * 4096)
            os.fsync(d.fd)
            k += 1
            written[0] = k

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_for(lambda: written[0] >= 30, timeout=WAIT, what="the chain under way")
        g = mn.csi()[1].CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name="g-chain", source_volume_ids=list(vols.values())), timeout=60).group_snapshot
        wait_for(lambda: written[0] >= 30 + 30, timeout=WAIT, what="the chain going on after the snapshot")
    finally:
        stop.set()
        t.join(30)
        for d in devs:
            d.close()
    by_source = {s.source_volume_id: s.snapshot_id for s in g.snapshots}
    found: list[int] = []
    for n in NODES:
        rid = _csi_volume(mn, f"chain-restore-{n}", n, by_source[vols[n]])
        r = Staged(mn, n, rid)
        try:
            blocks = os.pread(r.fd, (written[0] // 3 + 1) * 4096, 0)
        finally:
            r.close()
        for i in range(len(blocks) // 4096):
            (value,) = struct.unpack_from("<Q", blocks, i * 4096)
            if value:
                k = value - 1
                assert k % 3 == NODES.index(n) and k // 3 == i, f"block {i} of {n} holds write {k}"
                found.append(k)
    found.sort()
    assert found and found == list(range(len(found))), f"not a prefix of the chain: {found[:10]}...{found[-10:]}"
    assert len(found) < written[0], "the snapshot was taken while the chain ran"


def test_a_node_that_hangs_in_prepare_leaves_no_member(mn: MultiNode) -> None:
    """node-c stops answering (SIGSTOP) before the prepare: the group fails, node-a and node-b are released with
    nothing left, and node-c, once it runs again, aborts the prepare it finds by itself (watchdog)."""
    from csi_driver.proto_gen import csi_pb2

    vols = [_csi_volume(mn, f"hang-{n}", n) for n in NODES]
    proc = mn.engines["node-c"].proc
    assert proc is not None and proc.poll() is None
    proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as e:
            mn.csi()[1].CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
                name="g-hang", source_volume_ids=vols), timeout=120)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "node-c" in (e.value.details() or "")
        assert _member_counts(mn, "g-hang", ("node-a", "node-b")) == {"node-a": 0, "node-b": 0}
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_for(lambda: _member_counts(mn, "g-hang").get("node-c") == 0, timeout=WAIT,
             what="node-c's watchdog aborting the prepare it ran late")

