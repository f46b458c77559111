"""ClusterBackend: the api.Backend of a controller that owns no volumes, over every node's engine.

Nodes come from a Directory (in a cluster: csi_driver.k8s.leases.LeaseDirectory, the engines' Leases); each is
reached over the engine API with mutual TLS (RemoteBackend). Ids name their node (api.placed_id), so a call on
one object goes to its node with no lookup; a copy is made on its source's node. A node that is down (its
Lease expired or gone, or its engine not answering) fails only the calls for its own objects, with
EngineUnavailable (UNAVAILABLE: the sidecars retry); listings answer from the live nodes and log which are
missing. No state of its own: a restarted controller answers as soon as the directory has listed the Leases.

A group snapshot whose members live on several nodes runs in FlashCopy's phases (engine.groups.GroupStart,
I7): every node prepares (its sources quiesced and their host writes held), then every node starts, and only
then are all released; if any node fails to prepare or start, all are released with abort and no member is
left. A node that hears nothing more aborts or releases by itself after WATCHDOG seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from csi_driver.api import (
    CopyStatus,
    ExtentPage,
    NodeInfo,
    NodeStats,
    Report,
    SnapshotItem,
    Volume,
    id_node_key,
    node_key,
)
from csi_driver.engine import errors
from csi_driver.remote.client import RemoteBackend
from csi_driver.remote.tls import TlsFiles
from csi_driver.remote.wire import EngineUnavailable

log = logging.getLogger("csi_flashcopy.cluster")

T = TypeVar("T")

#: a prepared node aborts on its own after this long without the start (and releases after the start)
WATCHDOG = 5.0
#: per phase call; a freeze of many filesystems is bounded by the node's own freeze limit
PHASE_TIMEOUT = 30.0
#: metadata reads of one node (lookups, listings): a node that hangs must not hold up the others for long
READ_TIMEOUT = 10.0


class Endpoint(Protocol):
    @property
    def node(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def live(self) -> bool: ...
    @property
    def detail(self) -> str: ...


class Directory(Protocol):
    """Where each node's engine listens and whether it is alive."""

    synced: threading.Event

    def endpoints(self) -> Mapping[str, Endpoint]: ...

    def stop(self) -> None: ...


class ClusterBackend:
    """Backend over every node's engine (module doc). Thread-safe."""

    def __init__(self, directory: Directory, tls: TlsFiles, *, sync_timeout: float = 30.0) -> None:
        self.directory = directory
        self._tls = tls
        self._sync_timeout = sync_timeout
        self._mu = threading.Lock()
        self._clients: dict[str, RemoteBackend] = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="cluster")
        self._closed = False
        #: nodes a listing could not ask, last time (also logged)
        self.missing: list[str] = []
        #: the longest host-write hold of the last multi-node group start, seconds (bench, logs)
        self.last_group_hold = 0.0

    # -- nodes

    def _endpoints(self) -> Mapping[str, Endpoint]:
        if not self.directory.synced.wait(self._sync_timeout):
            raise EngineUnavailable("the node directory has not listed the engine Leases yet")
        return self.directory.endpoints()

    def _client(self, ep: Endpoint) -> RemoteBackend:
        with self._mu:
            if self._closed:
                raise EngineUnavailable("the controller is shutting down")
            c = self._clients.get(ep.node)
            if c is None or c.endpoint != ep.address:
                if c is not None:
                    c.close()  # the node's engine moved (a new pod IP)
                c = RemoteBackend(ep.address, tls=self._tls, node_id=ep.node, read_timeout=READ_TIMEOUT)
                self._clients[ep.node] = c
            return c

    def _resolve(self, key: str) -> Endpoint:
        eps = self._endpoints()
        ep = eps.get(key) or next((e for e in eps.values() if node_key(e.node) == key), None)
        if ep is None:
            raise EngineUnavailable(f"node {key} is not available: no engine Lease names it")
        if not ep.live or not ep.address:
            raise EngineUnavailable(f"node {ep.node} is down: {ep.detail or 'its Lease has no address'}")
        return ep

    def _on(self, key: str, fn: Callable[[RemoteBackend], T]) -> T:
        ep = self._resolve(key)
        try:
            return fn(self._client(ep))
        except EngineUnavailable as e:
            raise EngineUnavailable(f"node {ep.node}: {e}") from None

    def _for_id(self, object_id: str, fn: Callable[[RemoteBackend], T]) -> T:
        key = id_node_key(object_id)
        if key is None:
            raise errors.NotFound(f"{object_id} names no node: it is not an object of this driver")
        return self._on(key, fn)

    def _live(self) -> tuple[list[Endpoint], list[str]]:
        live: list[Endpoint] = []
        down: list[Endpoint] = []
        for ep in self._endpoints().values():
            (live if ep.live and ep.address else down).append(ep)
        return live, [ep.node for ep in down]

    def _fan_out(self, fn: Callable[[RemoteBackend], T]) -> tuple[list[tuple[Endpoint, T]], list[str]]:
        """fn on every live node at once: (results, nodes that could not answer)."""
        live, missing = self._live()
        futures = [(ep, self._pool.submit(fn, self._client(ep))) for ep in live]
        out: list[tuple[Endpoint, T]] = []
        for ep, f in futures:
            try:
                out.append((ep, f.result()))
            except EngineUnavailable as e:
                missing.append(ep.node)
                log.warning("node engine not answering", extra={"fields": {"node": ep.node, "error": str(e)}})
        return out, sorted(missing)

    def nodes(self) -> list[NodeInfo]:
        results, _ = self._fan_out(lambda c: c.capacity())
        answered = {ep.node: cap for ep, cap in results}
        infos = []
        for ep in self._endpoints().values():
            if ep.node in answered:
                total, free = answered[ep.node]
                infos.append(NodeInfo(id=ep.node, live=True, total_bytes=total, free_bytes=free))
            else:
                infos.append(NodeInfo(id=ep.node, live=False,
                                      detail=ep.detail or "its engine does not answer"))
        return sorted(infos, key=lambda n: n.id)

    # -- Backend

    def is_ready(self) -> bool:
        return not self._closed and self.directory.synced.is_set()

    def close(self) -> None:
        with self._mu:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        self.directory.stop()
        for c in clients:
            c.close()
        self._pool.shutdown(wait=False)

    def capacity(self) -> tuple[int, int]:
        results, _ = self._fan_out(lambda c: c.capacity())
        return sum(t for _, (t, _f) in results), sum(f for _, (_t, f) in results)

    def create_volume(self, name: str, size: int, *, grain_size: int, attrs: Mapping[str, str],
                      volume_id: str | None = None) -> Volume:
        if volume_id is None:
            raise errors.InvalidArgument("a multi-node backend needs the new volume's id (it names the node)")
        return self._for_id(volume_id, lambda c: c.create_volume(name, size, grain_size=grain_size, attrs=attrs,
                                                                 volume_id=volume_id))

    def get_volume(self, volume_id: str) -> Volume:
        return self._for_id(volume_id, lambda c: c.get_volume(volume_id))

    def find_volume(self, name: str) -> Volume | None:
        results, missing = self._fan_out(lambda c: c.find_volume(name))
        found = [v for _, v in results if v is not None]
        if not found and missing:
            log.warning("name lookup could not ask every node", extra={"fields": {"name": name,
                                                                                   "missing": ",".join(missing)}})
        return min(found, key=lambda v: v.created_at) if found else None

    def find_volumes(self, attrs: Mapping[str, str]) -> list[Volume]:
        results, missing = self._fan_out(lambda c: c.find_volumes(attrs))
        self.missing = missing
        if missing:
            log.warning("listing without the volumes of nodes that are down",
                        extra={"fields": {"missing": ",".join(missing)}})
        return sorted((v for _, vs in results for v in vs), key=lambda v: (v.created_at, v.id))

    def delete_volume(self, volume_id: str) -> None:
        self._for_id(volume_id, lambda c: c.delete_volume(volume_id))

    def resize_volume(self, volume_id: str, new_size: int) -> Volume:
        return self._for_id(volume_id, lambda c: c.resize_volume(volume_id, new_size))

    def snapshot(self, source_id: str, name: str, *, copy_rate: int, attrs: Mapping[str, str],
                 volume_id: str | None = None) -> Volume:
        self._same_node(source_id, volume_id)
        return self._for_id(source_id, lambda c: c.snapshot(source_id, name, copy_rate=copy_rate, attrs=attrs,
                                                            volume_id=volume_id))

    def clone(self, source_id: str, name: str, *, size: int, copy_rate: int, clean_rate: int,
              attrs: Mapping[str, str], volume_id: str | None = None) -> Volume:
        self._same_node(source_id, volume_id)
        return self._for_id(source_id, lambda c: c.clone(source_id, name, size=size, copy_rate=copy_rate,
                                                         clean_rate=clean_rate, attrs=attrs, volume_id=volume_id))

    @staticmethod
    def _same_node(source_id: str, volume_id: str | None) -> None:
        if volume_id is None or id_node_key(volume_id) != id_node_key(source_id):
            raise errors.InvalidArgument(f"a copy of {source_id} is made on its node: its id must name that node")

    def snapshot_group(self, group_name: str, items: Sequence[SnapshotItem], *, copy_rate: int) -> list[Volume]:
        by_node: dict[str, list[SnapshotItem]] = {}
        for it in items:
            self._same_node(it.source_id, it.volume_id)
            key = id_node_key(it.source_id)
            assert key is not None
            by_node.setdefault(key, []).append(it)
        if len(by_node) == 1:
            (key, part), = by_node.items()
            return self._on(key, lambda c: c.snapshot_group(group_name, part, copy_rate=copy_rate))
        return self._phased_group(group_name, by_node, copy_rate)

    def _phased_group(self, group_name: str, by_node: dict[str, list[SnapshotItem]], copy_rate: int
                      ) -> list[Volume]:
        """Prepare everywhere, start everywhere, then release everywhere; any failure aborts every node."""
        nodes = {key: (self._resolve(key), part) for key, part in by_node.items()}  # all up, or UNAVAILABLE now
        clients = {key: self._client(ep) for key, (ep, _) in nodes.items()}

        def each(fn: Callable[[str, RemoteBackend], T]) -> dict[str, T | BaseException]:
            futures = {key: self._pool.submit(fn, key, c) for key, c in clients.items()}
            out: dict[str, T | BaseException] = {}
            for key, f in futures.items():
                try:
                    out[key] = f.result()
                except BaseException as e:  # noqa: B036 - collected, re-raised after the abort
                    out[key] = e
            return out

        def failure(results: Mapping[str, object]) -> BaseException | None:
            return next((r for r in results.values() if isinstance(r, BaseException)), None)

        t0 = time.perf_counter()
        prepared = each(lambda key, c: c.prepare_group(group_name, nodes[key][1], copy_rate=copy_rate,
                                                       watchdog=WATCHDOG, timeout=PHASE_TIMEOUT))
        err = failure(prepared)
        started: dict[str, list[Volume] | BaseException] = {}
        if err is None:
            started = each(lambda key, c: c.start_group(group_name, timeout=WATCHDOG))
            err = failure(started)
        answered = {k for k, r in prepared.items() if not isinstance(r, BaseException)}
        # a node that did not answer the prepare gets a short release: its own watchdog aborts it anyway
        released = each(lambda key, c: c.release_group(group_name, abort=err is not None,
                                                       timeout=PHASE_TIMEOUT if key in answered else WATCHDOG))
        holds = [h for h in released.values() if isinstance(h, float)]
        self.last_group_hold = max(holds, default=0.0)
        log.info("group snapshot across nodes", extra={"fields": {
            "group": group_name, "nodes": ",".join(sorted(nodes)), "ok": err is None,
            "max_hold_ms": round(self.last_group_hold * 1000, 1),
            "ms": round((time.perf_counter() - t0) * 1000, 1)}})
        if err is not None:
            name = next(k for k, r in {**prepared, **started}.items() if r is err)
            if isinstance(err, EngineUnavailable):
                raise EngineUnavailable(f"group snapshot {group_name}: node {nodes[name][0].node}: {err}") from None
            raise err
        return sorted((v for r in started.values() if isinstance(r, list) for v in r), key=lambda v: v.id)

    def delete_group(self, group_name: str) -> None:
        """On every live node (a node that is down keeps its memberless engine group record, harmless)."""

        def delete(c: RemoteBackend) -> bool:
            with contextlib.suppress(errors.NotFound):
                c.delete_group(group_name)
                return True
            return False

        results, _ = self._fan_out(delete)
        if not any(found for _, found in results):
            raise errors.NotFound(f"group {group_name!r} not found")

    # -- no node side: a controller stages nothing

    # -- operations

    def report(self) -> Report:
        results, missing = self._fan_out(lambda c: c.report())
        parts = [r for _, r in sorted(results, key=lambda er: er[0].node)]
        return Report(volumes=tuple(v for r in parts for v in r.volumes),
                      mappings=tuple(m for r in parts for m in r.mappings),
                      groups=tuple(g for r in parts for g in r.groups), missing_nodes=tuple(missing))

    def modify_copies(self, volume_id: str, *, copy_rate: int | None, clean_rate: int | None) -> list[CopyStatus]:
        return self._for_id(volume_id, lambda c: c.modify_copies(volume_id, copy_rate=copy_rate,
                                                                 clean_rate=clean_rate))

    def restore_volume(self, volume_id: str, snapshot_id: str, *, copy_rate: int) -> CopyStatus:
        _on_one_node(volume_id, snapshot_id)
        return self._for_id(volume_id, lambda c: c.restore_volume(volume_id, snapshot_id, copy_rate=copy_rate))

    def refresh_volume(self, volume_id: str, source_id: str, *, copy_rate: int) -> tuple[CopyStatus, int]:
        _on_one_node(volume_id, source_id)
        return self._for_id(volume_id, lambda c: c.refresh_volume(volume_id, source_id, copy_rate=copy_rate))

    def allocated_extents(self, volume_id: str, *, start: int, limit: int) -> ExtentPage:
        return self._for_id(volume_id, lambda c: c.allocated_extents(volume_id, start=start, limit=limit))

    def delta_extents(self, base_id: str, target_id: str, *, start: int, limit: int) -> ExtentPage:
        a, b = id_node_key(base_id), id_node_key(target_id)
        if a is not None and b is not None and a != b:
            # each node's cascades are its own: two points in time on different nodes share no cascade
            raise errors.InvalidState(f"tracking not possible: {base_id} and {target_id} are on different nodes")
        self._for_id(base_id, lambda c: c.get_volume(base_id))  # NotFound for an id that names no node
        return self._for_id(target_id, lambda c: c.delta_extents(base_id, target_id, start=start, limit=limit))

    def _no_node(self) -> errors.InvalidState:
        return errors.InvalidState("the controller serves no node data path (the node plugins do)")

    def node_stage(self, volume_id: str, staging_path: str, *, block: bool, fs_type: str,
                   mount_flags: Sequence[str], read_only: bool) -> None:
        raise self._no_node()

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        raise self._no_node()

    def node_publish(self, volume_id: str, staging_path: str, target_path: str, *, block: bool,
                     read_only: bool, mount_flags: Sequence[str], single_writer: bool = False) -> None:
        raise self._no_node()

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        raise self._no_node()

    def node_stats(self, volume_id: str, volume_path: str) -> NodeStats:
        raise self._no_node()

    def node_expand(self, volume_id: str, volume_path: str, required_bytes: int) -> int:
        raise self._no_node()


def _on_one_node(volume_id: str, source_id: str) -> None:
    """A restore or refresh moves data within one node's cascades only."""
    a, b = id_node_key(volume_id), id_node_key(source_id)
    if a != b:
        raise errors.InvalidState(f"{volume_id} and {source_id} are on different nodes ({a}, {b}): FlashCopy "
                                  "copies within a node; clone the source onto the volume's node first")
