"""Prometheus metrics (csi_driver.metrics, docs/metrics.md), scraped over HTTP and parsed with prometheus-client's
own parser: a real `serve` (embedded engine; and one without an engine), an engine in this process (copy-on-write,
commits, held writes), the FUSE handlers' counters, and a real `csi-flashcopy engine` process with staged volumes
(needs root, /dev/fuse and loop devices: skipped otherwise, with the reason)."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import subprocess
import sys
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.datapath import fuse_wire
from csi_driver.datapath.fuse_export import FUSE_BUCKETS, FuseExport, Timings
from csi_driver.engine import Engine
from csi_driver.metrics import EngineCollector, RpcMetrics, new_registry, serve_metrics
from csi_driver.proto_gen import csi_pb2
from tests.csi.conftest import REPO, CsiServer, MiB, mount_cap, rpc_code, server_factory  # noqa: F401 - fixture
from tests.datapath.conftest import KERNEL_SKIP, leftovers
from tests.datapath.fuse_requests import Client, MemTarget
from tests.waiting import wait_for

KiB = 1 << 10
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Every sample of /metrics as {(name, sorted labels): value}, and each family's type."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: Samples = {}
    types_: dict[str, str] = {}
    for fam in text_string_to_metric_families(body):
        types_[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types_


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


def http_status(port: int, path: str) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def check_histogram(samples: Samples, name: str, **labels: str) -> float:
    """Buckets cumulative and ending in +Inf == _count; returns _count."""
    count = value(samples, f"{name}_count", **labels)
    buckets = sorted((float(dict(lb)["le"]), v) for (n, lb), v in samples.items()
                     if n == f"{name}_bucket" and {k: x for k, x in lb if k != "le"} == labels)
    assert buckets and buckets[-1][0] == float("inf") and buckets[-1][1] == count
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    return count


# ------------------------------------------------------------------------------------------ serve (subprocess)


def test_serve_counts_csi_calls_and_shows_its_engine(server_factory) -> None:  # noqa: F811 - the fixture
    port = free_port()
    srv = server_factory("metrics", extra=("--metrics-address", f"127.0.0.1:{port}")).start()
    vol = srv.create_volume("m-src", 64 * MiB, parameters={"grainSize": "64Ki"})
    snap = srv.create_snapshot("m-snap", vol.volume_id, parameters={"copyRate": "0"})
    samples, _ = scrape(port)
    assert value(samples, "flashcopy_mappings", state="copying") == 1  # a no-copy snapshot: copying at rate 0
    assert value(samples, "flashcopy_mappings", state="stopped") == 0
    clone = srv.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="m-clone", volume_capabilities=[mount_cap()], parameters={"copyRate": "0"},
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))), timeout=30).volume
    assert clone.volume_id
    assert rpc_code(srv.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        name="m-missing", source_volume_id=vol.volume_id + "x")) == grpc.StatusCode.NOT_FOUND

    samples, kinds = scrape(port)
    rpc = "flashcopy_csi_rpc_duration_seconds"
    assert kinds[rpc] == "histogram"
    assert check_histogram(samples, rpc, method="CreateVolume", code="OK") == 2
    assert check_histogram(samples, rpc, method="CreateSnapshot", code="OK") == 1
    assert check_histogram(samples, rpc, method="CreateSnapshot", code="NOT_FOUND") == 1
    assert value(samples, f"{rpc}_sum", method="CreateVolume", code="OK") > 0
    # the engine runs in this serve: its gauges are here
    assert value(samples, "flashcopy_volumes", hidden="false") == 3
    assert value(samples, "flashcopy_mappings", state="copying") == 2
    assert sum(v for (n, _), v in samples.items() if n == "flashcopy_mappings") == 2
    # the clone (and the no-copy snapshot) copy nothing at rate 0: everything is still to copy, paused
    assert value(samples, "flashcopy_copy_bytes_remaining", paused="true") == 2 * 64 * MiB
    assert value(samples, "flashcopy_copy_bytes_remaining", paused="false") == 0
    assert value(samples, "flashcopy_clean_bytes_remaining") == 0
    assert kinds["flashcopy_cow_grains"] == "counter" and value(samples, "flashcopy_cow_grains_total") == 0
    assert check_histogram(samples, "flashcopy_metadata_commit_seconds") >= 3  # a commit per create at least
    assert value(samples, "flashcopy_build_info", component="serve", version=value_label(samples, "version")) == 1
    assert http_status(port, "/healthz") == 200 and http_status(port, "/nope") == 404


def value_label(samples: Samples, key: str) -> str:
    (lb,) = [dict(lb) for n, lb in samples if n == "flashcopy_build_info"]
    return lb[key]


def test_serve_without_an_engine_shows_only_its_calls(server_factory) -> None:  # noqa: F811
    port = free_port()
    srv = server_factory("nometrics", extra=(
        "--metrics-address", f"127.0.0.1:{port}", "--engine", "process",
        "--engine-endpoint", "unix:///nonexistent/engine.sock")).start(wait_ready=False)
    wait_for(lambda: http_status(port, "/healthz") == 503, timeout=20, what="the metrics endpoint")
    assert not srv.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
    samples, _ = scrape(port)
    assert check_histogram(samples, "flashcopy_csi_rpc_duration_seconds", method="Probe", code="OK") == 1
    assert not {n for n in names(samples) if n.startswith("flashcopy_")} - {
        n for n in names(samples) if n.startswith(("flashcopy_csi_rpc_duration_seconds", "flashcopy_build_info"))}


def test_serve_refuses_a_metrics_port_in_use(server_factory) -> None:  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = server_factory("busy", extra=("--metrics-address", f"127.0.0.1:{port}"))
        proc = subprocess.run(srv.argv(), cwd=REPO, capture_output=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert proc.returncode == 1 and b"cannot serve metrics" in proc.stderr
    assert not srv.sock.exists()


# ------------------------------------------------------------------------------------- an engine in this process


@pytest.fixture
def engine_metrics(tmp_path: Path) -> Iterator[tuple[Engine, int]]:
    engine = Engine.open(str(tmp_path / "state"), background=False, commit_interval=3600)
    registry = new_registry("test")
    EngineCollector(registry).attach(engine)
    port = free_port()
    httpd = serve_metrics(f"127.0.0.1:{port}", registry, lambda: True)
    yield engine, port
    httpd.shutdown()
    engine.close()


def test_copy_on_write_commits_and_held_writes(engine_metrics: tuple[Engine, int]) -> None:
    engine, port = engine_metrics
    grain = 64 * KiB
    v = engine.create_volume("v", 4 * grain, grain_size=grain)
    engine.write(v.id, 0, b"a" * grain)
    engine.write(v.id, grain, b"b" * grain)
    engine.flush()
    commits0 = check_histogram(scrape(port)[0], "flashcopy_metadata_commit_seconds")
    snap, _ = engine.snapshot(v.id, "s")
    samples, _ = scrape(port)
    assert value(samples, "flashcopy_cow_grains_total") == 0
    assert check_histogram(samples, "flashcopy_metadata_commit_seconds") > commits0  # the snapshot's commit

    engine.write(v.id, 100, b"x" * 10)  # over a grain the snapshot shares: its old data is copied down first
    samples, _ = scrape(port)
    assert value(samples, "flashcopy_cow_grains_total") == 1
    assert value(samples, "flashcopy_cow_bytes_total") == grain
    # the new data waits in memory until the bit vouching for the copy is committed (I5)
    assert value(samples, "flashcopy_held_write_bytes") == grain
    engine.write(v.id, 200, b"y" * 10)  # the snapshot owns grain 0 now: no second copy
    engine.write(v.id, grain, b"z")  # grain 1: one more
    assert value(scrape(port)[0], "flashcopy_cow_grains_total") == 2
    commits1 = check_histogram(scrape(port)[0], "flashcopy_metadata_commit_seconds")
    engine.flush()
    samples, _ = scrape(port)
    assert value(samples, "flashcopy_held_write_bytes") == 0
    assert check_histogram(samples, "flashcopy_metadata_commit_seconds") == commits1 + 1
    engine.flush()  # nothing to commit: not counted
    assert check_histogram(scrape(port)[0], "flashcopy_metadata_commit_seconds") == commits1 + 1
    assert engine.read(snap.id, 0, 3) == b"aaa" and engine.read(v.id, 100, 3) == b"xxx"
    assert value(samples, "flashcopy_volumes", hidden="false") == 2
    assert value(samples, "flashcopy_mappings", state="copying") == 1


def test_fuse_requests_are_counted_and_timed(tmp_path: Path) -> None:
    export = FuseExport(str(tmp_path / "mnt"))  # never mounted: the handler gets the requests directly
    export.add("rw", MemTarget(MiB))
    export.add("ro", MemTarget(MiB), read_only=True)
    c = Client(export.handler)
    c.init()
    rw, ro = c.lookup("rw"), c.lookup("ro")
    assert c.open(rw, os.O_RDWR)[0] == 0 and c.open(ro, os.O_RDONLY)[0] == 0
    for i in range(5):
        assert c.write(rw, i * 4096, b"w" * 4096) == (0, fuse_wire.WRITE_OUT.pack(4096, 0))
    assert c.read(rw, 0, 8192) == (0, b"w" * 8192)
    assert c.fsync(rw)[0] == 0
    assert c.fallocate(rw, 0, 4096, 0x02 | 0x01)[0] == 0
    assert c.write(ro, 0, b"x")[0] == errno.EROFS
    dp = types.SimpleNamespace(export=export, freeze_timings=Timings((0.1, 1.0), ("freeze",)))
    dp.freeze_timings.observe("freeze", 0.05)
    dp.freeze_timings.observe("freeze", 0.5)

    engine = Engine.open(str(tmp_path / "state"), background=False)
    registry = new_registry("test")
    EngineCollector(registry).attach(engine, datapath=lambda: dp)
    port = free_port()
    httpd = serve_metrics(f"127.0.0.1:{port}", registry, lambda: True)
    try:
        samples, kinds = scrape(port)
    finally:
        httpd.shutdown()
        engine.close()
    assert value(samples, "flashcopy_fuse_requests_total", op="write") == 6
    assert value(samples, "flashcopy_fuse_request_errors_total", op="write") == 1
    assert value(samples, "flashcopy_fuse_bytes_total", op="write") == 5 * 4096
    assert value(samples, "flashcopy_fuse_requests_total", op="read") == 1
    assert value(samples, "flashcopy_fuse_bytes_total", op="read") == 8192
    assert value(samples, "flashcopy_fuse_requests_total", op="fsync") == 1
    assert value(samples, "flashcopy_fuse_bytes_total", op="fallocate") == 4096
    assert kinds["flashcopy_fuse_request_seconds"] == "histogram"
    assert check_histogram(samples, "flashcopy_fuse_request_seconds", op="write") == 6
    assert {dict(lb)["le"] for n, lb in samples if n == "flashcopy_fuse_request_seconds_bucket"} == \
        {repr(b) for b in FUSE_BUCKETS} | {"+Inf"}
    assert check_histogram(samples, "flashcopy_freeze_seconds") == 2
    assert value(samples, "flashcopy_freeze_seconds_bucket", le="0.1") == 1
    assert value(samples, "flashcopy_freeze_seconds_sum") == pytest.approx(0.55)


def test_rpc_metrics_in_one_process_do_not_collide() -> None:
    a, b = new_registry("a"), new_registry("b")
    ra = RpcMetrics(a, "flashcopy_csi_rpc_duration_seconds", "x")
    RpcMetrics(b, "flashcopy_csi_rpc_duration_seconds", "x")  # the global registry would refuse a second one
    ra.observe("Probe", "OK", 0.002)
    assert a.get_sample_value("flashcopy_csi_rpc_duration_seconds_count", {"method": "Probe", "code": "OK"}) == 1
    assert b.get_sample_value("flashcopy_csi_rpc_duration_seconds_count", {"method": "Probe", "code": "OK"}) is None


# ------------------------------------------------------------------------------ the node engine process (root)


needs_kernel = pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")


@needs_kernel
def test_engine_process_metrics(tmp_path_factory: pytest.TempPathFactory) -> None:
    from csi_driver.remote.client import RemoteBackend

    root = Path(tmp_path_factory.mktemp("engm"))
    state = root / "state"
    state.mkdir()
    endpoint = f"unix://{state}/engine.sock"
    port = free_port()
    with open(root / "engine.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "csi_driver", "engine", "--state-dir", str(state),
                                 "--endpoint", endpoint, "--metrics-address", f"127.0.0.1:{port}"],
                                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=out,
                                stderr=subprocess.STDOUT)
    b = RemoteBackend(endpoint)
    blk_stg, blk_dev, fs_stg = f"{root}/stg/blk", f"{root}/pod/blk", f"{root}/stg/fs"
    blk = fs = None
    try:
        def up() -> bool:
            assert proc.poll() is None, (root / "engine.log").read_text()
            return b.is_ready() and http_status(port, "/healthz") == 200

        wait_for(up, timeout=60, what="the engine and its metrics", ignore=(OSError,))
        grain = 64 * KiB
        blk = b.create_volume("blk", 16 * MiB, grain_size=grain, attrs={})
        fs = b.create_volume("fs", 64 * MiB, grain_size=grain, attrs={})
        snap = b.snapshot(blk.id, "blk-snap", copy_rate=0, attrs={})
        b.clone(snap.id, "blk-clone", size=16 * MiB, copy_rate=0, clean_rate=0, attrs={})
        with pytest.raises(Exception):  # noqa: B017 - any engine error: NotFound here
            b.get_volume("vol-missing")
        b.node_stage(blk.id, blk_stg, block=True, fs_type="", mount_flags=[], read_only=False)
        b.node_publish(blk.id, blk_stg, blk_dev, block=True, read_only=False, mount_flags=[])
        buf = mmap.mmap(-1, 4 * grain)  # page aligned, for O_DIRECT
        buf.write(os.urandom(4 * grain))
        fd = os.open(blk_dev, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwritev(fd, [buf], 0)  # 4 grains the snapshot shares: each copied down first
            os.fsync(fd)
            assert os.preadv(fd, [mmap.mmap(-1, grain)], 0) == grain
        finally:
            os.close(fd)
        b.node_stage(fs.id, fs_stg, block=False, fs_type="ext4", mount_flags=[], read_only=False)
        Path(fs_stg, "f").write_bytes(b"data" * 1024)
        b.snapshot(fs.id, "fs-snap", copy_rate=0, attrs={})  # the staged ext4 is frozen for the start

        samples, _ = scrape(port)
        rpc = "flashcopy_engine_rpc_duration_seconds"
        assert check_histogram(samples, rpc, method="CreateVolume", code="OK") == 2
        assert check_histogram(samples, rpc, method="Snapshot", code="OK") == 2
        assert check_histogram(samples, rpc, method="Clone", code="OK") == 1
        assert check_histogram(samples, rpc, method="GetVolume", code="NOT_FOUND") == 1
        assert check_histogram(samples, rpc, method="NodeStage", code="OK") == 2
        assert value(samples, "flashcopy_build_info", component="engine", version=value_label(samples, "version"))
        assert value(samples, "flashcopy_volumes", hidden="false") == 5
        assert value(samples, "flashcopy_mappings", state="copying") == 3
        assert value(samples, "flashcopy_copy_bytes_remaining", paused="true") > 0
        assert value(samples, "flashcopy_cow_grains_total") >= 4
        assert value(samples, "flashcopy_fuse_requests_total", op="write") >= 1
        assert value(samples, "flashcopy_fuse_bytes_total", op="write") >= 4 * grain
        assert value(samples, "flashcopy_fuse_requests_total", op="read") >= 1
        assert value(samples, "flashcopy_fuse_request_errors_total", op="write") == 0
        assert check_histogram(samples, "flashcopy_fuse_request_seconds", op="write") >= 1
        assert check_histogram(samples, "flashcopy_freeze_seconds") == 1
        assert 0 < value(samples, "flashcopy_freeze_seconds_sum") < 10
        assert check_histogram(samples, "flashcopy_metadata_commit_seconds") > 0
    finally:
        for vol, stg in ((blk, blk_stg), (fs, fs_stg)):
            if vol is not None:
                if vol is blk:
                    b.node_unpublish(vol.id, blk_dev)
                b.node_unstage(vol.id, stg)
        b.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (root / "engine.log").read_text()[-3000:]
    assert leftovers(str(root)) == []
