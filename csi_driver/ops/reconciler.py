"""The controller's operations loop, on the leading replica only (a Lease, k8s.leader).

Every `poll` seconds, from one Backend.report():
- FlashCopyNode objects (one per node, in the driver's namespace) get the node's volumes, mappings and groups
  as `status -o json` prints them, written only when something changed;
- Events go to the VolumeSnapshot or PVC whose mapping stopped (out of space, forced stop of a dependent),
  whose background copy waits for space, or whose copy completed (transitions seen between two polls);
- VolumeRestore and VolumeRefresh objects (every namespace) move through their phases (see the CRDs in
  charts/csi-flashcopy/crds). Each step is safe to repeat after a crash: a restore records `Restoring` before
  it calls the engine and, finding that phase again, looks for the restore mapping it may have started; a
  refresh names its new VolumeSnapshot after the VolumeRefresh's uid and a repeated refresh copies nothing more.
"""

from __future__ import annotations

import datetime
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from csi_driver.api import Backend, CopyStatus, Report
from csi_driver.engine.model import DEFAULT_COPY_RATE
from csi_driver.k8s.clones import MANAGED_BY, SNAPSHOT_ANNOTATION, SOURCE_ANNOTATION
from csi_driver.k8s.leader import LeaderElector
from csi_driver.k8s.leases import parse_time
from csi_driver.ops import actions, view

log = logging.getLogger("csi_flashcopy.operations")

GROUP, VERSION = "flashcopy.csi.dev", "v1alpha1"
RESTORES, REFRESHES, NODES = "volumerestores", "volumerefreshes", "flashcopynodes"
SNAP_GROUP, SNAP_VERSION = "snapshot.storage.k8s.io", "v1"
LEASE_NAME = "csi-flashcopy-operations"
COMPONENT = "csi-flashcopy-controller"
WAITING_FOR_SPACE = "background copy waiting for space"
DONE = ("Completed", "Failed")


# A label selector as the API server parses it (k8s.io/apimachinery labels.Parse): comma-separated terms, each
# `key`, `!key`, `key=v`, `key==v`, `key!=v`, `key in (v,...)`, `key notin (v,...)`. The CRD carries the same
# pattern (charts/csi-flashcopy/crds), so a bad selector is refused at create; one stored before that ends Failed.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}"
_VALUE = rf"({_NAME})?"
_TERM = (rf" *(!{_KEY}|{_KEY} *(==|=|!=) *{_VALUE}|{_KEY} +(in|notin) *\( *{_VALUE}( *, *{_VALUE})* *\)|{_KEY}) *")
SELECTOR_PATTERN = rf"^{_TERM}(,{_TERM})*$"
SELECTOR_MAX = 1024
_SELECTOR = re.compile(SELECTOR_PATTERN)


def selector_problem(selector: object) -> str | None:
    """Why a VolumeRefresh's selector is not a label selector, or None."""
    if not isinstance(selector, str) or not selector.strip():
        return "a label selector is required"
    if len(selector) > SELECTOR_MAX:
        return f"longer than {SELECTOR_MAX} characters"
    if not _SELECTOR.match(selector):
        return f"{selector[:200]!r} is not a label selector (key=value, key!=value, key in (a,b), !key)"
    return None


def volume_mode(pvc: Any) -> str:
    """A PVC's volumeMode as ops.actions spells it (Kubernetes' default is Filesystem)."""
    return "block" if getattr(pvc.spec, "volume_mode", None) == "Block" else "filesystem"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Retry(Exception):
    """Not possible yet (a PVC not bound, a snapshot not ready): try again next poll, say why in the status."""


class Refused(Exception):
    """The operation cannot be done as asked: the object fails with this message."""


@dataclass(frozen=True)
class Ref:
    """A Kubernetes object an Event is about."""

    kind: str
    api_version: str
    namespace: str
    name: str
    uid: str


class Operations:
    def __init__(self, backend: Backend, api_client: Any, namespace: str, driver_name: str, *,
                 node_name: str = "local", poll: float = 2.0, elect: bool = True) -> None:
        from kubernetes import client

        self.backend = backend
        self.core: Any = client.CoreV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.namespace, self.driver_name, self.poll = namespace, driver_name, poll
        #: the name of the node a one-node backend serves (its records name no node)
        self.node_name = node_name or "local"
        self.leader = LeaderElector(api_client, namespace, LEASE_NAME) if elect else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, CopyStatus] | None = None  # mappings at the previous poll (None: no poll yet)
        self._published: dict[str, dict[str, Any]] = {}
        self._refs: dict[str, Ref] | None = None

    # -- lifecycle

    def start(self) -> Operations:
        if self.leader is not None:
            self.leader.start()
        self._thread = threading.Thread(target=self._run, name="operations", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.leader is not None:
            self.leader.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            if self.leader is not None and not self.leader.leading:
                self._last = None  # a new leader term starts from a fresh baseline
                continue
            try:
                self.pass_once()
            except Exception as e:
                log.warning("operations pass failed", extra={"fields": {"error": f"{type(e).__name__}: {e}"[:400]}})

    def pass_once(self) -> None:
        report = self.backend.report()
        self._refs = None
        self._publish(report)
        self._events(report)
        for obj in self._list(RESTORES):
            self._guard(obj, RESTORES, lambda o: self._restore(o, report))
        for obj in self._list(REFRESHES):
            self._guard(obj, REFRESHES, lambda o: self._refresh(o, report))

    # -- API helpers

    def _list(self, plural: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]
        return [o for o in items if (o.get("status") or {}).get("phase") not in DONE]

    def _patch_status(self, obj: dict[str, Any], plural: str, status: dict[str, Any]) -> None:
        md = obj["metadata"]
        old = obj.get("status") or {}
        if all(old.get(k) == v for k, v in status.items()):
            return
        status = {**status, "observedGeneration": md.get("generation", 0)} if plural == RESTORES else status
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, md["namespace"], plural, md["name"],
                                                          {"status": status})
        obj["status"] = {**old, **status}

    def _guard(self, obj: dict[str, Any], plural: str, step: Callable[[dict[str, Any]], None]) -> None:
        try:
            step(obj)
        except Retry as e:
            self._patch_status(obj, plural, {"phase": (obj.get("status") or {}).get("phase") or "Pending",
                                             "message": str(e)})
        except Refused as e:
            self._fail(obj, plural, str(e))
        except Exception as e:
            log.warning("operation step failed", extra={"fields": {
                "object": f"{plural}/{obj['metadata']['namespace']}/{obj['metadata']['name']}",
                "error": f"{type(e).__name__}: {e}"[:400]}})

    def _fail(self, obj: dict[str, Any], plural: str, message: str) -> None:
        self._patch_status(obj, plural, {"phase": "Failed", "message": message, "completionTime": _now()})
        self.event(_own_ref(obj), "Warning", "OperationFailed", message)

    def _read(self, what: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as e:
            if e.status == 404:
                raise Refused(f"{what} not found") from None
            raise

    def event(self, ref: Ref, type_: str, reason: str, message: str) -> None:
        now = _now()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {"kind": ref.kind, "apiVersion": ref.api_version, "namespace": ref.namespace,
                               "name": ref.name, "uid": ref.uid},
            "reason": reason, "message": message[:1024], "type": type_, "count": 1,
            "firstTimestamp": now, "lastTimestamp": now,
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": self.leader.identity if self.leader is not None else COMPONENT,
        }
        try:
            self.core.create_namespaced_event(ref.namespace, body)
        except Exception as e:
            log.warning("cannot record an Event", extra={"fields": {"reason": reason, "error": str(e)[:300]}})

    # -- FlashCopyNode status

    def _publish(self, report: Report) -> None:
        by_node: dict[str, Report] = {}
        for node in {v.node for v in report.volumes} | {m.node for m in report.mappings} | \
                {g.node for g in report.groups}:
            by_node[node] = Report(volumes=tuple(v for v in report.volumes if v.node == node),
                                   mappings=tuple(m for m in report.mappings if m.node == node),
                                   groups=tuple(g for g in report.groups if g.node == node))
        if not by_node:
            by_node[""] = Report()
        for node, part in by_node.items():
            doc = view.to_json(part)
            status = {"reachable": True, "summary": _summary(doc), **{k: doc[k] for k in ("volumes", "mappings",
                                                                                          "groups")}}
            self._write_node(node or self.node_name, status)
        for node in report.missing_nodes:
            self._write_node(node, {**self._published.get(node, {}), "reachable": False})

    def _write_node(self, name: str, status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        if self._published.get(name) == status:
            return
        body = {"status": {**status, "updated": _now()}}
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, NODES, name, body)
        except ApiException as e:
            if e.status != 404:
                raise
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, NODES, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "FlashCopyNode",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "csi-flashcopy"}}})
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, NODES, name, body)
        self._published[name] = status

    # -- Events from mapping transitions

    def refs(self) -> dict[str, Ref]:
        """Engine volume/snapshot id -> the PVC or VolumeSnapshot it is, for this driver's objects."""
        if self._refs is None:
            refs: dict[str, Ref] = {}
            for pv in self.core.list_persistent_volume().items:
                csi, claim = pv.spec.csi, pv.spec.claim_ref
                if csi is not None and csi.driver == self.driver_name and claim is not None:
                    refs[csi.volume_handle] = Ref("PersistentVolumeClaim", "v1", claim.namespace, claim.name,
                                                  claim.uid or "")
            contents = self.custom.list_cluster_custom_object(SNAP_GROUP, SNAP_VERSION, "volumesnapshotcontents")
            for c in contents["items"]:
                handle = (c.get("status") or {}).get("snapshotHandle")
                ref = c["spec"].get("volumeSnapshotRef") or {}
                if c["spec"].get("driver") == self.driver_name and handle and ref.get("name"):
                    refs[handle] = Ref("VolumeSnapshot", f"{SNAP_GROUP}/{SNAP_VERSION}", ref.get("namespace", ""),
                                       ref["name"], ref.get("uid", ""))
            self._refs = refs
        return self._refs

    def _events(self, report: Report) -> None:
        now = {m.id: m for m in report.mappings}
        last, self._last = self._last, now
        if last is None:
            return  # the first poll of a term is the baseline: only changes seen from here on are news
        live = {v.id for v in report.volumes if not v.hidden}
        for mid, m in now.items():
            before = last.get(mid)
            if before is None:
                if m.state == "idle_or_copied" and m.start_time:  # made and copied between two polls
                    self._about(m.target_id, "Normal", "CopyCompleted",
                                f"background copy from {m.source_id} complete: the volume is independent of it")
                continue
            restarted = m.start_time != before.start_time  # a refresh: started again, perhaps done already
            if m.state == "stopped" and before.state != "stopped":
                self._about(m.target_id, "Warning", "FlashCopyStopped",
                            f"FlashCopy mapping {m.id} from {m.source_id} stopped: {m.error or 'stopped'}")
            elif m.error.startswith(WAITING_FOR_SPACE) and not before.error.startswith(WAITING_FOR_SPACE):
                self._about(m.target_id, "Warning", "CopyWaitingForSpace", f"mapping {m.id}: {m.error}")
            elif m.state == "idle_or_copied" and (before.state == "copying" or restarted):
                self._about(m.target_id, "Normal", "CopyCompleted",
                            f"background copy from {m.source_id} complete: the volume is independent of it")
        for mid, before in last.items():
            if mid not in now and before.state == "copying" and before.target_id in live:
                self._about(before.target_id, "Normal", "CopyCompleted",
                            f"background copy from {before.source_id} complete: the volume is independent of it")

    def _about(self, engine_id: str, type_: str, reason: str, message: str) -> None:
        ref = self.refs().get(engine_id)
        log.info("flashcopy event", extra={"fields": {"volume": engine_id, "reason": reason, "message": message,
                                                      "object": f"{ref.kind}/{ref.namespace}/{ref.name}" if ref
                                                      else ""}})
        if ref is not None:
            self.event(ref, type_, reason, message)

    # -- objects: PVC -> volume handle, VolumeSnapshot -> snapshot handle

    def _volume_handle(self, ns: str, pvc_name: str) -> tuple[Any, str]:
        pvc = self._read(f"PVC {ns}/{pvc_name}", lambda: self.core.read_namespaced_persistent_volume_claim(
            pvc_name, ns))
        if pvc.status is None or pvc.status.phase != "Bound" or not pvc.spec.volume_name:
            raise Retry(f"PVC {ns}/{pvc_name} is not bound yet")
        pv = self._read(f"PV {pvc.spec.volume_name}", lambda: self.core.read_persistent_volume(pvc.spec.volume_name))
        if pv.spec.csi is None or pv.spec.csi.driver != self.driver_name:
            raise Refused(f"PVC {ns}/{pvc_name} is not a volume of {self.driver_name}")
        return pvc, pv.spec.csi.volume_handle

    def _snapshot_handle(self, ns: str, name: str) -> str:
        return self._snapshot(ns, name)[0]

    def _snapshot(self, ns: str, name: str) -> tuple[str, str]:
        """(snapshot handle, the source's volume mode as the snapshotter recorded it, "" if not)."""
        vs = self._read(f"VolumeSnapshot {ns}/{name}", lambda: self.custom.get_namespaced_custom_object(
            SNAP_GROUP, SNAP_VERSION, ns, "volumesnapshots", name))
        st = vs.get("status") or {}
        if st.get("error"):
            raise Refused(f"VolumeSnapshot {ns}/{name} failed: {st['error'].get('message', '')}")
        content = st.get("boundVolumeSnapshotContentName")
        if not st.get("readyToUse") or not content:
            raise Retry(f"VolumeSnapshot {ns}/{name} is not ready yet")
        vsc = self._read(f"VolumeSnapshotContent {content}", lambda: self.custom.get_cluster_custom_object(
            SNAP_GROUP, SNAP_VERSION, "volumesnapshotcontents", content))
        if vsc["spec"].get("driver") != self.driver_name:
            raise Refused(f"VolumeSnapshot {ns}/{name} is not a snapshot of {self.driver_name}")
        handle = (vsc.get("status") or {}).get("snapshotHandle")
        if not handle:
            raise Retry(f"VolumeSnapshotContent {content} has no snapshot handle yet")
        mode = {"Block": "block", "Filesystem": "filesystem"}.get(vsc["spec"].get("sourceVolumeMode") or "", "")
        return str(handle), mode

    # -- VolumeRestore

    def _restore(self, obj: dict[str, Any], report: Report) -> None:
        spec, st = obj["spec"], obj.get("status") or {}
        ns = obj["metadata"]["namespace"]
        phase = st.get("phase") or "Pending"
        if phase == "Restored":
            m = next((x for x in report.mappings if x.id == st.get("mappingId")), None)
            if m is not None and m.state == "stopped":
                raise Refused(f"the restore's background copy stopped: {m.error}")
            if m is None or m.state == "idle_or_copied":
                self._patch_status(obj, RESTORES, {"phase": "Completed", "progress": 100.0,
                                                   "message": "restored; the volume is independent of the snapshot",
                                                   "completionTime": _now()})
            else:
                self._patch_status(obj, RESTORES, {"progress": round(m.progress)})
            return
        if phase == "Restoring":
            # a previous leader may have restored and died before saying so: its mapping is then here
            started = parse_time(st.get("startTime"))
            m = next((x for x in report.mappings if x.restore and x.target_id == st.get("volumeHandle")
                      and x.start_time >= started - 1), None)
            if m is not None:
                self._restored(obj, m)
                return
        pvc, volume = self._volume_handle(ns, spec["pvcName"])
        snapshot, snap_mode = self._snapshot(ns, spec["snapshotName"])
        self._patch_status(obj, RESTORES, {"phase": "Restoring", "volumeHandle": volume, "snapshotHandle": snapshot,
                                           "startTime": _now(), "message": ""})
        try:
            m = actions.restore(self.backend, volume, snapshot,
                                copy_rate=int(spec.get("copyRate", DEFAULT_COPY_RATE)),
                                volume_mode=volume_mode(pvc), snapshot_mode=snap_mode)
        except Exception as e:
            raise Refused(actions.explain(e)) from None
        self._restored(obj, m)
        self.event(Ref("PersistentVolumeClaim", "v1", ns, pvc.metadata.name, pvc.metadata.uid), "Normal",
                   "Restored", f"restored in place from VolumeSnapshot {spec['snapshotName']} "
                   f"(VolumeRestore {obj['metadata']['name']})")

    def _restored(self, obj: dict[str, Any], m: CopyStatus) -> None:
        self._patch_status(obj, RESTORES, {"phase": "Restored", "mappingId": m.id, "node": m.node,
                                           "progress": round(m.progress),
                                           "message": "the volume shows the snapshot's data; copying in the "
                                                      "background"})

    # -- VolumeRefresh

    def _refresh(self, obj: dict[str, Any], report: Report) -> None:
        spec, st = obj["spec"], obj.get("status") or {}
        ns, uid = obj["metadata"]["namespace"], obj["metadata"]["uid"]
        phase = st.get("phase") or "Pending"
        if phase == "Copying":
            self._refresh_progress(obj, report)
            return
        why = selector_problem(spec.get("selector"))
        if why:  # the API server would answer 400 on every poll: fail the object once instead
            raise Refused(f"selector: {why}")
        pvcs = self._read_pvcs(ns, spec["selector"])
        if not pvcs:
            raise Refused(f"no PVC in {ns} matches {spec['selector']}")
        snap_name = spec.get("fromSnapshot") or st.get("snapshotName") or ""
        if not snap_name:
            snap_name = self._new_snapshot(ns, uid, pvcs, spec)
            self._patch_status(obj, REFRESHES, {"phase": "Snapshotting", "snapshotName": snap_name,
                                                "startTime": _now(), "message": ""})
        snapshot, snap_mode = self._snapshot(ns, snap_name)
        clones = []
        for pvc in sorted(pvcs, key=lambda p: p.metadata.name):
            entry: dict[str, Any] = {"pvc": pvc.metadata.name}
            ref = Ref("PersistentVolumeClaim", "v1", ns, pvc.metadata.name, pvc.metadata.uid)
            try:
                bound, volume = self._volume_handle(ns, pvc.metadata.name)
                entry["volumeHandle"] = volume
                done = actions.refresh(self.backend, volume, snapshot,
                                       copy_rate=int(spec.get("copyRate", DEFAULT_COPY_RATE)),
                                       volume_mode=volume_mode(bound), source_mode=snap_mode)
            except (Retry, Refused) as e:
                entry.update(phase="Failed", message=str(e))
            except Exception as e:
                entry.update(phase="Failed", message=actions.explain(e))
                self.event(ref, "Warning", "RefreshRefused", entry["message"])
            else:
                entry.update(phase="Copying", grainsToCopy=done.grains_to_copy, bytesToCopy=done.bytes_to_copy,
                             progress=round(done.mapping.progress), message="")
                self.core.patch_namespaced_persistent_volume_claim(pvc.metadata.name, ns, {
                    "metadata": {"annotations": {SNAPSHOT_ANNOTATION: snap_name}}})
                self.event(ref, "Normal", "Refreshed", f"refreshed to VolumeSnapshot {snap_name}: "
                           f"{done.grains_to_copy} grains ({view.human_bytes(done.bytes_to_copy)}) to copy")
            clones.append(entry)
        self._patch_status(obj, REFRESHES, {"phase": "Copying", "snapshotName": snap_name,
                                            "snapshotHandle": snapshot, "clones": clones,
                                            "startTime": st.get("startTime") or _now()})
        self._drop_old_snapshots(ns, keep=snap_name)
        self._refresh_progress(obj, self.backend.report())

    def _read_pvcs(self, ns: str, selector: str) -> list[Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            items: list[Any] = self.core.list_namespaced_persistent_volume_claim(ns, label_selector=selector).items
            return items
        except ApiException as e:
            if e.status == 400:  # the API server cannot parse it: asking again will not help
                raise Refused(f"selector {selector[:200]!r} refused by the API server: {e.reason}") from None
            raise

    def _new_snapshot(self, ns: str, uid: str, pvcs: list[Any], spec: dict[str, Any]) -> str:
        sources = {(p.metadata.annotations or {}).get(SOURCE_ANNOTATION, "") for p in pvcs}
        if len(sources) != 1 or "" in sources:
            raise Refused("the selected PVCs are not clones of one source PVC (annotation "
                          f"{SOURCE_ANNOTATION}): name the snapshot to refresh them to (fromSnapshot)")
        source = sources.pop()
        snap_class = spec.get("snapshotClassName") or ""
        if not snap_class:
            old = (pvcs[0].metadata.annotations or {}).get(SNAPSHOT_ANNOTATION, "")
            old_vs = self._maybe_snapshot(ns, old) if old else None
            snap_class = ((old_vs or {}).get("spec") or {}).get("volumeSnapshotClassName") or "flashcopy"
        name = f"{source}-refresh-{uid[:8]}"[:253]
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.create_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, ns, "volumesnapshots", {
                "apiVersion": f"{SNAP_GROUP}/{SNAP_VERSION}", "kind": "VolumeSnapshot",
                "metadata": {"name": name, "labels": {MANAGED_BY[0]: MANAGED_BY[1]},
                             "annotations": {SOURCE_ANNOTATION: source}},
                "spec": {"volumeSnapshotClassName": snap_class, "source": {"persistentVolumeClaimName": source}}})
        except ApiException as e:
            if e.status != 409:  # made by an earlier pass of this same refresh
                raise
        return name

    def _maybe_snapshot(self, ns: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            vs: dict[str, Any] = self.custom.get_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, ns,
                                                                          "volumesnapshots", name)
            return vs
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _drop_old_snapshots(self, ns: str, keep: str) -> None:
        """Snapshots the clone CLI or a refresh made, that no clone is made from any more: delete them (an old
        point in time left in the cascade would make the next refresh copy more)."""
        in_use = {(p.metadata.annotations or {}).get(SNAPSHOT_ANNOTATION) for p in
                  self.core.list_namespaced_persistent_volume_claim(ns).items} | {keep}
        snaps = self.custom.list_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, ns, "volumesnapshots",
                                                          label_selector=f"{MANAGED_BY[0]}={MANAGED_BY[1]}")
        for vs in snaps["items"]:
            name = vs["metadata"]["name"]
            if name not in in_use:
                log.info("deleting a clone snapshot no clone uses", extra={"fields": {"snapshot": f"{ns}/{name}"}})
                self.custom.delete_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, ns, "volumesnapshots", name)

    def _refresh_progress(self, obj: dict[str, Any], report: Report) -> None:
        st = obj.get("status") or {}
        clones = [dict(c) for c in st.get("clones", [])]
        for c in clones:
            if c.get("phase") != "Copying":
                continue
            m = actions.copy_into(report, c.get("volumeHandle", ""))
            if m is not None and m.state == "stopped":
                c.update(phase="Failed", message=f"background copy stopped: {m.error}")
            elif actions.copy_done(report, c.get("volumeHandle", "")):
                c.update(phase="Completed", progress=100)
            elif m is not None:
                c["progress"] = round(m.progress)
        active = [c for c in clones if c.get("phase") != "Failed"]
        progress = round(sum(c.get("progress", 0) for c in active) / len(active)) if active else 0
        status: dict[str, Any] = {"clones": clones, "progress": progress}
        if all(c.get("phase") in DONE for c in clones):
            failed = [c for c in clones if c.get("phase") == "Failed"]
            status.update(phase="Failed" if failed else "Completed", completionTime=_now(), message=(
                f"{len(failed)} of {len(clones)} clones not refreshed: " +
                "; ".join(f"{c['pvc']}: {c.get('message', '')}" for c in failed)) if failed
                else f"{len(clones)} clones refreshed")
            if failed:
                self.event(_own_ref(obj), "Warning", "OperationFailed", status["message"])
        self._patch_status(obj, REFRESHES, status)


def _own_ref(obj: dict[str, Any]) -> Ref:
    md = obj["metadata"]
    return Ref(obj["kind"], obj["apiVersion"], md["namespace"], md["name"], md.get("uid", ""))


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    vols, maps = doc["volumes"], doc["mappings"]
    to_copy = sum(m["bytesToCopy"] for m in maps)
    return {
        "volumes": sum(1 for v in vols if v["kind"] == "volume"),
        "snapshots": sum(1 for v in vols if v["kind"] == "snapshot"),
        "hidden": sum(1 for v in vols if v["kind"] == "hidden"),
        "mappings": len(maps), "copying": sum(1 for m in maps if m["state"] == "copying"),
        "stopped": sum(1 for m in maps if m["state"] == "stopped"),
        "bytesToCopy": to_copy, "bytesToClean": sum(m["bytesToClean"] for m in maps),
        "toCopy": view.human_bytes(to_copy),
    }


def start_for_serve(args: Any, backend: Backend, *, driver_name: str, node_id: str) -> Operations | None:
    """The operations loop `serve` runs beside the controller service, or None where it does not belong:
    --operations off, a node-only server, or (auto) no namespace to keep its objects in."""
    from csi_driver.k8s.apiclient import ApiUnreachable, api_client

    mode = getattr(args, "operations", "auto")
    if mode == "off" or getattr(args, "mode", "all") == "node":
        return None
    namespace = getattr(args, "namespace", "")
    if not namespace:
        if mode == "on":
            raise ValueError("--operations on needs --namespace (where its Lease and FlashCopyNode objects live)")
        return None
    try:
        client = api_client(getattr(args, "kubeconfig", "") or None)
    except ApiUnreachable as e:
        if mode == "on":
            raise ValueError(f"--operations on: {e}") from None
        log.info("operations off: no Kubernetes API", extra={"fields": {"why": str(e)}})
        return None
    ops = Operations(backend, client, namespace, driver_name, node_name=node_id,
                     poll=float(getattr(args, "operations_poll", 2.0) or 2.0))
    return ops.start()
