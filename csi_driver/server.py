"""Process wiring for `csi-flashcopy serve`: endpoint, gRPC server, services per --mode, signals, metrics.

Start-up order: bind the socket (0600, a stale one replaced) and start serving at once, so the sidecars and
the liveness probe can connect; then open the Backend (retrying while another process still holds the state
dir, e.g. the previous pod during a rolling update). Probe says ready only once the Backend is open.
SIGTERM/SIGINT: stop accepting, let in-flight calls finish (grace period), flush and close the engine, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import signal
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from csi_driver import __version__
from csi_driver.csi.backend import Backend, check_engine_mode, make_backend
from csi_driver.csi.controller import ControllerServicer
from csi_driver.csi.driver import BackendSlot, Driver
from csi_driver.csi.group_controller import GroupControllerServicer
from csi_driver.csi.identity import IdentityServicer
from csi_driver.csi.logs import configure_logging
from csi_driver.csi.node import NodeServicer
from csi_driver.csi.rpc import Metrics, RpcInterceptor
from csi_driver.csi.settings import Settings
from csi_driver.engine import errors as engine_errors
from csi_driver.proto_gen import csi_pb2_grpc

log = logging.getLogger("csi_flashcopy.server")

GRACE_SECONDS = 30.0
MAX_WORKERS = 16


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """("unix", "/path/csi.sock") or ("tcp", "host:port")."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    elif endpoint.startswith("tcp://"):
        addr = endpoint[len("tcp://"):]
        if not addr or ":" not in addr:
            raise ValueError(f"tcp endpoint needs host:port: {endpoint!r}")
        return "tcp", addr
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise ValueError(f"unsupported endpoint {endpoint!r} (expected unix:///path or tcp://host:port)")
    if not path:
        raise ValueError(f"empty socket path in {endpoint!r}")
    return "unix", os.path.abspath(path)


def prepare_socket_path(path: str) -> None:
    """Make the parent directory; replace a stale socket; refuse to steal a live one or clobber a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale from a previous run
        log.info("removed stale socket", extra={"fields": {"path": path}})
        return
    finally:
        probe.close()
    raise RuntimeError(f"another server is listening on {path}")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        driver_name=args.driver_name,
        vendor_version=__version__,
        node_id=args.node_id,
        mode=args.mode,
        max_volumes_per_node=max(0, int(getattr(args, "max_volumes_per_node", 0) or 0)),
    )


def build_server(driver: Driver, metrics: Metrics | None = None, max_workers: int = MAX_WORKERS) -> grpc.Server:
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
    if s.serves_node:
        csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(driver), server)
    return server


def bind(server: grpc.Server, endpoint: str) -> str | None:
    """Bind the endpoint; returns the unix socket path (None for tcp)."""
    kind, addr = parse_endpoint(endpoint)
    if kind == "tcp":
        if server.add_insecure_port(addr) == 0:
            raise RuntimeError(f"cannot bind {addr}")
        return None
    prepare_socket_path(addr)
    old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
    try:
        if server.add_insecure_port(f"unix:{addr}") == 0:
            raise RuntimeError(f"cannot bind unix socket {addr}")
    finally:
        os.umask(old)
    return addr


def _metrics_server(address: str, metrics: Metrics, slot: BackendSlot) -> http.server.ThreadingHTTPServer:
    host, _, port = address.rpartition(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path not in ("/metrics", "/healthz"):
                self.send_error(404)
                return
            if self.path == "/healthz":
                ok = slot.ready()
                body = b"ok\n" if ok else b"not ready\n"
                self.send_response(200 if ok else 503)
            else:
                body = metrics.render().encode()
                self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
            return

    httpd = http.server.ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd


def _open_backend(args: argparse.Namespace, stop: threading.Event) -> Backend | None:
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
    metrics = Metrics()
    server = build_server(driver, metrics)
    try:
        sock_path = bind(server, args.endpoint)
    except (ValueError, RuntimeError) as e:
        log.error("cannot listen", extra={"fields": {"endpoint": args.endpoint, "error": str(e)}})
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    if sock_path:
        os.chmod(sock_path, 0o600)
    httpd = None
    if getattr(args, "metrics_address", ""):
        httpd = _metrics_server(args.metrics_address, metrics, slot)
    log.info("serving", extra={"fields": {
        "endpoint": args.endpoint, "mode": settings.mode, "driver": settings.driver_name,
        "node_id": settings.node_id, "version": __version__, "state_dir": args.state_dir}})

    code = 0
    try:
        t0 = time.monotonic()
        backend = _open_backend(args, stop)
        if backend is not None:
            slot.set(backend)
            log.info("engine open", extra={"fields": {"state_dir": args.state_dir,
                                                      "seconds": round(time.monotonic() - t0, 3)}})
        while not stop.wait(1.0):
            pass
    except Exception:
        log.exception("engine failed to open")
        code = 1
    log.info("shutting down: draining in-flight calls")
    server.stop(GRACE_SECONDS).wait()
    try:
        slot.close()  # flushes and closes the engine after the last call finished
    except Exception:
        log.exception("engine close failed")
        code = 1
    if httpd is not None:
        httpd.shutdown()
    if sock_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
    log.info("stopped", extra={"fields": {"exit_code": code}})
    return code
