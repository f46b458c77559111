"""Where every node's engine listens, and whether it is alive: coordination.k8s.io/v1 Leases.

Each node engine keeps a Lease named after its node in the driver's namespace (LeaseKeeper): labelled
SELECTOR, its engine address in the ADDRESS annotation, renewed every `duration / 3` seconds. A controller
watches them (LeaseDirectory: one list, then a watch from its resourceVersion, relisting when the watch
expires) and holds a node to be down once `renewTime + leaseDurationSeconds` has passed on its own clock, or
when the Lease is gone. An engine that stops cleanly deletes its Lease, so it is down at once.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("csi_flashcopy.leases")

LABELS = {"app.kubernetes.io/name": "csi-flashcopy", "app.kubernetes.io/component": "engine"}
SELECTOR = ",".join(f"{k}={v}" for k, v in LABELS.items())
ADDRESS = "flashcopy.csi.dev/engine-address"
DEFAULT_DURATION = 15  # seconds a Lease stays valid unrenewed
STOP_TIMEOUT = 5.0  # the longest a stopping engine waits on the API server for its Lease


def _now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float:
    """Seconds since the epoch of an API timestamp (RFC 3339, 'Z'), 0 when absent or unreadable."""
    if not text:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class LeaseKeeper:
    """The engine side: create the node's Lease and renew it until stopped (then delete it)."""

    def __init__(self, api_client: Any, namespace: str, node: str, address: str, *,
                 duration: int = DEFAULT_DURATION) -> None:
        from kubernetes import client

        self._api: Any = client.CoordinationV1Api(api_client)
        self.namespace, self.node, self.address, self.duration = namespace, node, address, max(3, duration)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewed = threading.Event()  # set after the first successful create or renew

    def _body(self) -> dict[str, Any]:
        now = _now_micro()
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.node, "namespace": self.namespace, "labels": dict(LABELS),
                         "annotations": {ADDRESS: self.address}},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": self.duration, "renewTime": now,
                     "acquireTime": now},
        }

    def renew_once(self) -> None:
        from kubernetes.client.exceptions import ApiException

        body = self._body()
        try:
            self._api.patch_namespaced_lease(self.node, self.namespace, {
                "metadata": {"labels": body["metadata"]["labels"], "annotations": body["metadata"]["annotations"]},
                "spec": {"holderIdentity": self.node, "leaseDurationSeconds": self.duration,
                         "renewTime": body["spec"]["renewTime"]}})
        except ApiException as e:
            if e.status != 404:
                raise
            self._api.create_namespaced_lease(self.namespace, body)
        self.renewed.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.duration / 3
        while not self._stop.is_set():
            try:
                self.renew_once()
            except Exception as e:  # the API server may be briefly away: the Lease has slack for that
                log.warning("cannot renew the engine Lease", extra={"fields": {
                    "lease": f"{self.namespace}/{self.node}", "error": str(e)[:300]}})
                self._stop.wait(min(interval, 1.0))
                continue
            self._stop.wait(interval)

    def stop(self, *, delete: bool = True, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop renewing; delete the Lease (controllers see the node down at once) unless told not to. Never
        waits on the API server longer than `timeout` in all: a shutdown must go on to unmount its exports when
        the API server is away (the Lease then expires by itself). True when the Lease was deleted."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not delete:
            return False
        done = threading.Event()
        failed: list[str] = []

        def delete_lease() -> None:
            try:
                left = max(0.5, deadline - time.monotonic())
                self._api.delete_namespaced_lease(self.node, self.namespace, _request_timeout=(left, left))
            except Exception as e:
                failed.append(str(e)[:300])
            finally:
                done.set()

        # a thread of its own: a request timeout bounds each try, not the client's retries of a dead connection
        threading.Thread(target=delete_lease, name="lease-delete", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())) or failed:
            log.warning("cannot delete the engine Lease (it expires by itself)", extra={"fields": {
                "lease": f"{self.namespace}/{self.node}",
                "error": failed[0] if failed else f"no answer from the API server within {timeout:g} s"}})
            return False
        return True


@dataclass(frozen=True)
class LeaseRecord:
    node: str
    address: str
    renew_time: float
    duration: float

    @property
    def live(self) -> bool:
        return self.renew_time + self.duration > time.time()

    @property
    def detail(self) -> str:
        if self.live:
            return ""
        if not self.renew_time:
            return "its engine Lease was never renewed"
        age = time.time() - self.renew_time
        return f"its engine Lease expired (last renewed {age:.0f} s ago, valid {self.duration:.0f} s)"


class LeaseDirectory:
    """The controller side: every engine Lease in the namespace, kept current by a watch."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self._api: Any = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self._mu = threading.Lock()
        self._leases: dict[str, LeaseRecord] = {}
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name="lease-watch", daemon=True)

    def start(self) -> LeaseDirectory:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()

    def endpoints(self) -> dict[str, LeaseRecord]:
        with self._mu:
            return dict(self._leases)

    @staticmethod
    def _record(obj: dict[str, Any]) -> LeaseRecord | None:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        name = meta.get("name")
        if not name:
            return None
        return LeaseRecord(node=name, address=(meta.get("annotations") or {}).get(ADDRESS, ""),
                           renew_time=parse_time(spec.get("renewTime")),
                           duration=float(spec.get("leaseDurationSeconds") or 0))

    def _list(self) -> str:
        resp = self._api.list_namespaced_lease(self.namespace, label_selector=SELECTOR, _preload_content=False)
        data = json.loads(resp.data)
        leases = {}
        for item in data.get("items") or []:
            rec = self._record(item)
            if rec is not None:
                leases[rec.node] = rec
        with self._mu:
            self._leases = leases
        self.synced.set()
        return str((data.get("metadata") or {}).get("resourceVersion", ""))

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = 0.5
        while not self._stop.is_set():
            try:
                rv = self._list()
                self._watch = w = watch.Watch()
                for ev in w.stream(self._api.list_namespaced_lease, self.namespace, label_selector=SELECTOR,
                                   resource_version=rv, timeout_seconds=60, allow_watch_bookmarks=True):
                    if self._stop.is_set():
                        break
                    kind, obj = ev.get("type"), ev.get("raw_object") or {}
                    if kind == "ERROR":
                        break  # expired resourceVersion and the like: list again
                    rec = self._record(obj)
                    if rec is None or kind == "BOOKMARK":
                        continue
                    with self._mu:
                        if kind == "DELETED":
                            self._leases.pop(rec.node, None)
                        else:
                            self._leases[rec.node] = rec
                backoff = 0.5
            except ApiException as e:
                if e.status != 410:
                    log.warning("Lease watch failed", extra={"fields": {"status": e.status,
                                                                        "error": str(e.reason)}})
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            except Exception as e:
                log.warning("Lease watch failed", extra={"fields": {"error": str(e)[:300]}})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
