"""`csi-flashcopy clone`: dev/test copies of a PVC through the Kubernetes API.

One VolumeSnapshot of the source PVC, then N PVCs restored from it. With FlashCopy the snapshot and every clone
are instant and share unchanged grains, so many clones of a big volume cost little. Clones carry the
managed-by label below (what --delete selects on, so it never touches other PVCs) and an annotation naming
their snapshot, which --delete removes once no clone made from it remains.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from csi_driver.k8s import apiclient

MANAGED_BY = ("app.kubernetes.io/managed-by", "csi-flashcopy-clone")
SNAPSHOT_ANNOTATION = "flashcopy.csi.dev/clone-snapshot"
SOURCE_ANNOTATION = "flashcopy.csi.dev/clone-source"
SNAP_GROUP, SNAP_VERSION, SNAP_PLURAL = "snapshot.storage.k8s.io", "v1", "volumesnapshots"
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
POLL = 0.5

T = TypeVar("T")


class CloneError(Exception):
    """A one-line, user-facing failure (exit status 2)."""


def add_clone_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "clone", help="provision dev/test clones of a PVC through the Kubernetes API (one snapshot, N PVCs)"
    )
    p.add_argument("--namespace", "-n", required=True, help="namespace of the source PVC and the clones")
    p.add_argument("--from-pvc", metavar="SRC", help="source PVC to clone")
    p.add_argument("--snapshot-class", default="flashcopy", help="VolumeSnapshotClass (default flashcopy)")
    p.add_argument("--storage-class", help="StorageClass of the clones (default: the source PVC's)")
    p.add_argument("--size", help="size of each clone, e.g. 2Gi (default: the source's; larger is allowed)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--count", type=int, default=1, help="number of clones, named SRC-clone-1..N (default 1)")
    names.add_argument("--name", help="name of a single clone")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="label for the clones (repeatable)")
    p.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the snapshot and for binding, 0 = do not wait (default 300)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and let the API server validate the objects, create nothing")
    p.add_argument("--delete", action="store_true", help="delete the clones matching --selector (and their "
                   "snapshot once no clone of it remains)")
    p.add_argument("--selector", "-l", metavar="K=V[,K=V]", help="label selector of the clones to --delete")
    return p


@dataclass
class Api:
    core: Any
    storage: Any
    custom: Any


def run_clone(args: argparse.Namespace) -> int:
    try:
        api = _connect(args.kubeconfig)
        if args.delete:
            delete_clones(api, args)
        else:
            create_clones(api, args)
    except CloneError as e:
        print(f"csi-flashcopy clone: {e}", file=sys.stderr)
        return 2
    return 0


def _connect(kubeconfig: str | None) -> Api:
    from kubernetes import client

    try:
        api_client = apiclient.api_client(kubeconfig)
    except apiclient.ApiUnreachable as e:
        raise CloneError(str(e)) from None
    return Api(client.CoreV1Api(api_client), client.StorageV1Api(api_client), client.CustomObjectsApi(api_client))


def _call(what: str, fn: Callable[[], Any], *, missing: str | None = None) -> Any:
    """Run one API call (the Kubernetes client is untyped: Any); 404 returns None when `missing` is None, else
    becomes that error."""
    from kubernetes.client.exceptions import ApiException

    try:
        return fn()
    except ApiException as e:
        if e.status == 404 and missing is None:
            return None
        if e.status == 404:
            raise CloneError(missing) from None
        raise CloneError(f"{what}: {e.status} {e.reason}: {api_message(e)}") from None
    except Exception as e:  # connection refused, TLS, DNS: urllib3 errors
        raise CloneError(f"{what}: cannot reach the API server: {type(e).__name__}: {e}") from None


def api_message(e: Any) -> str:
    """The API server's one-line message of an ApiException."""
    import json

    try:
        return str(json.loads(e.body).get("message", "")).replace("\n", " ")
    except (TypeError, ValueError):
        return str(e.body or "").replace("\n", " ")[:300]


def parse_labels(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise CloneError(f"bad label {pair!r}: want key=value with a valid Kubernetes label key and value")
        out[key] = value
    return out


def parse_size(text: str) -> Decimal:
    from kubernetes.utils import parse_quantity

    try:
        size = Decimal(parse_quantity(text))
    except ValueError:
        raise CloneError(f"bad size {text!r}: want a quantity such as 2Gi or 500Mi") from None
    if size <= 0:
        raise CloneError(f"bad size {text!r}: must be positive")
    return size


def create_clones(api: Api, args: argparse.Namespace) -> None:
    ns = args.namespace
    if not args.from_pvc:
        raise CloneError("--from-pvc is required (or --delete --selector to remove clones)")
    if args.size:
        parse_size(args.size)
    if args.count < 1:
        raise CloneError(f"bad --count {args.count}: must be at least 1")
    labels = dict(parse_labels(args.label))
    labels[MANAGED_BY[0]] = MANAGED_BY[1]
    deadline = time.monotonic() + max(args.wait, 0.0)
    dry = "All" if args.dry_run else None

    src = _call(f"reading PVC {ns}/{args.from_pvc}",
                lambda: api.core.read_namespaced_persistent_volume_claim(args.from_pvc, ns),
                missing=f"source PVC {ns}/{args.from_pvc} not found")
    if src.status.phase != "Bound":
        raise CloneError(f"source PVC {ns}/{args.from_pvc} is {src.status.phase}, not Bound: nothing to snapshot")
    src_size_text = (src.status.capacity or {}).get("storage") or src.spec.resources.requests["storage"]
    size_text = args.size or src_size_text
    if parse_size(size_text) < parse_size(src_size_text):
        raise CloneError(f"bad size {size_text}: smaller than the source's {src_size_text}")

    class_name = args.storage_class or src.spec.storage_class_name
    if not class_name:
        raise CloneError(f"source PVC {ns}/{args.from_pvc} has no storage class: pass --storage-class")
    sc = _call(f"reading StorageClass {class_name}", lambda: api.storage.read_storage_class(class_name),
               missing=f"unknown StorageClass {class_name}")
    _call(f"reading VolumeSnapshotClass {args.snapshot_class}",
          lambda: api.custom.get_cluster_custom_object(SNAP_GROUP, SNAP_VERSION, "volumesnapshotclasses",
                                                       args.snapshot_class),
          missing=f"unknown VolumeSnapshotClass {args.snapshot_class}")

    names = [args.name] if args.name else [f"{args.from_pvc}-clone-{i}" for i in range(1, args.count + 1)]
    for name in names:
        if _call(f"reading PVC {ns}/{name}", functools.partial(
                api.core.read_namespaced_persistent_volume_claim, name, ns)) is not None:
            raise CloneError(f"PVC {ns}/{name} already exists: pick another --name, or --delete the old clones")

    snapshot = {
        "apiVersion": f"{SNAP_GROUP}/{SNAP_VERSION}", "kind": "VolumeSnapshot",
        "metadata": {"generateName": f"{args.from_pvc}-clone-", "labels": labels,
                     "annotations": {SOURCE_ANNOTATION: args.from_pvc}},
        "spec": {"volumeSnapshotClassName": args.snapshot_class,
                 "source": {"persistentVolumeClaimName": args.from_pvc}},
    }
    created = _call("creating the VolumeSnapshot", lambda: api.custom.create_namespaced_custom_object(
        SNAP_GROUP, SNAP_VERSION, ns, SNAP_PLURAL, snapshot, dry_run=dry))
    snap_name = created["metadata"]["name"]
    if not args.dry_run and args.wait > 0:
        _wait_snapshot(api, ns, snap_name, deadline, args.wait)

    for name in names:
        pvc = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "labels": labels,
                         "annotations": {SNAPSHOT_ANNOTATION: snap_name, SOURCE_ANNOTATION: args.from_pvc}},
            "spec": {"storageClassName": class_name, "accessModes": src.spec.access_modes,
                     "volumeMode": src.spec.volume_mode or "Filesystem",
                     "resources": {"requests": {"storage": size_text}},
                     "dataSource": {"apiGroup": SNAP_GROUP, "kind": "VolumeSnapshot", "name": snap_name}},
        }
        _call(f"creating PVC {ns}/{name}",
              functools.partial(api.core.create_namespaced_persistent_volume_claim, ns, pvc, dry_run=dry))

    if args.dry_run:
        for name in names:
            print(f"{name} would be created ({size_text}, {class_name}, from a new snapshot of {args.from_pvc})")
        return
    if sc.volume_binding_mode == "WaitForFirstConsumer":
        for name in names:
            print(f"{name} Pending (StorageClass {class_name} is WaitForFirstConsumer: binds when a pod uses it)")
        return
    for name in names:
        phase = _wait_bound(api, ns, name, deadline, args.wait) if args.wait > 0 else "Pending"
        print(f"{name} {phase}")


def _wait_snapshot(api: Api, ns: str, name: str, deadline: float, wait: float) -> None:
    last_error = ""
    while True:
        vs = _call(f"reading VolumeSnapshot {ns}/{name}", lambda: api.custom.get_namespaced_custom_object(
            SNAP_GROUP, SNAP_VERSION, ns, SNAP_PLURAL, name)) or {}
        status = vs.get("status") or {}
        if status.get("readyToUse"):
            return
        last_error = ((status.get("error") or {}).get("message") or last_error).replace("\n", " ")
        if time.monotonic() > deadline:
            # nothing depends on it yet: do not leave it behind
            _call(f"deleting VolumeSnapshot {ns}/{name}", lambda: api.custom.delete_namespaced_custom_object(
                SNAP_GROUP, SNAP_VERSION, ns, SNAP_PLURAL, name))
            detail = f" (last error: {last_error})" if last_error else ""
            raise CloneError(f"timed out after {wait:g}s waiting for VolumeSnapshot {ns}/{name} to be ready; "
                             f"deleted it{detail}")
        time.sleep(POLL)


def _wait_bound(api: Api, ns: str, name: str, deadline: float, wait: float) -> str:
    while True:
        pvc = _call(f"reading PVC {ns}/{name}", lambda: api.core.read_namespaced_persistent_volume_claim(name, ns))
        phase = pvc.status.phase if pvc is not None else "missing"
        if phase == "Bound":
            return phase
        if time.monotonic() > deadline:
            raise CloneError(f"timed out after {wait:g}s waiting for PVC {ns}/{name} to bind (it is {phase}; "
                             f"`kubectl -n {ns} describe pvc {name}` shows why)")
        time.sleep(POLL)


def delete_clones(api: Api, args: argparse.Namespace) -> None:
    ns = args.namespace
    if not args.selector:
        raise CloneError("--delete needs --selector K=V (the clones' labels)")
    managed = f"{MANAGED_BY[0]}={MANAGED_BY[1]}"
    pvcs = _call("listing PVCs", lambda: api.core.list_namespaced_persistent_volume_claim(
        ns, label_selector=f"{managed},{args.selector}")).items
    if not pvcs:
        print(f"no clones in {ns} match {args.selector}", file=sys.stderr)
        return
    deadline = time.monotonic() + max(args.wait, 0.0)
    gone: set[str] = set()
    snapshots: set[str] = set()
    for pvc in pvcs:
        name = pvc.metadata.name
        _call(f"deleting PVC {ns}/{name}", functools.partial(
            api.core.delete_namespaced_persistent_volume_claim, name, ns))
        gone.add(name)
        snapshots.add((pvc.metadata.annotations or {}).get(SNAPSHOT_ANNOTATION, ""))
        print(f"{name} deleted")
    remaining = _call("listing PVCs", lambda: api.core.list_namespaced_persistent_volume_claim(
        ns, label_selector=managed)).items
    in_use = {(p.metadata.annotations or {}).get(SNAPSHOT_ANNOTATION) for p in remaining
              if p.metadata.name not in gone and p.metadata.deletion_timestamp is None}
    deleted_snaps = []
    for snap in sorted(snapshots - in_use - {""}):
        vs = _call(f"reading VolumeSnapshot {ns}/{snap}", functools.partial(
            api.custom.get_namespaced_custom_object, SNAP_GROUP, SNAP_VERSION, ns, SNAP_PLURAL, snap))
        if vs is None or (vs["metadata"].get("labels") or {}).get(MANAGED_BY[0]) != MANAGED_BY[1]:
            continue  # never delete a snapshot this command did not make
        _call(f"deleting VolumeSnapshot {ns}/{snap}", functools.partial(
            api.custom.delete_namespaced_custom_object, SNAP_GROUP, SNAP_VERSION, ns, SNAP_PLURAL, snap))
        deleted_snaps.append(snap)
        print(f"volumesnapshot/{snap} deleted")
    if args.wait <= 0:
        return
    for name in sorted(gone):
        _wait_gone(f"PVC {ns}/{name}", functools.partial(api.core.read_namespaced_persistent_volume_claim, name, ns),
                   deadline, args.wait)
    for snap in deleted_snaps:
        _wait_gone(f"VolumeSnapshot {ns}/{snap}", functools.partial(
            api.custom.get_namespaced_custom_object, SNAP_GROUP, SNAP_VERSION, ns, SNAP_PLURAL, snap),
            deadline, args.wait)


def _wait_gone(what: str, read: Callable[[], Any], deadline: float, wait: float) -> None:
    while _call(f"reading {what}", read) is not None:
        if time.monotonic() > deadline:
            raise CloneError(f"timed out after {wait:g}s waiting for {what} to go away")
        time.sleep(POLL)
