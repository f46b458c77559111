"""`csi-flashcopy engine`: the node engine process. Owns the engine, the FUSE export and this node's staged
volumes; serves proto/engine.proto on a unix socket to `csi-flashcopy serve` (remote.client.RemoteBackend).

It serves an EmbeddedBackend (csi_driver.embedded) whose node side is this node's DataPath; errors leave
through remote.wire, with the status csi_driver.status.status_for gives them.

Start-up: open the engine (waiting while a previous engine process still holds the state dir), start the
data path (mount the FUSE export, re-adopt the volumes the staging records name), then bind the socket
(0600, a stale one replaced). The socket answering therefore means ready.

Restarts. The CSI server can restart at will: the kernel side (loop devices, mounts) hangs off this process,
so I/O goes on. The FUSE connection of the export is held by a FUSE keeper process too
(csi_driver.datapath.fuse_keeper), so when this process stops (SIGTERM) or dies, the volumes' I/O waits in
the kernel; the next engine process takes the same connection over and the kernel resends what was never
answered: no error reaches the pods. On SIGTERM it stops serving, stops its FUSE loop (requests read are
answered first), flushes and closes the engine. Without a keeper (--fuse-keeper=off, or a kernel
without FUSE resend) I/O on staged volumes fails with EIO instead, nothing acknowledged that the engine did not
take; loop devices and mounts are KEPT (tearing them down would pull filesystems from under running pods), the
next process reports them abnormal, and unstage + stage (kubelet does, when the pod is recreated) builds a
fresh loop device on the new export; the journal replays, and flushed data is all there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from csi_driver import __version__
from csi_driver.datapath import DataPath, privileged
from csi_driver.embedded import EmbeddedBackend
from csi_driver.engine import Engine, errors
from csi_driver.engine.model import path_problem, valid_id, valid_mount_flag
from csi_driver.k8s.apiclient import ApiUnreachable, api_client
from csi_driver.k8s.leases import LeaseKeeper
from csi_driver.logs import configure_logging
from csi_driver.metrics import EngineCollector, RpcMetrics, new_registry, serve_metrics
from csi_driver.proto_gen import engine_pb2 as pb
from csi_driver.proto_gen import engine_pb2_grpc as pb_grpc
from csi_driver.remote import wire
from csi_driver.remote.access import TcpAccess
from csi_driver.remote.decoding import DecodeRequests
from csi_driver.remote.tls import TlsFiles
from csi_driver.remote.wire import copy_msg, extents_msg, report_msg, stats_msg, to_item, volume_msg
from csi_driver.sockets import bind, unix_endpoint, unix_socket_path

log = logging.getLogger("csi_flashcopy.engine")

LOCK_WAIT_SECONDS = 30.0  # a predecessor (rolling restart) may still be flushing
GRACE_SECONDS = 10.0
MAX_WORKERS = 16
WATCHDOG_SECONDS = 5.0  # a prepared group start nobody finishes is aborted after this
MAX_WATCHDOG_SECONDS = 30.0  # bound on what a coordinator may ask: host writes wait that long at most

T = TypeVar("T")


def default_endpoint(state_dir: str) -> str:
    """Where a node's engine API listens unless told otherwise: unix://<state-dir>/engine.sock."""
    return unix_endpoint(os.path.join(os.path.abspath(state_dir), "engine.sock"))


def _opt(msg: Any, name: str) -> str | None:
    return getattr(msg, name) if msg.HasField(name) else None


#: request fields holding object ids (engine.model grammar: ids become file names)
_ID_FIELDS = frozenset({"volume_id", "source_id", "snapshot_id", "base_id", "target_id"})
#: host paths the data path acts at as root (engine.model.path_problem, the CSI layer's grammar too)
_PATH_FIELDS = frozenset({"staging_path", "target_path", "volume_path"})
_COUNT_FIELDS = frozenset({"size", "new_size", "grain_size", "required_bytes", "start", "limit", "watchdog_ms"})
MAX_ATTRS = 32  # the CSI layer writes 10 at most
MAX_ATTR_KEY = 256
MAX_ATTR_VALUE = 4096
MAX_MOUNT_FLAGS = 64
MAX_ITEMS = 1024  # members of one group snapshot


def check_request(msg: Any, where: str = "") -> None:
    """The checks the CSI layer makes, made again for whoever calls the engine API (errors.InvalidArgument naming
    the field): ids, host paths, counts, attrs and mount flags, nested group items included."""
    for fd in msg.DESCRIPTOR.fields:
        name, field = fd.name, f"{where}{fd.name}"
        if fd.has_presence and fd.type != fd.TYPE_MESSAGE and not msg.HasField(name):
            continue  # an optional id left out: the engine picks one
        value = getattr(msg, name)
        if name in _ID_FIELDS and not valid_id(value):
            raise errors.InvalidArgument(f"{field}: malformed id {value[:140]!r}")
        if name in _PATH_FIELDS and (why := path_problem(value)):
            raise errors.InvalidArgument(f"{field}: {why}")
        if name in _COUNT_FIELDS and value < 0:
            raise errors.InvalidArgument(f"{field}: must not be negative, got {value}")
        if name == "attrs":
            _check_attrs(value, field)
        if name == "mount_flags":
            if len(value) > MAX_MOUNT_FLAGS:
                raise errors.InvalidArgument(f"{field}: more than {MAX_MOUNT_FLAGS}")
            for i, flag in enumerate(value):
                if not valid_mount_flag(flag) or len(flag) > MAX_ATTR_VALUE:
                    raise errors.InvalidArgument(f"{field}[{i}]: empty, too long or with control characters")
        if name == "items":
            if len(value) > MAX_ITEMS:
                raise errors.InvalidArgument(f"{field}: more than {MAX_ITEMS}")
            for i, item in enumerate(value):
                check_request(item, f"{field}[{i}].")


def _check_attrs(attrs: Any, field: str) -> None:
    if len(attrs) > MAX_ATTRS:
        raise errors.InvalidArgument(f"{field}: more than {MAX_ATTRS} entries")
    for k, v in attrs.items():
        if not k or len(k.encode()) > MAX_ATTR_KEY or len(v.encode()) > MAX_ATTR_VALUE:
            raise errors.InvalidArgument(f"{field}: key {k[:60]!r} empty or longer than {MAX_ATTR_KEY} bytes, or "
                                         f"its value longer than {MAX_ATTR_VALUE} bytes")


class EngineService(pb_grpc.EngineServicer):
    """engine.proto over an EmbeddedBackend and its started node side (DataPath): its snapshots freeze the
    sources staged on this node. Errors leave as status code + class name."""

    def __init__(self, backend: EmbeddedBackend, datapath: DataPath, state_dir: str,
                 metrics: RpcMetrics | None = None) -> None:
        self.b = backend
        self.dp = datapath
        self.state_dir = state_dir
        self.metrics = metrics  # flashcopy_engine_rpc_duration_seconds

    def _do(self, context: grpc.ServicerContext, method: str, request: Any, fn: Callable[[], T]) -> T:
        t0 = time.monotonic()
        try:
            check_request(request)  # on the unix socket too: the same answers whoever calls
            result = fn()
        except Exception as e:
            st = wire.encode(e)
            if self.metrics is not None:
                self.metrics.observe(method, st.code.name, time.monotonic() - t0)
            level = logging.ERROR if st.unexpected else logging.INFO
            log.log(level, "call failed", exc_info=st.unexpected, extra={"fields": {
                "method": method, "code": st.code.name, "error": st.message}})
            context.set_trailing_metadata(((wire.ERROR_KEY, st.error_class or "EngineError"),))
            context.abort(st.code, st.message)
        elapsed = time.monotonic() - t0
        if self.metrics is not None:
            self.metrics.observe(method, "OK", elapsed)
        log.debug("call", extra={"fields": {"method": method, "ms": round(elapsed * 1000, 1)}})
        return result

    # -- engine

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        return pb.PingResponse(pid=os.getpid(), version=__version__, state_dir=self.state_dir)

    def Capacity(self, request: pb.CapacityRequest, context: grpc.ServicerContext) -> pb.CapacityResponse:
        total, free = self._do(context, "Capacity", request, self.b.capacity)
        return pb.CapacityResponse(total_bytes=total, free_bytes=free)

    def CreateVolume(self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext) -> pb.VolumeResponse:
        v = self._do(context, "CreateVolume", request, lambda: self.b.create_volume(
            request.name, request.size, grain_size=request.grain_size, attrs=dict(request.attrs),
            volume_id=_opt(request, "volume_id")))
        return pb.VolumeResponse(volume=volume_msg(v))

    def GetVolume(self, request: pb.GetVolumeRequest, context: grpc.ServicerContext) -> pb.VolumeResponse:
        v = self._do(context, "GetVolume", request, lambda: self.b.get_volume(request.volume_id))
        return pb.VolumeResponse(volume=volume_msg(v))

    def FindVolume(self, request: pb.FindVolumeRequest, context: grpc.ServicerContext) -> pb.FindVolumeResponse:
        v = self._do(context, "FindVolume", request, lambda: self.b.find_volume(request.name))
        return pb.FindVolumeResponse(volume=volume_msg(v)) if v is not None else pb.FindVolumeResponse()

    def FindVolumes(self, request: pb.FindVolumesRequest, context: grpc.ServicerContext) -> pb.VolumesResponse:
        vs = self._do(context, "FindVolumes", request, lambda: self.b.find_volumes(dict(request.attrs)))
        return pb.VolumesResponse(volumes=[volume_msg(v) for v in vs])

    def DeleteVolume(self, request: pb.DeleteVolumeRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._do(context, "DeleteVolume", request, lambda: self.b.delete_volume(request.volume_id))
        return pb.Empty()

    def ResizeVolume(self, request: pb.ResizeVolumeRequest, context: grpc.ServicerContext) -> pb.VolumeResponse:
        v = self._do(context, "ResizeVolume", request,
                     lambda: self.b.resize_volume(request.volume_id, request.new_size))
        return pb.VolumeResponse(volume=volume_msg(v))

    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.VolumeResponse:
        v = self._do(context, "Snapshot", request, lambda: self.b.snapshot(
            request.source_id, request.name, copy_rate=request.copy_rate, attrs=dict(request.attrs),
            volume_id=_opt(request, "volume_id")))
        return pb.VolumeResponse(volume=volume_msg(v))

    def Clone(self, request: pb.CloneRequest, context: grpc.ServicerContext) -> pb.VolumeResponse:
        v = self._do(context, "Clone", request, lambda: self.b.clone(
            request.source_id, request.name, size=request.size, copy_rate=request.copy_rate,
            clean_rate=request.clean_rate, attrs=dict(request.attrs), volume_id=_opt(request, "volume_id")))
        return pb.VolumeResponse(volume=volume_msg(v))

    def SnapshotGroup(self, request: pb.SnapshotGroupRequest, context: grpc.ServicerContext
                      ) -> pb.VolumesResponse:
        items = [to_item(it) for it in request.items]
        vs = self._do(context, "SnapshotGroup", request, lambda: self.b.snapshot_group(
            request.group_name, items, copy_rate=request.copy_rate))
        return pb.VolumesResponse(volumes=[volume_msg(v) for v in vs])

    def DeleteGroup(self, request: pb.DeleteGroupRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._do(context, "DeleteGroup", request, lambda: self.b.delete_group(request.group_name))
        return pb.Empty()

    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportResponse:
        return report_msg(self._do(context, "Report", request, self.b.report))

    def ModifyCopies(self, request: pb.ModifyCopiesRequest, context: grpc.ServicerContext) -> pb.CopiesResponse:
        changed = self._do(context, "ModifyCopies", request, lambda: self.b.modify_copies(
            request.volume_id, copy_rate=request.copy_rate if request.HasField("copy_rate") else None,
            clean_rate=request.clean_rate if request.HasField("clean_rate") else None))
        return pb.CopiesResponse(mappings=[copy_msg(c) for c in changed])

    def RestoreVolume(self, request: pb.RestoreVolumeRequest, context: grpc.ServicerContext) -> pb.CopyResponse:
        c = self._do(context, "RestoreVolume", request, lambda: self.b.restore_volume(
            request.volume_id, request.snapshot_id, copy_rate=request.copy_rate))
        return pb.CopyResponse(mapping=copy_msg(c))

    def RefreshVolume(self, request: pb.RefreshVolumeRequest, context: grpc.ServicerContext
                      ) -> pb.RefreshVolumeResponse:
        c, grains = self._do(context, "RefreshVolume", request, lambda: self.b.refresh_volume(
            request.volume_id, request.source_id, copy_rate=request.copy_rate))
        return pb.RefreshVolumeResponse(mapping=copy_msg(c), grains_to_copy=grains)

    def AllocatedExtents(self, request: pb.AllocatedExtentsRequest,
                         context: grpc.ServicerContext) -> pb.ExtentsResponse:
        p = self._do(context, "AllocatedExtents", request, lambda: self.b.allocated_extents(
            request.volume_id, start=request.start, limit=request.limit))
        return extents_msg(p)

    def DeltaExtents(self, request: pb.DeltaExtentsRequest, context: grpc.ServicerContext) -> pb.ExtentsResponse:
        p = self._do(context, "DeltaExtents", request, lambda: self.b.delta_extents(
            request.base_id, request.target_id, start=request.start, limit=request.limit))
        return extents_msg(p)

    def PrepareGroup(self, request: pb.PrepareGroupRequest, context: grpc.ServicerContext) -> pb.Empty:
        items = [to_item(it) for it in request.items]
        watchdog = request.watchdog_ms / 1000 if request.watchdog_ms > 0 else WATCHDOG_SECONDS
        self._do(context, "PrepareGroup", request, lambda: self.b.prepare_group(
            request.group_name, items, copy_rate=request.copy_rate, watchdog=min(watchdog, MAX_WATCHDOG_SECONDS)))
        return pb.Empty()

    def StartGroup(self, request: pb.GroupPhaseRequest, context: grpc.ServicerContext) -> pb.VolumesResponse:
        vs = self._do(context, "StartGroup", request, lambda: self.b.start_group(request.group_name))
        return pb.VolumesResponse(volumes=[volume_msg(v) for v in vs])

    def ReleaseGroup(self, request: pb.ReleaseGroupRequest, context: grpc.ServicerContext
                     ) -> pb.ReleaseGroupResponse:
        held = self._do(context, "ReleaseGroup", request, lambda: self.b.release_group(request.group_name,
                                                                               abort=request.abort))
        return pb.ReleaseGroupResponse(hold_seconds=held)

    # -- node data path

    def NodeStage(self, request: pb.NodeStageRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._do(context, "NodeStage", request, lambda: self.dp.node_stage(
            request.volume_id, request.staging_path, block=request.block, fs_type=request.fs_type,
            mount_flags=list(request.mount_flags), read_only=request.read_only))
        return pb.Empty()

    def NodeUnstage(self, request: pb.NodeUnstageRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._do(context, "NodeUnstage", request, lambda: self.dp.node_unstage(request.volume_id, request.staging_path))
        return pb.Empty()

    def NodePublish(self, request: pb.NodePublishRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._do(context, "NodePublish", request, lambda: self.dp.node_publish(
            request.volume_id, request.staging_path, request.target_path, block=request.block,
            read_only=request.read_only, mount_flags=list(request.mount_flags),
            single_writer=request.single_writer))
        return pb.Empty()

    def NodeUnpublish(self, request: pb.NodeUnpublishRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._do(context, "NodeUnpublish", request,
                 lambda: self.dp.node_unpublish(request.volume_id, request.target_path))
        return pb.Empty()

    def NodeStats(self, request: pb.NodeStatsRequest, context: grpc.ServicerContext) -> pb.NodeStatsResponse:
        s = self._do(context, "NodeStats", request, lambda: self.dp.node_stats(request.volume_id, request.volume_path))
        return stats_msg(s)

    def NodeExpand(self, request: pb.NodeExpandRequest, context: grpc.ServicerContext) -> pb.NodeExpandResponse:
        cap = self._do(context, "NodeExpand", request, lambda: self.dp.node_expand(
            request.volume_id, request.volume_path, request.required_bytes))
        return pb.NodeExpandResponse(capacity_bytes=cap)


@contextlib.contextmanager
def _signals(stop: threading.Event) -> Iterator[None]:
    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _open_backend(state_dir: str, stop: threading.Event, keeper: str,
                  keeper_abort_after: float | None = None) -> EmbeddedBackend:
    datapath = functools.partial(DataPath, keeper=keeper, keeper_abort_after=keeper_abort_after)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return EmbeddedBackend.open(state_dir, datapath=datapath)
        except errors.EngineLocked as e:
            if stop.is_set() or time.monotonic() > deadline:
                raise
            log.warning("state dir busy, retrying", extra={"fields": {"error": str(e)}})
            stop.wait(0.5)


def run_engine(args: argparse.Namespace) -> int:
    configure_logging(getattr(args, "log_format", "text"), getattr(args, "log_level", "info"))
    state_dir = os.path.abspath(args.state_dir)
    endpoint = getattr(args, "endpoint", "") or default_endpoint(state_dir)
    try:
        path = unix_socket_path(endpoint, "engine endpoint")
    except ValueError as e:
        log.error("cannot serve", extra={"fields": {"error": str(e)}})
        return 2
    listen = getattr(args, "listen", "") or ""
    tls: TlsFiles | None = None
    if listen:
        try:
            tls = TlsFiles.load(getattr(args, "tls_dir", "") or "")
            tls.check_engine(args.node_id)  # else every controller refuses it: say so here, at once
        except ValueError as e:  # no TCP listener without TLS
            log.error("cannot serve --listen", extra={"fields": {"listen": listen, "error": str(e)}})
            return 2
    os.makedirs(state_dir, exist_ok=True)
    stop = threading.Event()
    serving = threading.Event()
    registry = new_registry("engine")
    rpc_metrics = RpcMetrics(registry, "flashcopy_engine_rpc_duration_seconds",
                             "Engine API calls by method and gRPC code.")
    engine_metrics = EngineCollector(registry)
    metrics_address = getattr(args, "metrics_address", "") or ""
    httpd = None
    if metrics_address:
        try:
            httpd = serve_metrics(metrics_address, registry, lambda: serving.is_set() and not stop.is_set())
        except (ValueError, OSError) as e:
            log.error("cannot serve metrics", extra={"fields": {"address": metrics_address, "error": str(e)}})
            return 1
    # (an early return below leaves the metrics thread to the process's exit: it is a daemon)
    with _signals(stop):
        try:
            backend = _open_backend(state_dir, stop, getattr(args, "fuse_keeper", "auto"),
                                    getattr(args, "fuse_keeper_abort_after", None))
        except errors.EngineLocked as e:
            log.error("another engine process holds the state dir", extra={"fields": {"error": str(e)}})
            return 1
        except errors.EngineError as e:  # e.g. datafiles.MetadataMissing: never ready, nothing touched
            log.error("cannot open the state dir", extra={"fields": {"error": str(e)}})
            return 1
        engine = backend.engine
        try:
            # mounts the FUSE export (clearing a dead predecessor's) and re-adopts the staging records
            datapath = backend.start_node()
            assert isinstance(datapath, DataPath)
        except Exception:
            log.exception("data path failed to start")
            engine.close()
            return 1
        node_datapath = datapath
        engine_metrics.attach(engine, datapath=lambda: node_datapath)
        pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="engine-rpc")
        service = EngineService(backend, datapath, state_dir, rpc_metrics)
        server = grpc.server(pool, interceptors=[DecodeRequests()], options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_EngineServicer_to_server(service, server)
        try:
            bind(server, unix_endpoint(path))  # a live socket is refused: another engine serves this node
        except (ValueError, RuntimeError, OSError) as e:
            log.error("cannot listen", extra={"fields": {"endpoint": endpoint, "error": str(e)}})
            datapath.stop()
            engine.close()
            return 1
        # the TCP port is its own server, so the access policy (remote.access) sits in front of every call on it
        tcp = _tls_server(pool, service, listen, tls) if listen and tls is not None else None
        if listen and tcp is None:
            server.stop(None)
            datapath.stop()
            engine.close()
            return 1
        server.start()
        if tcp is not None:
            tcp.start()
        os.chmod(path, 0o600)
        serving.set()
        staged = datapath.staged()
        log.info("engine serving", extra={"fields": {
            "endpoint": endpoint, "listen": listen or "-", "state_dir": state_dir, "pid": os.getpid(),
            "version": __version__, "readopted": ",".join(r.volume_id for r in staged) or "-"}})
        keeper = _lease_keeper(args, listen)
        while not stop.wait(1.0):
            pass
        if keeper is not None:
            keeper.stop(delete=True)  # controllers see this node down at once, not after the Lease expires
        log.info("shutting down: draining in-flight calls")
        stopped = [srv.stop(GRACE_SECONDS) for srv in (tcp, server) if srv is not None]
        for ev in stopped:
            ev.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if httpd is not None:
        httpd.shutdown()
    return _shutdown(engine, datapath)


def run_fuse_keeper(args: argparse.Namespace) -> int:
    """`csi-flashcopy fuse-keeper`: the engine process's companion that holds its FUSE connection."""
    from csi_driver.datapath import fuse_keeper

    configure_logging(getattr(args, "log_format", "text"), getattr(args, "log_level", "info"))
    try:
        fuse_keeper.serve(args.socket or fuse_keeper.socket_path(args.state_dir), idle_exit=args.idle_exit,
                          abort_after=args.abort_after)
    except RuntimeError as e:
        log.error("cannot serve", extra={"fields": {"error": str(e)}})
        return 1
    return 0


def _tls_server(pool: ThreadPoolExecutor, service: EngineService, listen: str, tls: TlsFiles
                ) -> grpc.Server | None:
    """The engine API for the controllers: mutual TLS (a client certificate from the CA), and then only what
    remote.access.TCP_POLICY serves the certificate's name (the controller's RPCs; no Node verbs)."""
    server = grpc.server(pool, interceptors=[TcpAccess(), DecodeRequests()], options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_EngineServicer_to_server(service, server)
    try:
        port = server.add_secure_port(listen, tls.server_credentials())
    except RuntimeError as e:
        port, why = 0, str(e)
    else:
        why = "address in use or not local"
    if not port:
        log.error("cannot listen", extra={"fields": {"listen": listen, "error": why}})
        return None
    return server


def _lease_keeper(args: argparse.Namespace, listen: str) -> LeaseKeeper | None:
    """The node's Lease (discovery and liveness for controllers), when serving other nodes in a cluster."""
    namespace = getattr(args, "namespace", "") or ""
    if not (listen and namespace):
        return None
    address = getattr(args, "advertise_address", "") or listen
    try:
        keeper = LeaseKeeper(api_client(getattr(args, "kubeconfig", "") or None), namespace, args.node_id, address)
    except ApiUnreachable as e:
        log.error("no Kubernetes API: controllers cannot find this engine", extra={"fields": {"error": str(e)}})
        return None
    keeper.start()
    log.info("keeping the engine Lease", extra={"fields": {"lease": f"{namespace}/{args.node_id}",
                                                           "address": address}})
    return keeper


def _shutdown(engine: Engine, datapath: DataPath) -> int:
    code = 0
    staged = datapath.staged()
    handover = bool(staged) and datapath.export.survives_restart
    if handover:
        # stop reading requests before the engine closes: the kernel keeps the rest for the next process
        with contextlib.suppress(Exception):
            datapath.stop(handover=True)
    # each step is tried whatever the one before did (a full state dir fails the flush): the export is
    # still unmounted and the keeper stopped below, the engine still closed
    try:
        engine.flush()
    except Exception:
        log.exception("engine flush failed")
        code = 1
    try:
        engine.close()  # FUSE requests arriving from now on fail with EIO (EngineClosed)
    except Exception:
        log.exception("engine close failed")
        code = 1
    if handover:
        log.info("stopped; the FUSE keeper holds the staged volumes' connection for the next engine process",
                 extra={"fields": {"exit_code": code, "staged": ",".join(r.volume_id for r in staged)}})
        return code
    if not staged:
        try:
            datapath.stop()
        except Exception:
            log.exception("data path stop failed")
            code = 1
        log.info("stopped", extra={"fields": {"exit_code": code}})
        return code
    # Staged volumes keep their loop devices and mounts (see the module doc). Their loop devices hold the
    # FUSE connection open, so the FUSE loop cannot end: detach the mount from the namespace and leave the
    # process without waiting for it; the kernel aborts the connection when /dev/fuse closes (I/O -> EIO).
    with contextlib.suppress(Exception):
        privileged.umount(datapath.export.mount_point, lazy=True)
    log.info("stopped with volumes still staged; their I/O fails until they are staged again",
             extra={"fields": {"exit_code": code, "staged": ",".join(r.volume_id for r in staged)}})
    logging.shutdown()
    os._exit(code)
