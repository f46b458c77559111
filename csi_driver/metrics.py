"""The Prometheus view (prometheus-client) of a `serve` or `csi-flashcopy engine` process, and its HTTP endpoint.

Each process builds one `CollectorRegistry` (never the library's global one, so several servers in one test
process do not collide) with:

- `RpcMetrics`: a latency histogram by method and gRPC code, fed by csi.rpc.RpcInterceptor (CSI calls:
  flashcopy_csi_rpc_duration_seconds) or by remote.service.EngineService._do (engine API calls:
  flashcopy_engine_rpc_duration_seconds);
- `EngineCollector`: wherever an engine runs in the process (embedded `serve`, the engine process), a custom
  collector that reads `Engine.inspect()`, the engine's `EngineStats` counters and the data path's `Timings`
  (FUSE requests, freeze windows) at scrape time. The engine and the data path keep plain numbers only: they
  import nothing of this module nor of prometheus_client.

`serve_metrics` answers GET /metrics (text format, or OpenMetrics when asked) and /healthz (200 when ready,
503 otherwise). Every metric is described in docs/metrics.md.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from csi_driver import __version__
from csi_driver.datapath.fuse_export import Series, Timings
from csi_driver.engine import Engine
from csi_driver.engine.durability import EngineStats
from csi_driver.engine.model import MappingState

log = logging.getLogger("csi_flashcopy.metrics")

#: RPC latency buckets (seconds): a Probe takes a millisecond, a group snapshot under load seconds
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: metadata commit buckets (seconds): fdatasyncs plus one SQLite transaction
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def new_registry(component: str) -> CollectorRegistry:
    """A registry of this process's own: build info and the process_* metrics (CPU, memory, open fds)."""
    registry = CollectorRegistry()
    Info("flashcopy_build", "csi-flashcopy version and which process serves these metrics.",
         registry=registry).info({"version": __version__, "component": component})
    ProcessCollector(registry=registry)
    return registry


class RpcMetrics:
    """A latency histogram of RPCs by method and gRPC code name (the csi.rpc.RpcObserver protocol)."""

    def __init__(self, registry: CollectorRegistry, name: str, doc: str) -> None:
        self._hist = Histogram(name, doc, ["method", "code"], registry=registry, buckets=RPC_BUCKETS)
        self._children: dict[tuple[str, str], Any] = {}
        self._mu = threading.Lock()

    def observe(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        child = self._children.get(key)
        if child is None:
            with self._mu:
                child = self._children.setdefault(key, self._hist.labels(method=method, code=code))
        child.observe(seconds)


class EngineCollector(Collector):
    """The engine's gauges and counters, read at scrape time; nothing until `attach` names an engine.

    A controller-only `serve` (ClusterBackend, RemoteBackend) never attaches one: it shows only its RPCs.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._engine: Engine | None = None
        self._stats: EngineStats | None = None
        self._datapath: Callable[[], object | None] = lambda: None
        # observed by the engine (EngineStats.on_commit) under its lock; collected only with an engine attached
        self._commit = Histogram("flashcopy_metadata_commit_seconds",
                                 "Time of each engine commit that made something durable: fdatasync of the data "
                                 "files with new copies, the metadata transaction, the held writes let out.",
                                 registry=None, buckets=COMMIT_BUCKETS)
        registry.register(self)

    def attach(self, engine: Engine, datapath: Callable[[], object | None] | None = None) -> None:
        """Count this engine's copy-on-write grains and commits from now on; datapath: a callable returning the
        node data path (csi_driver.datapath.DataPath) once started, whose FUSE requests and freezes are shown."""
        stats = EngineStats(on_commit=self._commit.observe)
        engine.stats = stats
        self._stats = stats
        self._engine = engine
        if datapath is not None:
            self._datapath = datapath

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only: the families depend on what is attached

    def collect(self) -> Iterator[Metric]:
        engine, stats = self._engine, self._stats
        if engine is None or stats is None:
            return
        try:
            yield from self._engine_families(engine, stats)
        except Exception as e:  # a closing engine must not fail the whole scrape (RPC metrics still count)
            log.warning("engine metrics unavailable", extra={"fields": {"error": str(e)}})
        yield from self._commit.collect()
        dp = self._datapath()
        fuse = getattr(getattr(dp, "export", None), "stats", None)
        if isinstance(fuse, Timings):
            yield from _fuse_families(fuse)
        freeze = getattr(dp, "freeze_timings", None)
        if isinstance(freeze, Timings):
            s = freeze.snapshot().get("freeze")
            if s is not None:
                h = HistogramMetricFamily("flashcopy_freeze_seconds",
                                          "Freeze windows of snapshot starts: first FIFREEZE to last thaw of the "
                                          "staged filesystems a snapshot or group snapshot froze.")
                h.add_metric([], _buckets(s), s.seconds)
                yield h

    def _engine_families(self, engine: Engine, stats: EngineStats) -> Iterator[Metric]:
        vols, maps, groups = engine.inspect()
        v = GaugeMetricFamily("flashcopy_volumes", "Volumes and snapshots in the engine; hidden=\"true\": "
                              "deleted ones kept because others still read through them.", labels=["hidden"])
        hidden = sum(1 for x in vols if x.deleted)
        v.add_metric(["false"], len(vols) - hidden)
        v.add_metric(["true"], hidden)
        yield v
        yield GaugeMetricFamily("flashcopy_allocated_bytes", "Bytes allocated on disk by all volume data files.",
                                value=sum(x.allocated_bytes for x in vols))
        m = GaugeMetricFamily("flashcopy_mappings", "FlashCopy mappings by state.", labels=["state"])
        by_state = dict.fromkeys((s.value for s in MappingState), 0)
        for x in maps:
            by_state[x.state.value] = by_state.get(x.state.value, 0) + 1
        for state, n in sorted(by_state.items()):
            m.add_metric([state], n)
        yield m
        yield GaugeMetricFamily("flashcopy_consistency_groups", "Consistency groups.", value=len(groups))
        left = GaugeMetricFamily("flashcopy_copy_bytes_remaining", "Bytes copying mappings have still to copy; "
                                 "paused=\"true\": copy rate 0 (no-copy snapshots, paused clones), nothing copies.",
                                 labels=["paused"])
        left.add_metric(["false"], sum(x.bytes_to_copy for x in maps if x.copy_rate > 0))
        left.add_metric(["true"], sum(x.bytes_to_copy for x in maps if x.copy_rate == 0))
        yield left
        yield GaugeMetricFamily("flashcopy_clean_bytes_remaining",
                                "Bytes stopping mappings have still to clean into their downstream target.",
                                value=sum(x.bytes_to_clean for x in maps))
        yield CounterMetricFamily("flashcopy_cow_grains", "Grains a host write copied into a snapshot or clone "
                                  "first (copy-on-write).", value=stats.cow_grains)
        yield CounterMetricFamily("flashcopy_cow_bytes", "Bytes of those copy-on-write grains.",
                                  value=stats.cow_bytes)
        yield GaugeMetricFamily("flashcopy_held_write_bytes", "Bytes of host writes held in memory until the next "
                                "metadata commit (they overwrite data a copy's undurable bit vouches for).",
                                value=engine.held_write_bytes)
        yield GaugeMetricFamily("flashcopy_last_start_hold_seconds",
                                "How long the last mapping or group start held host I/O.",
                                value=engine.last_start_hold)


def _buckets(s: Series) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(s.bounds, s.buckets):
        total += n
        out.append((repr(float(bound)), total))  # as floatToGoString
    out.append(("+Inf", total + s.buckets[-1]))
    return out


def _fuse_families(fuse: Timings) -> Iterator[Metric]:
    snap = fuse.snapshot()
    reqs = CounterMetricFamily("flashcopy_fuse_requests", "FUSE requests of the volume export by op (every block "
                               "request of a staged volume is one).", labels=["op"])
    errs = CounterMetricFamily("flashcopy_fuse_request_errors", "FUSE requests answered with an error (EIO, EROFS, "
                               "ENOSPC, ...).", labels=["op"])
    nbytes = CounterMetricFamily("flashcopy_fuse_bytes", "Bytes read, written or discarded (fallocate) through "
                                 "FUSE.", labels=["op"])
    lat = HistogramMetricFamily("flashcopy_fuse_request_seconds", "Time in the FUSE request handler (engine call "
                                "included, kernel round trip not).", labels=["op"])
    for op, s in sorted(snap.items()):
        reqs.add_metric([op], s.count)
        errs.add_metric([op], s.errors)
        nbytes.add_metric([op], s.bytes)
        lat.add_metric([op], _buckets(s), s.seconds)
    yield from (reqs, errs, nbytes, lat)


#: connections served at once; Prometheus scrapes a target one at a time, probes add one or two
MAX_SCRAPES = 4
#: seconds a connection may take to send its request (a slow client must not hold a slot for long)
REQUEST_TIMEOUT = 10.0
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\nbusy\n")


def serve_metrics(address: str, registry: CollectorRegistry, ready: Callable[[], bool], *,
                  max_scrapes: int = MAX_SCRAPES, request_timeout: float = REQUEST_TIMEOUT
                  ) -> http.server.ThreadingHTTPServer:
    """Serve GET /metrics and /healthz on HOST:PORT ([v6]:PORT too) from a daemon thread; OSError if it cannot
    bind. Stop with `.shutdown()`.

    Only the given address is bound (the chart passes the pod IP). At most max_scrapes connections are served at
    once: one more is answered 503 (Retry-After: 1) at once and closed, by the accepting thread, so no number of
    open connections costs more than max_scrapes threads; each connection has request_timeout seconds per read."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be HOST:PORT, got {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    slots = threading.BoundedSemaphore(max_scrapes)

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = request_timeout

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok = ready()
                body, ctype = (b"ok\n" if ok else b"not ready\n"), "text/plain; charset=utf-8"
                self.send_response(200 if ok else 503)
            elif path == "/metrics":
                encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(registry)
                self.send_response(200)
            else:
                self.send_error(404)
                return
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
            return

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

        def process_request(self, request: Any, client_address: Any) -> None:
            if not slots.acquire(blocking=False):
                try:
                    request.settimeout(1.0)
                    request.sendall(_BUSY)
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                slots.release()  # no thread took the slot
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

    httpd = Server((host, int(port)), Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    log.info("serving metrics", extra={"fields": {"address": address}})
    return httpd
