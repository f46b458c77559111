"""Leader election over a coordination.k8s.io/v1 Lease, for work one controller replica must do alone.

The holder renews `renewTime` every `duration / 3` seconds; another candidate takes the Lease over only once
`renewTime + leaseDurationSeconds` has passed on its own clock. Every write carries the resourceVersion it read,
so two candidates racing for an expired Lease cannot both win (the API server answers 409 to the loser). A
holder that cannot renew within the duration steps down before anyone else may take over; a clean stop
releases the Lease (holder cleared) so the next replica leads at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from csi_driver.k8s.leases import _now_micro

log = logging.getLogger("csi_flashcopy.leader")

DEFAULT_DURATION = 15


def default_identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}"


class LeaderElector:
    def __init__(self, api_client: Any, namespace: str, name: str, *, identity: str | None = None,
                 duration: int = DEFAULT_DURATION, on_change: Callable[[bool], None] | None = None) -> None:
        from kubernetes import client

        self._api: Any = client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.identity = identity or default_identity()
        self.duration = max(3, duration)
        self._on_change = on_change
        self._leading = False
        self._renewed_at = 0.0  # monotonic time of our last successful renewal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leading(self) -> bool:
        # never act on a Lease we may have lost: stop leading when the last renewal is a duration old
        return self._leading and time.monotonic() - self._renewed_at < self.duration

    def _set(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            log.info("leading" if leading else "not leading", extra={"fields": {
                "lease": f"{self.namespace}/{self.name}", "identity": self.identity}})
            if self._on_change is not None:
                self._on_change(leading)

    def try_once(self) -> bool:
        """One acquire-or-renew attempt; True while this candidate holds the Lease."""
        from kubernetes.client.exceptions import ApiException

        now = _now_micro()
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration,
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}
            try:
                self._api.create_namespaced_lease(self.namespace, body)
            except ApiException as e2:
                if e2.status == 409:
                    return False  # someone else created it first
                raise
            return self._won()
        spec = lease.spec
        holder = spec.holder_identity or ""
        renew = spec.renew_time.timestamp() if spec.renew_time is not None else 0.0
        expired = renew + (spec.lease_duration_seconds or self.duration) <= time.time()
        if holder and holder != self.identity and not expired:
            self._set(False)
            return False
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration,
                         "renewTime": now, "leaseTransitions": transitions,
                         "acquireTime": now if holder != self.identity else
                         (spec.acquire_time.isoformat() if spec.acquire_time is not None else now)}}
        try:
            self._api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as e:
            if e.status == 409:
                return False  # lost the race for an expired Lease, or our read was stale
            raise
        return self._won()

    def _won(self) -> bool:
        self._renewed_at = time.monotonic()
        self._set(True)
        return True

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_once()
            except Exception as e:
                log.warning("leader election: API call failed", extra={"fields": {"error": str(e)[:300]}})
            if self._leading and not self.leading:
                self._set(False)
            self._stop.wait(self.duration / 3 if self._leading else min(2.0, self.duration / 3))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._leading:
            try:
                lease = self._api.read_namespaced_lease(self.name, self.namespace)
                if lease.spec.holder_identity == self.identity:
                    lease.spec.holder_identity = None
                    lease.spec.renew_time = None
                    self._api.replace_namespaced_lease(self.name, self.namespace, lease)
            except Exception as e:
                log.warning("cannot release the leader Lease (it expires by itself)",
                            extra={"fields": {"error": str(e)[:300]}})
            self._set(False)

