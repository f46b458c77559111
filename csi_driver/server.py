"""Process wiring for `csi-flashcopy serve`: backend choice, endpoint, gRPC server, services per --mode,
signals, metrics. The only module that knows every layer: it picks the Backend (an engine in this process with
its node data path injected, or the node engine process) and hands it to the servicers, which see only
csi_driver.api.

Start-up order: bind the socket (0600, a stale one replaced) and start serving at once, so the sidecars and
the liveness probe can connect; then open the Backend (retrying while another process still holds the state
dir, e.g. the previous pod during a rolling update). Probe says ready only once the Backend is open.
SIGTERM/SIGINT: stop accepting, let in-flight calls finish (grace period), flush and close the engine (or
stop the node engine process this serve started, unless --keep-engine), exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from csi_driver import __version__
from csi_driver.api import StorageBackend
from csi_driver.csi.controller import ControllerServicer
from csi_driver.csi.driver import BackendSlot, Driver
from csi_driver.csi.group_controller import GroupControllerServicer
from csi_driver.csi.identity import IdentityServicer
from csi_driver.csi.node import NodeServicer
from csi_driver.csi.rpc import RpcInterceptor, RpcObserver
from csi_driver.csi.settings import Settings
from csi_driver.csi.snapshot_metadata import SnapshotMetadataServicer
from csi_driver.datapath import DataPath, datapath_unavailable
from csi_driver.embedded import EmbeddedBackend
from csi_driver.engine import errors as engine_errors
from csi_driver.k8s.apiclient import api_client
from csi_driver.k8s.leases import LeaseDirectory
from csi_driver.logs import configure_logging
from csi_driver.metrics import EngineCollector, RpcMetrics, new_registry, serve_metrics
from csi_driver.ops.reconciler import Operations, start_for_serve
from csi_driver.proto_gen import csi_pb2_grpc
from csi_driver.remote.client import RemoteBackend
from csi_driver.remote.cluster import ClusterBackend
from csi_driver.remote.launcher import StartedEngine, ensure_engine
from csi_driver.remote.service import default_endpoint
from csi_driver.remote.tls import TlsFiles
from csi_driver.sockets import bind, parse_endpoint

log = logging.getLogger("csi_flashcopy.server")

GRACE_SECONDS = 30.0
MAX_WORKERS = 16


# ------------------------------------------------------------------------------------------- backend choice


def engine_endpoint(args: argparse.Namespace) -> str:
    """--engine-endpoint, default unix://<state-dir>/engine.sock."""
    return getattr(args, "engine_endpoint", "") or default_endpoint(args.state_dir)


def resolved_engine_mode(args: argparse.Namespace) -> str:
    """"embedded", "process" (use, never start) or "auto" (use, start when none answers)."""
    mode = getattr(args, "engine", "auto")
    if mode != "auto":
        return str(mode)
    if _wants_cluster(args):
        return "cluster"
    if getattr(args, "mode", "all") not in ("all", "node"):
        return "embedded"  # a controller alone has no data path to keep alive
    why = datapath_unavailable()
    if why:
        log.warning("no kernel data path (%s): the engine runs embedded, volumes cannot be staged here", why)
        return "embedded"
    return "auto"


def _wants_cluster(args: argparse.Namespace) -> bool:
    """--engine cluster, or auto for the multi-node controller (--mode controller with --tls-dir)."""
    engine = getattr(args, "engine", "auto")
    return engine == "cluster" or (engine == "auto" and getattr(args, "mode", "all") == "controller"
                                   and bool(getattr(args, "tls_dir", "")))


def check_engine_mode(args: argparse.Namespace) -> None:
    """Refuse, before anything is bound or opened, an engine setting that cannot work."""
    if _wants_cluster(args):
        if getattr(args, "mode", "all") != "controller":
            raise ValueError("--engine cluster is the controller's (--mode controller)")
        TlsFiles.load(getattr(args, "tls_dir", "") or "").check_controller()  # engines serve no other client
        if not getattr(args, "namespace", ""):
            raise ValueError("--engine cluster needs --namespace (where the engines keep their Leases)")
        return
    if getattr(args, "engine_listen", ""):
        TlsFiles.load(getattr(args, "tls_dir", "") or "")  # no TCP listener without TLS
    if getattr(args, "engine", "auto") == "embedded":
        return
    endpoint = engine_endpoint(args)
    if parse_endpoint(endpoint)[0] != "unix":
        raise ValueError(f"--engine-endpoint must be a unix socket (unix:///path), not {endpoint!r}")


def make_backend(args: argparse.Namespace) -> tuple[StorageBackend, StartedEngine | None]:
    """Choose the Backend from `serve` arguments; the second value is a node engine process started here.

    - `--engine embedded`: the engine opened in this process on --state-dir, with the node data path in this
      process too (started at once when serving the node, so staged volumes are re-adopted and a snapshot
      taken before the first Node call is frozen too; lazy where the host has no data path);
    - `--engine process`: a client of the node engine process at --engine-endpoint, which something else
      runs (the chart's engine container). It is never started from here; Probe answers ready and calls
      succeed once it answers, UNAVAILABLE until then;
    - `--engine auto`: with the node service (--mode all|node) and a usable kernel data path, the node
      engine process, started when none answers; otherwise embedded.
    """
    check_engine_mode(args)
    state_dir: str = args.state_dir
    mode = resolved_engine_mode(args)
    if mode == "cluster":
        directory = LeaseDirectory(api_client(getattr(args, "kubeconfig", "") or None), args.namespace).start()
        return ClusterBackend(directory, TlsFiles.load(args.tls_dir)), None
    if mode == "embedded":
        node = getattr(args, "mode", "all") in ("all", "node") and not datapath_unavailable()
        return EmbeddedBackend.open(state_dir, datapath=DataPath, node=node), None
    endpoint = engine_endpoint(args)
    if mode == "process":
        backend = RemoteBackend(endpoint)
        if not backend.is_ready():
            log.warning("the node engine process does not answer yet; not ready until it does",
                        extra={"fields": {"engine_endpoint": endpoint}})
        return backend, None
    # an engine started here serves no metrics of its own: the inherited CSI_METRICS_ADDRESS is serve's port
    return ensure_engine(state_dir, endpoint, extra_args=[*engine_cluster_args(args), "--metrics-address="])


def engine_cluster_args(args: argparse.Namespace) -> list[str]:
    """What the node engine process `serve` starts needs to serve other nodes' controllers."""
    listen = getattr(args, "engine_listen", "")
    if not listen:
        return []
    out = ["--listen", listen, "--tls-dir", args.tls_dir, "--node-id", args.node_id]
    if getattr(args, "namespace", ""):
        out += ["--namespace", args.namespace]
    if getattr(args, "kubeconfig", ""):
        out += ["--kubeconfig", args.kubeconfig]
    return out


# ------------------------------------------------------------------------------------------------- serving


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        driver_name=args.driver_name,
        vendor_version=__version__,
        node_id=args.node_id,
        mode=args.mode,
        max_volumes_per_node=max(0, int(getattr(args, "max_volumes_per_node", 0) or 0)),
    )


def build_server(driver: Driver, metrics: RpcObserver | None = None, max_workers: int = MAX_WORKERS
                 ) -> grpc.Server:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="csi-rpc"),
        interceptors=[RpcInterceptor(metrics)],
        options=[("grpc.so_reuseport", 0)],
    )
    s = driver.settings
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(driver), server)
    if s.serves_controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(driver), server)
        if s.group_controller_rpcs:
            csi_pb2_grpc.add_GroupControllerServicer_to_server(GroupControllerServicer(driver), server)
        if s.snapshot_metadata:
            csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataServicer(driver), server)
    if s.serves_node:
        csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(driver), server)
    return server


def _open_backend(args: argparse.Namespace, stop: threading.Event
                  ) -> tuple[StorageBackend, StartedEngine | None] | None:
    delay = 0.2
    while not stop.is_set():
        try:
            return make_backend(args)
        except engine_errors.EngineLocked as e:
            log.warning("state dir busy, retrying", extra={"fields": {"error": str(e), "retry_s": delay}})
            stop.wait(delay)
            delay = min(delay * 2, 5.0)
    return None


def run_serve(args: argparse.Namespace) -> int:
    configure_logging(getattr(args, "log_format", "text"), getattr(args, "log_level", "info"))
    settings = settings_from_args(args)
    if not settings.node_id:
        log.error("--node-id is empty")
        return 2
    try:
        check_engine_mode(args)
    except ValueError as e:
        log.error("cannot serve", extra={"fields": {"error": str(e)}})
        return 2
    slot = BackendSlot()
    driver = Driver(settings, slot)
    registry = new_registry("serve")
    metrics = RpcMetrics(registry, "flashcopy_csi_rpc_duration_seconds", "CSI calls by method and gRPC code.")
    engine_metrics = EngineCollector(registry)  # shows an engine only if one runs in this process
    httpd = None
    if getattr(args, "metrics_address", ""):
        try:
            httpd = serve_metrics(args.metrics_address, registry, slot.ready)
        except (ValueError, OSError) as e:
            log.error("cannot serve metrics", extra={"fields": {"address": args.metrics_address, "error": str(e)}})
            return 1
    server = build_server(driver, metrics)
    try:
        sock_path = bind(server, args.endpoint)
    except (ValueError, RuntimeError, OSError) as e:
        log.error("cannot listen", extra={"fields": {"endpoint": args.endpoint, "error": str(e)}})
        if httpd is not None:
            httpd.shutdown()
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    if sock_path:
        os.chmod(sock_path, 0o600)
    log.info("serving", extra={"fields": {
        "endpoint": args.endpoint, "mode": settings.mode, "driver": settings.driver_name,
        "node_id": settings.node_id, "version": __version__, "state_dir": args.state_dir}})

    code = 0
    started: StartedEngine | None = None
    operations: Operations | None = None
    try:
        t0 = time.monotonic()
        opened = _open_backend(args, stop)
        if opened is not None:
            backend, started = opened
            if isinstance(backend, EmbeddedBackend):
                engine_metrics.attach(backend.engine, datapath=lambda: getattr(backend, "_datapath", None))
            slot.set(backend)
            operations = start_for_serve(args, backend, driver_name=settings.driver_name,
                                         node_id=settings.node_id)
            log.info("engine open", extra={"fields": {"state_dir": args.state_dir,
                                                      "seconds": round(time.monotonic() - t0, 3)}})
        while not stop.wait(1.0):
            pass
    except Exception:
        log.exception("engine failed to open")
        code = 1
    if operations is not None:
        operations.stop()
    log.info("shutting down: draining in-flight calls")
    server.stop(GRACE_SECONDS).wait()
    try:
        slot.close()  # flushes and closes the engine after the last call finished
    except Exception:
        log.exception("engine close failed")
        code = 1
    if started is not None:
        if getattr(args, "keep_engine", False):
            log.info("leaving the node engine process running (--keep-engine)",
                     extra={"fields": {"pid": started.pid}})
        else:
            log.info("stopping the node engine process this server started", extra={"fields": {"pid": started.pid}})
            if not started.stop():
                code = 1
    if httpd is not None:
        httpd.shutdown()
    if sock_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
    log.info("stopped", extra={"fields": {"exit_code": code}})
    return code
