"""Changed-block tracking through the real sidecar and its client: ../shared/peers/snapshot-metadata
(csi-snapshot-metadata v1.1.0 and snapshot-metadata-lister, built from kubernetes-csi/external-snapshot-metadata)
against the real control plane of ../shared/peers/k8s and the driver with its node data path.

What a backup tool does: the lister resolves a VolumeSnapshot to our driver's SnapshotMetadataService, gets an
audience-scoped token for its ServiceAccount, dials the sidecar over TLS; the sidecar authenticates it
(TokenReview, SubjectAccessReview) and streams GetMetadataAllocated / GetMetadataDelta from our CSI socket.
"""

from __future__ import annotations

import base64
import json
import lzma
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_driver.datapath import datapath_unavailable
from tests.k8s.objects import SNAP, KubeObjects
from tests.k8s.staging import StagedBlock
from tests.k8s.test_k8s_flow import DRIVER, NODE, SKIP, Cluster, _free_port, running_peer
from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for

PEER = pm.REPO.parent / "shared" / "peers" / "snapshot-metadata"


def _why_skip() -> str | None:
    if SKIP is not None:
        return SKIP
    if not (PEER / "bin" / "csi-snapshot-metadata.xz").exists():
        return f"snapshot-metadata peer absent ({PEER}): see ../shared/peers/snapshot-metadata/README.md"
    if shutil.which("openssl") is None:
        return "openssl not on PATH (apt-get install openssl)"
    why = datapath_unavailable()
    return f"needs the node data path (root, FUSE, loop): {why}" if why else None


_SKIP = _why_skip()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

NS = "backup"
GRAIN = 256 * 1024
BLOCK = 4096
AUDIENCE = "flashcopy-smd-test"


def _bin(root: Path, name: str) -> Path:
    out = root / name
    if not out.exists():
        out.write_bytes(lzma.decompress((PEER / "bin" / f"{name}.xz").read_bytes()))
        out.chmod(0o755)
    return out


def _certs(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)

    def run(*a: str) -> None:
        subprocess.run(list(a), cwd=d, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key", "-out",
        "ca.crt", "-subj", "/CN=smd-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj",
        "/CN=csi-snapshot-metadata")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "tls.crt")


class Env(KubeObjects):
    def __init__(self, peer: Cluster, state: Path, api: Any, lister: Path) -> None:
        super().__init__(peer, api, NS)
        self.state, self.lister = state, lister

    def list_blocks(self, snapshot: str, base: str | None = None) -> tuple[subprocess.CompletedProcess[str],
                                                                             list[tuple[int, int]]]:
        argv = [str(self.lister), "--kubeconfig", str(self.peer.kubeconfig), "-n", NS, "-s", snapshot,
                "--service-account", "backup-client", "--service-account-namespace", NS, "-o", "json"]
        if base:
            argv += ["-p", base]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        return r, _ranges(r.stdout)


def _ranges(text: str) -> list[tuple[int, int]]:
    """(offset, length) of every block in the lister's JSON: a list of the stream's messages, as protobuf JSON
    (a zero byte_offset is left out)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("["):
            continue
        for msg in json.loads(line):
            out += [(int(b.get("byte_offset", 0)), int(b["size_bytes"])) for b in msg.get("block_metadata", [])]
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from kubernetes import config, dynamic

    root = tmp_path_factory.mktemp("k8s-smd")
    state = root / "state"
    with running_peer(root / "peer", "provisioner snapshotter") as peer:
        api = dynamic.DynamicClient(config.new_client_from_config(config_file=str(peer.kubeconfig)))
        for d in ("crd", "rbac"):
            peer.kubectl("apply", "-f", str(PEER / d))
        peer.kubectl("apply", "-f", str(PEER / "examples" / "backup-client.yaml"))
        peer.kubectl("wait", "--for", "condition=Established", "--timeout=60s",
                     "crd/snapshotmetadataservices.cbt.storage.k8s.io")
        sock = peer.state / "csi.sock"
        argv = [sys.executable, "-m", "csi_driver", "serve", f"--endpoint=unix://{sock}", f"--state-dir={state}",
                f"--node-id={NODE}", "--engine=auto", "--mode=all", "--operations=off"]
        penv = {k: v for k, v in peer.env.items() if not k.startswith("CSI_")}
        penv["PYTHONPATH"] = str(pm.REPO) + os.pathsep + penv.get("PYTHONPATH", "")
        driver = peer.start("csi-flashcopy", argv, penv)
        e = Env(peer, state, api, _bin(root, "snapshot-metadata-lister"))
        wait_for(lambda: (state / "engine.sock").exists(), timeout=60, what="node engine", why=driver.text)
        e.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE,
                                                                  "labels": {f"topology.{DRIVER}/node": NODE}}}, None)
        e.create({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": NODE},
                  "spec": {"drivers": [{"name": DRIVER, "nodeID": NODE,
                                        "topologyKeys": [f"topology.{DRIVER}/node"]}]}}, None)
        e.create({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fc-smd"},
                  "provisioner": DRIVER, "volumeBindingMode": "Immediate"}, None)
        e.create({"apiVersion": SNAP, "kind": "VolumeSnapshotClass", "metadata": {"name": "flashcopy",
                  "annotations": {"snapshot.storage.kubernetes.io/is-default-class": "true"}},
                  "driver": DRIVER, "deletionPolicy": "Delete"}, None)
        tls = root / "tls"
        _certs(tls)
        port, http = _free_port(), _free_port()
        e.create({"apiVersion": "cbt.storage.k8s.io/v1beta1", "kind": "SnapshotMetadataService",
                  "metadata": {"name": DRIVER},
                  "spec": {"address": f"127.0.0.1:{port}", "audience": AUDIENCE,
                           "caCert": base64.b64encode((tls / "ca.crt").read_bytes()).decode()}}, None)
        sidecar = peer.start("csi-snapshot-metadata", [
            str(_bin(root, "csi-snapshot-metadata")), "--kubeconfig", str(peer.kubeconfig),
            "--csi-address", f"unix://{sock}", "--tls-cert", str(tls / "tls.crt"), "--tls-key", str(tls / "tls.key"),
            "--port", str(port), "--http-endpoint", f"127.0.0.1:{http}", "--v", "4"])

        def healthy() -> bool:
            assert sidecar.popen.poll() is None, sidecar.text()
            r = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{http}/health"], capture_output=True, text=True)
            return r.returncode == 0
        wait_for(healthy, timeout=60, what="csi-snapshot-metadata healthy (driver validated)", interval=0.5,
                 why=sidecar.text)
        try:
            yield e
        finally:
            sidecar.stop()
            driver.stop()


def _write(env: Env, vid: str, chunks: dict[int, bytes]) -> None:
    d = StagedBlock(f"unix://{env.state / 'engine.sock'}", env.state.parent / "paths" / vid, vid)
    try:
        for off, data in chunks.items():
            d.write(off, data)
    finally:
        d.close()


def _covers(ranges: list[tuple[int, int]], offset: int, length: int) -> bool:
    return any(o <= offset and offset + length <= o + n for o, n in ranges)


def test_allocated_and_changed_blocks_of_real_volume_snapshots_through_the_sidecar(env: Env) -> None:
    vid = env.pvc("data", sc="fc-smd", block=True)
    first = {0: b"a" * BLOCK, 3 * GRAIN + 8 * BLOCK: b"b" * BLOCK, 9 * GRAIN: b"c" * 2 * BLOCK}
    _write(env, vid, first)
    env.snapshot("data-1", "data")
    second = {3 * GRAIN + 8 * BLOCK: b"B" * BLOCK, 20 * GRAIN: b"d" * BLOCK}
    _write(env, vid, second)
    env.snapshot("data-2", "data")

    r, allocated = env.list_blocks("data-1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(_covers(allocated, off, len(data)) for off, data in first.items()), r.stdout
    # nothing never written: every range is within a grain that was
    written = {off // GRAIN for off in first}
    assert {o // GRAIN for o, n in allocated} <= written, r.stdout
    assert all((o + n - 1) // GRAIN in written for o, n in allocated), r.stdout

    r, delta = env.list_blocks("data-2", base="data-1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(_covers(delta, off, len(data)) for off, data in second.items()), r.stdout
    changed = {off // GRAIN for off in second}
    assert {o // GRAIN for o, n in delta} <= changed and all((o + n - 1) // GRAIN in changed for o, n in delta)
    ordered = sorted(delta)
    assert delta == ordered and all(a + n <= b for (a, n), (b, _) in zip(ordered, ordered[1:], strict=False))


def test_the_driver_errors_reach_the_backup_client(env: Env) -> None:
    env.pvc("other", sc="fc-smd", block=True)
    env.snapshot("other-1", "other")
    env.pvc("mine", sc="fc-smd", block=True)
    env.snapshot("mine-1", "mine")
    r, _ = env.list_blocks("mine-1", base="other-1")  # two different volumes
    assert r.returncode != 0 and "InvalidArgument" in (r.stdout + r.stderr), r.stdout + r.stderr
    r, _ = env.list_blocks("other-1", base="other-1")  # not older than the target
    assert r.returncode != 0 and "FailedPrecondition" in (r.stdout + r.stderr), r.stdout + r.stderr

