"""The real-kubelet environment for tests/kubelet: the chart installed with `helm install` into the control plane
of ../shared/peers/k8s, the node of ../shared/peers/k8s-node, and the chart's pods run as host processes (no
image can run here). Every container of the node DaemonSet and the controller Deployment that is ours or a
sidecar the peers ship runs with the args the API server holds for it: $(VAR)s expanded from its env, paths
under its volume mounts moved to where the volume is on the host (the chart is installed with the kubelet's root
dir and a temp state dir, so its hostPaths are real host paths), and a port of its own for every listening flag
(each pod has a network namespace, host processes share one). What differs from a pod, and why:

- each process that talks to the API server gets --kubeconfig acting as its pod's ServiceAccount (client-cert
  impersonation: the chart's RBAC is what authorizes it) instead of the in-cluster config, and the sidecars
  --leader-election-namespace (a pod reads its namespace from the token mount);
- csi-provisioner gets --capacity-ownerref-level=-1: the chart makes its Deployment own the CSIStorageCapacity
  objects through the provisioner's Pod, and a host process has no Pod object;
- the registrar is the peer's node-registrar.sh on the chart's plugin socket (it registers in the kubelet's
  plugins_registry, the chart's registration-dir); liveness-probe does not run (the peers ship no binary; the
  tests call Probe themselves).

Brought up in that order (control plane, chart, node, node pod, controller pod, registrar) and torn down in
reverse (node-down.sh drains the Pods while the driver still serves them), even when bringing it up fails half
way."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_driver import DRIVER_NAME
from tests.k8s.test_k8s_flow import Cluster, Proc, _free_port, probe_ready, running_peer
from tests.k8s.test_k8s_flow import _why_skip as _control_plane_why_skip
from tests.packaging import node_layout
from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for, wait_process_exit

PEER_NODE = pm.REPO.parent / "shared" / "peers" / "k8s-node"
NODE_UP, NODE_DOWN, NODE_REGISTRAR = (PEER_NODE / f"node-{s}.sh" for s in ("up", "down", "registrar"))
NODE_NAME = "localhost"  # the peer's node name; the driver's node id must be the same
IMAGE = "registry.k8s.io/e2e-test-images/busybox:1.36.1-1"
NS = "kubelet-test"
CNI_BIN = Path("/usr/lib/cni")
NODE_POD, CONTROLLER_POD = f"{pm.RELEASE}-node", f"{pm.RELEASE}-controller"
PORT_FLAGS = ("--listen", "--metrics-address", "--http-endpoint")
NOT_RUN = {"csi-node-driver-registrar": "node-registrar.sh runs it", "livenessprobe": "no binary in the peers"}


def why_skip() -> str | None:
    if not NODE_UP.exists():
        return f"kubelet test peer absent ({PEER_NODE}): see ../shared/peers/k8s-node/README.md"
    if os.geteuid() != 0:
        return "the kubelet peer (containerd, kubelet, loop devices, mounts) needs root"
    for exe in ("containerd", "ctr", "runc"):
        if shutil.which(exe) is None:
            return f"{exe} not on PATH (.ci/setup.d/40-kubelet-peer.sh: apt-get install containerd runc)"
    for plugin in ("bridge", "host-local", "loopback"):
        if not (CNI_BIN / plugin).exists():
            return f"no CNI plugin {CNI_BIN / plugin} (apt-get install containernetworking-plugins)"
    for exe in ("losetup", "mkfs.ext4", "mkfs.xfs", "xfs_growfs", "resize2fs"):
        if shutil.which(exe) is None:
            return f"{exe} not on PATH (.ci/setup-system.sh)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    return _control_plane_why_skip()


def has_cap_sys_resource() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in our effective set: the driver (started by us, as root) inherits it, and ext4
    online resize (EXT4_IOC_RESIZE_FS, resize2fs on a mounted fs) needs it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


@dataclass
class HostContainer:
    """One container of the chart's pods as a host process (a Proc once started). restart() is what the kubelet
    does when the container dies: the same argv again, in a new process."""

    name: str  # <pod>/<container>
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: Proc | None = None

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return self.proc.popen if self.proc else None

    def start(self) -> None:
        with open(self.log, "ab") as f:
            self.proc = Proc(self.name, subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                                         cwd=pm.REPO, start_new_session=True), self.log)

    def running(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc:
            self.proc.stop(sig)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def text(self) -> str:
        return self.proc.text() if self.proc else ""


def host_args(args: list[str], env: dict[str, str], mounts: dict[str, Path]) -> list[str]:
    """A container's args for a host process: $(VAR) from its env, a value under a volume mount (also after
    unix://) moved to the volume's host path, a fresh port for each listening flag."""
    by_depth = sorted(mounts.items(), key=lambda m: -len(m[0]))
    out = []
    for a in args:
        a = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
        flag, eq, val = a.partition("=")
        if eq:
            scheme = "unix://" if val.startswith("unix://") else ""
            path = val[len(scheme):]
            for mount_path, host in by_depth:
                if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
                    val = scheme + str(host) + path[len(mount_path):]
                    break
            if flag in PORT_FLAGS and ":" in val:
                val = f"{val.rsplit(':', 1)[0]}:{_free_port()}"
            a = f"{flag}={val}"
        out.append(a)
    return out


@dataclass
class ChartPods:
    """The chart's node and controller pods, read back from the API server after `helm install`, as host
    processes (see the module docstring)."""

    cluster: Cluster
    base: Path
    containers: dict[str, HostContainer] = field(default_factory=dict)
    volumes: dict[str, dict[str, Path]] = field(default_factory=dict)  # pod -> volume name -> host path

    def _workload(self, kind: str, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cluster.kubectl("-n", pm.NAMESPACE, "get", kind, name, "-o", "json").stdout))

    def _secret_dir(self, pod: str, volume: dict[str, Any]) -> Path:
        d = self.base / f"{pod}-{volume['name']}"
        d.mkdir(exist_ok=True)
        secret = json.loads(self.cluster.kubectl("-n", pm.NAMESPACE, "get", "secret", volume["secret"]["secretName"],
                                                 "-o", "json").stdout)
        for key, b64 in secret["data"].items():
            f = d / key
            f.write_bytes(base64.b64decode(b64))
            f.chmod(volume["secret"].get("defaultMode", 0o644))
        return d

    def _pod_volumes(self, pod: str, spec: dict[str, Any]) -> dict[str, Path]:
        vols: dict[str, Path] = {}
        for v in spec.get("volumes", []):
            if "hostPath" in v:
                vols[v["name"]] = Path(v["hostPath"]["path"])
                if v["hostPath"].get("type") == "DirectoryOrCreate":
                    vols[v["name"]].mkdir(parents=True, exist_ok=True)
            elif "emptyDir" in v:
                vols[v["name"]] = self.base / f"{pod}-{v['name']}"
                vols[v["name"]].mkdir(exist_ok=True)
            elif "secret" in v:
                vols[v["name"]] = self._secret_dir(pod, v)
        return vols

    def load(self, kind: str, pod: str) -> list[str]:
        """Prepare every runnable container of workload `pod`; their names, in the pod's order."""
        spec = self._workload(kind, pod)["spec"]["template"]["spec"]
        vols = self.volumes[pod] = self._pod_volumes(pod, spec)
        kubeconfig = self.cluster.service_account_kubeconfig(spec["serviceAccountName"],
                                                             self.base / f"{pod}.kubeconfig")
        fields = {"spec.nodeName": NODE_NAME, "status.podIP": "127.0.0.1", "metadata.namespace": pm.NAMESPACE,
                  "metadata.name": f"{pod}-host"}
        names = []
        for c in spec["containers"]:
            image = pm.image_name(c["image"])
            if image in NOT_RUN:
                continue
            env = {e["name"]: e.get("value") or fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
                   for e in c.get("env", [])}
            mounts = {m["mountPath"]: vols[m["name"]] for m in c.get("volumeMounts", [])}
            args = host_args(c.get("args", []), env, mounts)
            proc_env = {k: v for k, v in os.environ.items() if not k.startswith("CSI_") and k != "KUBECONFIG"}
            proc_env.update(env)
            if pm.is_driver_container(c):
                argv = [sys.executable, "-m", "csi_driver", *args]
                if pm.flag_value(args, "--namespace"):  # the processes that use the API
                    argv.append(f"--kubeconfig={kubeconfig}")
                proc_env["PYTHONPATH"] = str(pm.REPO) + os.pathsep + proc_env.get("PYTHONPATH", "")
            else:
                exe = self.cluster.peer_bin / image
                assert exe.exists(), f"{exe}: the peer unpacks no {image} (the chart's {c['name']} container)"
                if pm.flag_value(args, "--capacity-ownerref-level") is not None:
                    args = [a for a in args if not a.startswith("--capacity-ownerref-level")]
                    args.append("--capacity-ownerref-level=-1")
                argv = [str(exe), *args, f"--kubeconfig={kubeconfig}"]
                if pm.flag_value(args, "--leader-election") == "true":
                    argv.append(f"--leader-election-namespace={pm.NAMESPACE}")
            name = f"{pod}/{c['name']}"
            self.containers[name] = HostContainer(name, argv, proc_env, self.base / f"{pod}-{c['name']}.log")
            names.append(name)
        return names

    def stop_all(self) -> None:
        for c in reversed(list(self.containers.values())):
            c.stop()

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"--- {c.name} (exit {c.popen.poll() if c.popen else 'not started'}):\n"
                         + "\n".join(c.text().splitlines()[-lines:]) for c in self.containers.values())


@dataclass
class Env:
    cluster: Cluster
    pods: ChartPods
    sock: Path  # the controller's CSI socket (its sidecars' /csi)
    node_sock: Path  # the node plugin's, in the kubelet's plugin dir
    driver_state: Path  # the chart's stateDir
    node_state: Path
    kubelet_root: Path
    kubelet_port: int

    @property
    def driver(self) -> HostContainer:
        """The node plugin (`serve --mode=node`), which the kubelet calls."""
        return self.pods.containers[f"{NODE_POD}/csi-flashcopy"]

    def container(self, name: str) -> HostContainer:
        """<node|controller>/<container name in the chart>"""
        return self.pods.containers[f"{pm.RELEASE}-{name}"]

    def kubelet_summary(self) -> dict[str, Any] | None:
        """The kubelet's /stats/summary, straight from its (loopback, anonymous) port: the API server's node
        proxy refuses loopback addresses ("address not allowed")."""
        return self._kubelet_get("/stats/summary", json.load)

    def kubelet_metrics(self) -> str:
        return self._kubelet_get("/metrics", lambda r: r.read().decode()) or ""

    def _kubelet_get(self, path: str, parse: Any) -> Any:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.kubelet_port}{path}", context=ctx,
                                        timeout=10) as r:
                return parse(r)
        except OSError:
            return None

    def volume_stats(self, claim: str) -> dict[str, Any] | None:
        """The summary's entry for the volume of PVC `claim` (in the test namespace), if the kubelet has one."""
        for p in (self.kubelet_summary() or {}).get("pods", []):
            for v in p.get("volume") or []:
                ref = v.get("pvcRef") or {}
                if (ref.get("name"), ref.get("namespace")) == (claim, NS):
                    return dict(v)
        return None

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, stdin=stdin, check=check)

    def k(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """kubectl in the test namespace."""
        return self.kubectl("-n", NS, *args, stdin=stdin, check=check)

    def apply(self, *objs: dict[str, Any]) -> None:
        self.k("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))

    def node_log(self, name: str, lines: int = 40, grep: str | None = None) -> str:
        path = self.node_state / "logs" / f"{name}.log"
        if not path.exists():
            return f"(no {path})"
        text = path.read_text(errors="replace").splitlines()
        if grep:
            text = [t for t in text if grep in t]
        return f"--- {name}:\n" + "\n".join(text[-lines:])

    def why(self, pod: str | None = None) -> str:
        out = []
        if pod:
            out.append(self.k("describe", "pod", pod, check=False).stdout[-3000:])
        out.append(self.k("get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-3000:])
        out.append(self.node_log("kubelet", 30, grep="csi"))
        out.append(self.pods.logs())
        return "\n".join(out)


def _run(argv: list[str], env: dict[str, str], what: str, timeout: float = 240) -> str:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=pm.REPO)
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _wait_ready(pods: ChartPods, name: str, ready: Any) -> None:
    c = pods.containers[name]

    def up() -> bool:
        if not c.running():
            raise AssertionError(f"{name} exited {c.popen.returncode if c.popen else '?'}:\n{c.text()[-4000:]}")
        return bool(ready())

    wait_for(up, timeout=90, what=f"{name} ready", interval=0.2, why=c.text)


def _kill_by_state(state: Path) -> None:
    """What a container started beyond its own process (an engine a restart left, a keeper) carries the state
    dir on its command line."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if str(state).encode() in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGTERM)
                with contextlib.suppress(AssertionError):
                    wait_process_exit(int(d.name), timeout=10)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(d.name), signal.SIGKILL)


def _install_chart(c: Cluster, kubelet_root: Path, driver_state: Path) -> None:
    r = subprocess.run(["helm", "install", pm.RELEASE, str(pm.CHART), "--namespace", pm.NAMESPACE,
                        "--kubeconfig", str(c.kubeconfig), "--wait=false",
                        "--set", f"kubeletDir={kubelet_root}", "--set", f"stateDir={driver_state}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"helm install: {r.stderr}"


def _start_chart_pods(pods: ChartPods, driver_state: Path, kubelet_root: Path) -> tuple[Path, Path]:
    """The node pod (keeper, engine, plugin), then the controller pod (driver, then its sidecars); the two CSI
    sockets. First the node pod's layout as the API server holds it: host processes share the host's mount
    namespace, so a container that mounts without the kubelet dir would pass here and fail as a real pod."""
    spec = pods._workload("daemonset", NODE_POD)["spec"]["template"]["spec"]
    problems = node_layout.layout_problems(spec, str(kubelet_root), str(driver_state))
    assert not problems, f"the chart's node pod cannot give Pods their volumes: {problems}"
    node = pods.load("daemonset", NODE_POD)
    ctl = pods.load("deployment", CONTROLLER_POD)
    node_sock = pods.volumes[NODE_POD]["socket-dir"] / "csi.sock"
    sock = pods.volumes[CONTROLLER_POD]["socket-dir"] / "csi.sock"
    ready = {f"{NODE_POD}/fuse-keeper": lambda: (driver_state / "fuse-keeper.sock").exists(),
             f"{NODE_POD}/engine": lambda: (driver_state / "engine.sock").exists(),
             f"{NODE_POD}/csi-flashcopy": lambda: probe_ready(node_sock),
             # Probe is ready once the controller has found the node's engine through its Lease
             f"{CONTROLLER_POD}/csi-flashcopy": lambda: probe_ready(sock)}
    assert set(ready) <= set(node + ctl), f"the chart's pods changed: {node + ctl}"
    for names in (node, ctl):  # as the kubelet does: a pod's containers all start, then become ready
        for name in names:
            pods.containers[name].start()
        for name in names:
            _wait_ready(pods, name, ready.get(name, lambda: True))
    return sock, node_sock


def mounts_under(*roots: Path) -> list[str]:
    """Mount points (from /proc/self/mountinfo) at or below any of roots, with their fs type."""
    out = []
    rs = [str(r.resolve()) for r in roots]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        mp = parts[4].encode().decode("unicode_escape")
        fstype = parts[parts.index("-") + 1]
        if any(mp == r or mp.startswith(r + "/") for r in rs):
            out.append(f"{mp} ({fstype})")
    return out


def loops_on(state: Path) -> list[str]:
    r = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True, check=True)
    loops = json.loads(r.stdout or '{"loopdevices": []}')["loopdevices"]
    s = str(state.resolve())
    return [f"{lo['name']} -> {lo['back-file']}" for lo in loops if (lo.get("back-file") or "").startswith(s)]


@contextlib.contextmanager
def running_node() -> Iterator[Env]:
    # short paths: the kubelet's registration socket lives deep under $STATE (sun_path is 108 bytes)
    base = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))
    state, driver_state = base / "k8s", base / "fc"  # the driver's state (its FUSE export) outside what WIPE removes
    state.mkdir()
    node_state = state / "node"
    kubelet_root = node_state / "kubelet"
    keep = bool(os.environ.get("KUBELET_KEEP_STATE"))
    pods: ChartPods | None = None
    try:
        with running_peer(state, "", wipe=not keep) as c:
            _install_chart(c, kubelet_root, driver_state)
            kubelet_port = _free_port()
            env = dict(c.env, KUBELET_PORT=str(kubelet_port), KUBELET_HEALTHZ_PORT=str(_free_port()),
                       SCHEDULER_PORT=str(_free_port()), NODE_KCM_PORT=str(_free_port()), NODE_NAME=NODE_NAME)
            try:
                _run(["bash", str(NODE_UP)], env, "node-up.sh")
                pods = ChartPods(c, base)
                try:
                    sock, node_sock = _start_chart_pods(pods, driver_state, kubelet_root)
                except BaseException:
                    print(pods.logs())
                    raise
                e = Env(c, pods, sock, node_sock, driver_state, node_state, kubelet_root, kubelet_port)
                _run(["bash", str(NODE_REGISTRAR), DRIVER_NAME, str(node_sock)], env, "node-registrar.sh")
                c.kubectl("create", "namespace", NS)
                wait_for(lambda: c.kubectl("-n", NS, "get", "serviceaccount", "default", check=False).returncode == 0,
                         timeout=60, what="ServiceAccount default in the test namespace", interval=0.2)
                yield e
            finally:
                down = subprocess.run(["bash", str(NODE_DOWN)], env=dict(env, WIPE="" if keep else "1"),
                                      capture_output=True, text=True, timeout=300)
                left = mounts_under(node_state) if node_state.exists() else []
                if pods is not None:  # before the control plane goes (and again below if node-down.sh raised)
                    pods.stop_all()
                assert down.returncode == 0 and not left, \
                    f"node-down.sh ({down.returncode}):\n{down.stdout}\n{down.stderr}\nleft mounted: {left}"
    finally:
        if pods is not None:
            pods.stop_all()
        _kill_by_state(driver_state)
        if not keep and not mounts_under(driver_state):
            shutil.rmtree(base, ignore_errors=True)
