"""`csi-flashcopy status | restore | refresh`: the operator's commands.

Two ways in, the same operations:
- a cluster (`--namespace`, optional `--kubeconfig`): status reads the FlashCopyNode objects the leading
  controller keeps; restore and refresh create a VolumeRestore / VolumeRefresh and follow its status;
- a local install (`--state-dir` or `--engine-endpoint`): the node engine process (or, when none runs, the
  engine opened here) is asked directly, with engine ids (`status` prints them).

Exit codes: 0 done (status: nothing stopped or broken); 1 refused or failed (status: some mapping stopped or
some volume is abnormal); 2 bad arguments or unreachable; 3 --wait timed out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from csi_driver.api import Backend
from csi_driver.ops import actions, view
from csi_driver.ops.reconciler import GROUP, NODES, REFRESHES, RESTORES, VERSION

OK, FAILED, USAGE, TIMEOUT = 0, 1, 2, 3


class CommandError(Exception):
    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def _source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="local install: the state directory (its engine.sock when an engine runs)")
    p.add_argument("--engine-endpoint", help="local install: the node engine process, unix:///path")
    p.add_argument("--kubeconfig", help="cluster: kubeconfig file (default $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--namespace", "-n", help="cluster: the namespace (status: the driver's namespace, where the "
                   "FlashCopyNode objects are; restore/refresh: the PVCs' namespace)")


def add_parsers(sub: Any) -> None:
    st = sub.add_parser("status", help="volumes, snapshots, clones and their FlashCopy mappings (state, rates, "
                        "progress, bytes left, errors), consistency groups, hidden nodes")
    _source_flags(st)
    st.add_argument("-o", "--output", choices=("table", "json"), default="table")
    st.add_argument("--watch", action="store_true", help="redraw every --interval seconds, a progress bar per "
                    "background copy or cleaning (Ctrl-C stops)")
    st.add_argument("--interval", type=float, default=1.0)

    rs = sub.add_parser("restore", help="put a volume back to a snapshot of it, in place (reverse FlashCopy): "
                        "the PVC and PV stay, every other snapshot is kept; refused while the volume is in use")
    _source_flags(rs)
    rs.add_argument("--pvc", help="cluster: the PVC to restore")
    rs.add_argument("--snapshot", required=True, help="cluster: a VolumeSnapshot of that PVC; local: a snapshot id")
    rs.add_argument("--volume", help="local: the volume id to restore")
    rs.add_argument("--copy-rate", type=int, default=None, help="background copy rate 0-150 (default 50)")
    rs.add_argument("--wait", nargs="?", type=float, const=3600.0, default=None, metavar="SECONDS",
                    help="wait (default up to an hour) until the background copy is done, showing progress")

    rf = sub.add_parser("refresh", help="refresh dev/test clones to a new point in time of their source, copying "
                        "only the grains changed on either side; refused per clone while it is in use")
    _source_flags(rf)
    rf.add_argument("--selector", "-l", help="cluster: label selector of the clone PVCs")
    rf.add_argument("--from-snapshot", help="cluster: refresh to this VolumeSnapshot (default: a new snapshot of "
                    "the clones' source PVC); local: the source id (a snapshot or volume)")
    rf.add_argument("--volume", action="append", default=[], help="local: a clone's volume id (repeatable)")
    rf.add_argument("--snapshot-class", help="cluster: VolumeSnapshotClass of the new snapshot")
    rf.add_argument("--copy-rate", type=int, default=None, help="background copy rate 0-150 (default 50)")
    rf.add_argument("--wait", nargs="?", type=float, const=3600.0, default=None, metavar="SECONDS",
                    help="wait until every clone's copy is done, showing progress")


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "status":
            return _status(args)
        if args.command == "restore":
            return _restore(args)
        return _refresh(args)
    except CommandError as e:
        print(f"csi-flashcopy {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return FAILED


# -- where the answers come from


def _cluster(args: argparse.Namespace) -> bool:
    local = bool(args.state_dir or args.engine_endpoint)
    if local and (args.kubeconfig or args.namespace):
        raise CommandError("give either --state-dir/--engine-endpoint (local) or --namespace/--kubeconfig "
                           "(cluster), not both")
    if not local and not args.namespace:
        raise CommandError("say where: --namespace NS (cluster) or --state-dir DIR / --engine-endpoint E (local)")
    return not local


@contextmanager
def local_backend(args: argparse.Namespace) -> Iterator[Backend]:
    """The node engine process when one answers, else the engine opened here (refused while another process
    holds the state directory)."""
    from csi_driver.engine import errors
    from csi_driver.remote.client import RemoteBackend
    from csi_driver.remote.service import default_endpoint

    endpoint = args.engine_endpoint or default_endpoint(args.state_dir)
    remote = RemoteBackend(endpoint)
    if remote.is_ready():
        try:
            yield remote
        finally:
            remote.close()
        return
    remote.close()
    if args.engine_endpoint:
        raise CommandError(f"the engine at {endpoint} does not answer")
    from csi_driver.embedded import EmbeddedBackend

    try:
        backend = EmbeddedBackend.open(args.state_dir)
    except errors.EngineLocked:
        raise CommandError(f"{args.state_dir} is held by a process that serves no engine socket (serve --engine "
                           "embedded): run the command against its engine, or stop it") from None
    try:
        yield backend
    finally:
        backend.close()


def _custom(args: argparse.Namespace) -> Any:
    """A CustomObjectsApi for the cluster the arguments name."""
    from kubernetes import client

    from csi_driver.k8s.apiclient import ApiUnreachable, api_client

    try:
        return client.CustomObjectsApi(api_client(args.kubeconfig))
    except ApiUnreachable as e:
        raise CommandError(str(e)) from None


def _api(what: str, fn: Callable[[], Any]) -> Any:
    from kubernetes.client.exceptions import ApiException

    from csi_driver.k8s.clones import api_message

    try:
        return fn()
    except ApiException as e:
        raise CommandError(f"{what}: {e.status} {e.reason}: {api_message(e)}") from None
    except Exception as e:
        raise CommandError(f"{what}: cannot reach the API server: {type(e).__name__}: {e}") from None


# -- status


def _doc(args: argparse.Namespace) -> dict[str, Any]:
    if _cluster(args):
        custom = _custom(args)
        nodes = _api("listing FlashCopyNode objects", lambda: custom.list_namespaced_custom_object(
            GROUP, VERSION, args.namespace, NODES))["items"]
        docs = []
        for n in nodes:
            st = n.get("status") or {}
            docs.append({"volumes": st.get("volumes", []), "mappings": st.get("mappings", []),
                         "groups": st.get("groups", []),
                         "missingNodes": [] if st.get("reachable", True) else [n["metadata"]["name"]]})
        return view.merge(docs)
    with local_backend(args) as backend:
        return view.to_json(backend.report())


def _unhealthy(doc: dict[str, Any]) -> bool:
    return any(m["state"] == "stopped" for m in doc["mappings"]) or \
        any(v["condition"] for v in doc["volumes"] if v["kind"] != "hidden") or bool(doc["missingNodes"])


def _status(args: argparse.Namespace) -> int:
    if not args.watch:
        doc = _doc(args)
        if args.output == "json":
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            from rich.console import Console

            # piped: wide enough that no column is cut (ids name their node)
            Console(width=None if sys.stdout.isatty() else 240).print(view.render(doc))
        return FAILED if _unhealthy(doc) else OK
    from rich.live import Live

    doc = _doc(args)
    with Live(view.render(doc), refresh_per_second=4) as live:
        while True:
            time.sleep(max(0.2, args.interval))
            doc = _doc(args)
            live.update(view.render(doc))


# -- restore and refresh


def _rate(args: argparse.Namespace) -> int:
    from csi_driver.engine.model import DEFAULT_COPY_RATE

    rate = DEFAULT_COPY_RATE if args.copy_rate is None else args.copy_rate
    if not 0 <= rate <= 150:
        raise CommandError(f"--copy-rate must be 0-150, got {rate}")
    return int(rate)


def _restore(args: argparse.Namespace) -> int:
    rate = _rate(args)
    if not _cluster(args):
        if not args.volume:
            raise CommandError("a local restore needs --volume ID (and --snapshot ID)")
        with local_backend(args) as backend:
            try:
                m = actions.restore(backend, args.volume, args.snapshot, copy_rate=rate)
            except Exception as e:
                raise CommandError(actions.explain(e), FAILED) from None
            print(f"{args.volume} restored from {args.snapshot} (mapping {m.id}, {m.progress:.0f}% copied)")
            if args.wait is not None:
                return _wait_local(backend, [args.volume], args.wait)
        return OK
    if not args.pvc:
        raise CommandError("restore in a cluster needs --pvc NAME and --snapshot NAME")
    custom = _custom(args)
    spec: dict[str, Any] = {"pvcName": args.pvc, "snapshotName": args.snapshot}
    if args.copy_rate is not None:
        spec["copyRate"] = rate
    obj = _api("creating the VolumeRestore", lambda: custom.create_namespaced_custom_object(
        GROUP, VERSION, args.namespace, RESTORES, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "VolumeRestore",
            "metadata": {"generateName": f"{args.pvc}-restore-"}, "spec": spec}))
    name = obj["metadata"]["name"]
    print(f"volumerestore/{name} created")
    until = ("Completed", "Failed") if args.wait is not None else ("Restored", "Completed", "Failed")
    return _follow(custom, args.namespace, RESTORES, name, until, args.wait or 120.0)


def _refresh(args: argparse.Namespace) -> int:
    rate = _rate(args)
    if not _cluster(args):
        if not args.volume or not args.from_snapshot:
            raise CommandError("a local refresh needs --volume ID (repeatable) and --from-snapshot SOURCE_ID")
        code = OK
        with local_backend(args) as backend:
            for vid in args.volume:
                try:
                    r = actions.refresh(backend, vid, args.from_snapshot, copy_rate=rate)
                except Exception as e:
                    print(f"{vid}: not refreshed: {actions.explain(e)}", file=sys.stderr)
                    code = FAILED
                    continue
                print(f"{vid} refreshed from {args.from_snapshot}: {r.grains_to_copy} grains "
                      f"({view.human_bytes(r.bytes_to_copy)}) to copy")
            if args.wait is not None:
                code = max(code, _wait_local(backend, args.volume, args.wait))
        return code
    if not args.selector:
        raise CommandError("refresh in a cluster needs --selector K=V (the clones' labels)")
    custom = _custom(args)
    spec: dict[str, Any] = {"selector": args.selector}
    if args.from_snapshot:
        spec["fromSnapshot"] = args.from_snapshot
    if args.snapshot_class:
        spec["snapshotClassName"] = args.snapshot_class
    if args.copy_rate is not None:
        spec["copyRate"] = rate
    obj = _api("creating the VolumeRefresh", lambda: custom.create_namespaced_custom_object(
        GROUP, VERSION, args.namespace, REFRESHES, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "VolumeRefresh",
            "metadata": {"generateName": "refresh-"}, "spec": spec}))
    name = obj["metadata"]["name"]
    print(f"volumerefresh/{name} created")
    until = ("Completed", "Failed") if args.wait is not None else ("Copying", "Completed", "Failed")
    return _follow(custom, args.namespace, REFRESHES, name, until, args.wait or 300.0)


def _follow(custom: Any, ns: str, plural: str, name: str, until: tuple[str, ...], timeout: float) -> int:
    """Show the object's phase and progress until it reaches one of `until`."""
    from rich.progress import BarColumn, Progress, TextColumn

    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  transient=not sys.stdout.isatty()) as bar:
        task = bar.add_task(name, total=100)
        while True:
            obj = _api(f"reading {plural}/{name}", lambda: custom.get_namespaced_custom_object(
                GROUP, VERSION, ns, plural, name))
            status = obj.get("status") or {}
            phase = status.get("phase") or "Pending"
            bar.update(task, completed=float(status.get("progress") or 0), description=f"{name} {phase}")
            if phase in until:
                break
            if time.monotonic() > deadline:
                print(f"{plural}/{name}: still {phase} after {timeout:.0f} s: {status.get('message', '')}",
                      file=sys.stderr)
                return TIMEOUT
            time.sleep(0.5)
    for c in status.get("clones", []):
        print(f"  {c.get('pvc')}: {c.get('phase')} {c.get('grainsToCopy', '')} grains to copy "
              f"{c.get('message', '')}".rstrip())
    print(f"{plural}/{name}: {status.get('phase')}: {status.get('message', '')}".rstrip(": "))
    return FAILED if status.get("phase") == "Failed" else OK


def _wait_local(backend: Backend, volume_ids: list[str], timeout: float) -> int:
    from rich.progress import Progress

    deadline = time.monotonic() + timeout
    with Progress(transient=not sys.stdout.isatty()) as bar:
        tasks = {v: bar.add_task(v, total=100) for v in volume_ids}
        while True:
            report = backend.report()
            for v, t in tasks.items():
                m = actions.copy_into(report, v)
                bar.update(t, completed=100 if actions.copy_done(report, v) else (m.progress if m else 100))
            if all(actions.copy_done(report, v) for v in volume_ids):
                return OK
            if time.monotonic() > deadline:
                return TIMEOUT
            time.sleep(0.5)
