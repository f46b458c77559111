"""The real-kubelet environment for tests/kubelet: the driver on the host, the control plane of ../shared/peers/k8s
(through tests.k8s.test_k8s_flow.running_peer) and the node of ../shared/peers/k8s-node, brought up in the
README's order and torn down in reverse (node-down.sh, the control plane's down.sh, then the driver), even when
bringing it up fails half way."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csi_driver import DRIVER_NAME
from tests.k8s.test_k8s_flow import Cluster, Proc, _free_port, running_peer
from tests.k8s.test_k8s_flow import _why_skip as _control_plane_why_skip
from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for, wait_process_exit

PEER_NODE = pm.REPO.parent / "shared" / "peers" / "k8s-node"
NODE_UP, NODE_DOWN, NODE_REGISTRAR = (PEER_NODE / f"node-{s}.sh" for s in ("up", "down", "registrar"))
NODE_NAME = "localhost"  # the peer's node name; the driver's node id must be the same
IMAGE = "registry.k8s.io/e2e-test-images/busybox:1.36.1-1"
NS = "kubelet-test"
CNI_BIN = Path("/usr/lib/cni")


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


@dataclass
class Env:
    cluster: Cluster
    driver: Proc
    sock: Path
    driver_state: Path
    node_state: Path
    kubelet_root: Path
    kubelet_port: int

    def kubelet_summary(self) -> dict[str, Any] | None:
        """The kubelet's /stats/summary, straight from its (loopback, anonymous) port: the API server's node
        proxy refuses loopback addresses ("address not allowed")."""
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.kubelet_port}/stats/summary", context=ctx,
                                        timeout=10) as r:
                return dict(json.load(r))
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
        out.append("--- csi-flashcopy:\n" + "\n".join(self.driver.text().splitlines()[-30:]))
        return "\n".join(out)


def _run(argv: list[str], env: dict[str, str], what: str, timeout: float = 240) -> str:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=pm.REPO)
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _start_driver(base: Path, sock: Path, state: Path) -> Proc:
    """`csi-flashcopy serve` as on the chart's single-node plugin container (--mode=all, --driver-name, --node-id,
    --state-dir; the engine process the server starts itself, as --engine auto does on a node), with host paths.
    No --namespace/--operations: there is no API server yet when it starts and the pod's in-cluster config does
    not exist on the host."""
    argv = [sys.executable, "-m", "csi_driver", "serve", "--mode=all", f"--endpoint=unix://{sock}",
            f"--driver-name={DRIVER_NAME}",
            f"--node-id={NODE_NAME}", f"--state-dir={state}", "--engine=auto", "--operations=off",
            "--log-level=info"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSI_") and k != "KUBECONFIG"}
    env["PYTHONPATH"] = str(pm.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = base / "csi-flashcopy.log"
    with open(log, "ab") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=pm.REPO, start_new_session=True)
    proc = Proc("csi-flashcopy", p, log)

    def listening() -> bool:
        if p.poll() is not None:
            raise AssertionError(f"csi-flashcopy serve exited {p.returncode}:\n{proc.text()}")
        return sock.exists()

    wait_for(listening, timeout=60, what="csi-flashcopy socket", interval=0.2, why=proc.text)
    return proc


def _stop_driver(proc: Proc, state: Path) -> None:
    proc.stop()
    # the engine process (and a FUSE keeper) it started carry the state dir on their command line
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if str(state).encode() in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGTERM)
                with contextlib.suppress(AssertionError):
                    wait_process_exit(int(d.name), timeout=10)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(d.name), signal.SIGKILL)


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
    sock = state / "csi.sock"
    node_state = state / "node"
    kubelet_root = node_state / "kubelet"
    keep = bool(os.environ.get("KUBELET_KEEP_STATE"))
    driver = _start_driver(base, sock, driver_state)
    try:
        with running_peer(state, "provisioner snapshotter resizer", wipe=not keep) as c:
            kubelet_port = _free_port()
            env = dict(c.env, KUBELET_PORT=str(kubelet_port), KUBELET_HEALTHZ_PORT=str(_free_port()),
                       SCHEDULER_PORT=str(_free_port()), NODE_KCM_PORT=str(_free_port()), NODE_NAME=NODE_NAME)
            e = Env(c, driver, sock, driver_state, node_state, kubelet_root, kubelet_port)
            try:
                _run(["bash", str(NODE_UP)], env, "node-up.sh")
                _run(["bash", str(NODE_REGISTRAR), DRIVER_NAME, str(sock)], env, "node-registrar.sh")
                c.kubectl("apply", "-k", str(pm.REPO / "deploy/kubernetes/common"))
                # the CSIDriver object is not in common/ (only classes and CRDs): without it the kubelet assumes
                # attachRequired and waits for a VolumeAttachment nobody makes
                c.kubectl("apply", "-f", str(pm.REPO / "deploy/kubernetes/single-node/csidriver.yaml"))
                c.kubectl("create", "namespace", NS)
                wait_for(lambda: c.kubectl("-n", NS, "get", "serviceaccount", "default", check=False).returncode == 0,
                         timeout=60, what="ServiceAccount default in the test namespace", interval=0.2)
                yield e
            finally:
                down = subprocess.run(["bash", str(NODE_DOWN)], env=dict(env, WIPE="" if keep else "1"),
                                      capture_output=True, text=True, timeout=300)
                left = mounts_under(node_state) if node_state.exists() else []
                assert down.returncode == 0 and not left, \
                    f"node-down.sh ({down.returncode}):\n{down.stdout}\n{down.stderr}\nleft mounted: {left}"
    finally:
        _stop_driver(driver, driver_state)
        if not keep and not mounts_under(driver_state):
            shutil.rmtree(base, ignore_errors=True)
