"""Multi-node benchmarks: the controller reaching node engines over mutual TLS, against the all-in-one path.

    python -m bench.bench_multinode [--dir /var/tmp] [--snapshots 100] [--groups 20] [--json out.json]

Starts three `csi-flashcopy engine` processes (own state dirs, 127.0.0.1 ports, mutual TLS; needs root for
their FUSE exports) and two CSI servers in this process, each on its own unix socket: the multi-node controller
(ClusterBackend over the engines' TCP ports) and the all-in-one node's (RemoteBackend over node-a's unix
socket, which is what `serve --mode all` uses). Measures from the client side of the CSI socket:
- CreateSnapshot p50/p99 of a 64 MiB volume on node-a, through each server (same engine, same volume size);
- a 3-node CreateVolumeGroupSnapshot (one member per node): the call, and the host-write hold each node
  reports (quiesce to release), max over the nodes; and a 3-member group on one node for reference;
- a no-op gRPC round trip (GetPluginInfo) on each socket as the physical floor.
The nodes' Leases are replaced by a fixed directory: discovery is not on the measured path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.bench_csi import pct, timed
from csi_driver import __version__
from csi_driver.csi.driver import BackendSlot, Driver
from csi_driver.csi.settings import Settings
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc
from csi_driver.remote.client import RemoteBackend
from csi_driver.remote.cluster import ClusterBackend
from csi_driver.remote.tls import TlsFiles, write_certificates
from csi_driver.server import build_server
from csi_driver.sockets import bind

MiB = 1 << 20
NODES = ("node-a", "node-b", "node-c")
KEY = "topology.flashcopy.csi.dev/node"


@dataclass(frozen=True)
class Fixed:
    node: str
    address: str
    live: bool = True
    detail: str = ""


class FixedDirectory:
    def __init__(self, endpoints: dict[str, str]) -> None:
        self._eps = {n: Fixed(n, a) for n, a in endpoints.items()}
        self.synced = threading.Event()
        self.synced.set()

    def endpoints(self) -> dict[str, Fixed]:
        return dict(self._eps)

    def stop(self) -> None:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_engine(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    b = RemoteBackend(f"unix://{sock}")
    try:
        for _ in range(600):
            if b.is_ready():
                return
            if proc.poll() is not None:
                raise SystemExit(f"engine exited: see {sock.parent}/engine.log")
            threading.Event().wait(0.1)
        raise SystemExit("engine did not answer")
    finally:
        b.close()


def _serve(backend: object, sock: Path, node_id: str, mode: str) -> grpc.Server:
    settings = Settings(driver_name="flashcopy.csi.dev", vendor_version=__version__, node_id=node_id, mode=mode)
    server = build_server(Driver(settings, BackendSlot(backend)))  # type: ignore[arg-type]
    bind(server, f"unix://{sock}")
    server.start()
    return server


def _volume(ctl: csi_pb2_grpc.ControllerStub, name: str, node: str) -> str:
    cap = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                   access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB))
    req.accessibility_requirements.requisite.add().segments[KEY] = node
    return ctl.CreateVolume(req, timeout=60).volume.volume_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--snapshots", type=int, default=100)
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-multinode-", dir=a.dir))
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[grpc.Server] = []
    try:
        write_certificates(str(root / "tls"), nodes=NODES)  # the controller's and a certificate per node
        tls = TlsFiles.load(str(root / "tls" / "controller"))
        ports = {n: _free_port() for n in NODES}
        for n in NODES:
            state = root / n
            state.mkdir()
            log = open(state / "engine.log", "ab")  # noqa: SIM115 - the process keeps it
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "csi_driver", "engine", "--state-dir", str(state), "--listen",
                 f"127.0.0.1:{ports[n]}", "--tls-dir", str(root / "tls" / "nodes" / n), "--node-id", n],
                stdout=log, stderr=subprocess.STDOUT))
        for n, p in zip(NODES, procs):
            _wait_engine(root / n / "engine.sock", p)
        cluster = ClusterBackend(FixedDirectory({n: f"127.0.0.1:{ports[n]}" for n in NODES}), tls)  # type: ignore[arg-type]
        local = RemoteBackend(f"unix://{root / 'node-a' / 'engine.sock'}", node_id="node-a")
        servers.append(_serve(cluster, root / "controller.sock", "controller", "controller"))
        servers.append(_serve(local, root / "allinone.sock", "node-a", "all"))
        stubs = {}
        for name in ("controller", "allinone"):
            ch = grpc.insecure_channel(f"unix:{root / (name + '.sock')}")
            stubs[name] = (csi_pb2_grpc.ControllerStub(ch), csi_pb2_grpc.GroupControllerStub(ch),
                           csi_pb2_grpc.IdentityStub(ch))
        rows = []
        ctl = stubs["controller"][0]
        src = _volume(ctl, "src-a", "node-a")
        for name, (c, _g, ident) in stubs.items():
            noop = timed(lambda ident=ident: ident.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10), 200)
            counter = iter(range(10**6))
            snaps = timed(lambda c=c, counter=counter, name=name: c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                name=f"{name}-{next(counter)}", source_volume_id=src), timeout=60), a.snapshots)
            rows.append({"path": name, "noop_p50_ms": pct(noop, 50), "snapshot_p50_ms": pct(snaps, 50),
                         "snapshot_p99_ms": pct(snaps, 99)})
        vols = [_volume(ctl, f"g-{n}", n) for n in NODES]
        one_node = [_volume(ctl, f"g1-{i}", "node-a") for i in range(3)]
        grp = stubs["controller"][1]
        holds, calls, local_calls = [], [], []
        for i in range(a.groups):
            calls += timed(lambda i=i: grp.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
                name=f"grp-{i}", source_volume_ids=vols), timeout=60), 1)
            holds.append(cluster.last_group_hold * 1000)
            local_calls += timed(lambda i=i: grp.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
                name=f"grp1-{i}", source_volume_ids=one_node), timeout=60), 1)
        rows.append({"path": "group 3 nodes", "call_p50_ms": pct(calls, 50), "call_p99_ms": pct(calls, 99),
                     "hold_p50_ms": pct(holds, 50), "hold_max_ms": max(holds)})
        rows.append({"path": "group 1 node (3 members)", "call_p50_ms": pct(local_calls, 50),
                     "call_p99_ms": pct(local_calls, 99)})
        c_row, l_row = rows[0], rows[1]
        print("| path | no-op RPC p50 | CreateSnapshot p50 | p99 |")
        print("|---|---|---|---|")
        for r in rows[:2]:
            print(f"| {r['path']} | {r['noop_p50_ms']:.2f} ms | {r['snapshot_p50_ms']:.2f} ms | "
                  f"{r['snapshot_p99_ms']:.2f} ms |")
        ratio = c_row["snapshot_p50_ms"] / l_row["snapshot_p50_ms"]
        print(f"\ncontroller / all-in-one CreateSnapshot p50: {ratio:.2f}x")
        g3, g1 = rows[2], rows[3]
        print(f"3-node group snapshot: call p50 {g3['call_p50_ms']:.1f} ms (p99 {g3['call_p99_ms']:.1f}), host-write "
              f"hold p50 {g3['hold_p50_ms']:.1f} ms, max {g3['hold_max_ms']:.1f} ms over {a.groups} groups; "
              f"one node, 3 members: call p50 {g1['call_p50_ms']:.1f} ms")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        for s in servers:
            s.stop(None)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        shutil.rmtree(root, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
