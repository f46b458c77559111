"""The Kubernetes objects k8s tests make and wait for, through the dynamic client: PVCs until bound (their
volume handle), VolumeSnapshots until ready (their snapshot handle)."""

from __future__ import annotations

from typing import Any

from tests.k8s.test_k8s_flow import POLL, WAIT, Cluster
from tests.waiting import wait_for

SNAP = "snapshot.storage.k8s.io/v1"


class KubeObjects:
    def __init__(self, peer: Cluster, api: Any, namespace: str) -> None:
        self.peer, self.api, self.ns = peer, api, namespace

    def obj(self, version: str, kind: str, name: str, ns: str | None = "") -> dict[str, Any] | None:
        """The object, None when absent; ns "" = the test's namespace, None = cluster-scoped."""
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            return self.api.resources.get(api_version=version, kind=kind).get(
                name=name, namespace=self.ns if ns == "" else ns).to_dict()
        except NotFoundError:
            return None

    def create(self, obj: dict[str, Any], ns: str | None = "") -> None:
        r = self.api.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        r.create(body=obj, namespace=(self.ns if ns == "" else ns) if r.namespaced else None)

    def pvc(self, name: str, *, sc: str, source: tuple[str, str] | None = None, block: bool = False,
            labels: dict[str, str] | None = None, size: str = "16Mi") -> str:
        """A PVC (from a VolumeSnapshot or PVC source when given); its volume handle once bound."""
        spec: dict[str, Any] = {"storageClassName": sc, "accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": size}}}
        if block:
            spec["volumeMode"] = "Block"
        if source:
            kind, src = source
            spec["dataSource"] = {"kind": kind, "name": src,
                                  **({"apiGroup": "snapshot.storage.k8s.io"} if kind == "VolumeSnapshot" else {})}
        self.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": name, "labels": labels or {}}, "spec": spec})
        return self.handle(name)

    def handle(self, pvc: str) -> str:
        def bound() -> str:
            p = self.obj("v1", "PersistentVolumeClaim", pvc) or {}
            if (p.get("status") or {}).get("phase") != "Bound":
                return ""
            pv = self.obj("v1", "PersistentVolume", p["spec"]["volumeName"], None) or {}
            return str(pv["spec"]["csi"]["volumeHandle"])
        return wait_for(bound, timeout=WAIT, what=f"PVC {pvc} bound", interval=POLL, why=self.peer.logs)

    def snapshot(self, name: str, pvc: str, snapshot_class: str = "flashcopy") -> str:
        self.create({"apiVersion": SNAP, "kind": "VolumeSnapshot", "metadata": {"name": name},
                     "spec": {"volumeSnapshotClassName": snapshot_class,
                              "source": {"persistentVolumeClaimName": pvc}}})
        return self.snapshot_handle(name)

    def snapshot_handle(self, name: str) -> str:
        def ready() -> str:
            st = (self.obj(SNAP, "VolumeSnapshot", name) or {}).get("status") or {}
            if not st.get("readyToUse"):
                return ""
            vsc = self.obj(SNAP, "VolumeSnapshotContent", st["boundVolumeSnapshotContentName"], None) or {}
            return str(vsc["status"]["snapshotHandle"])
        return wait_for(ready, timeout=WAIT, what=f"VolumeSnapshot {name} ready", interval=POLL, why=self.peer.logs)
