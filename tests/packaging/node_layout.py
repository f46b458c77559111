"""Which container of a rendered node pod runs the node data path (losetup, mkfs, mount into the kubelet dir),
and what it must have for its mounts to reach the kubelet and the host. Used by the packaging test (helm
template, every layout) and by tests/kubelet/node.py (the pod the API server holds, before it runs as host
processes, which share the host's mount namespace and so could never show a missing mount)."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def _is_driver(c: Obj) -> bool:
    return c["image"].split("@")[0].rsplit("/", 1)[-1].split(":")[0] == "csi-flashcopy"


def _flag(args: list[str], flag: str) -> str | None:
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def mounting_containers(spec: Obj) -> list[Obj]:
    """The driver containers (init ones too) of a pod spec that mount: `engine` (the node engine process runs
    NodeStage/NodePublish for the plugin over the engine API), `doctor` (probes a FUSE mount), and `serve`
    serving the Node service unless it hands the data path to an engine process in another container
    (--engine=process)."""
    out = []
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        args = c.get("args", [])
        if not _is_driver(c) or not args:
            continue
        serves_node = args[0] == "serve" and _flag(args, "--mode") in ("all", "node", None)
        if args[0] in ("engine", "doctor") or (serves_node and _flag(args, "--engine") not in ("process", "cluster")):
            out.append(c)
    return out


def layout_problems(spec: Obj, kubelet_dir: str, state_dir: str) -> list[str]:
    """Why a mount made by one of the pod's mounting containers would not reach the kubelet (empty: none)."""
    by_path = {v["name"]: v["hostPath"]["path"].rstrip("/") for v in spec.get("volumes", []) if "hostPath" in v}
    problems = []
    mounters = mounting_containers(spec)
    if not mounters:
        problems.append("no container runs the node data path")
    for c in mounters:
        name = c["name"]
        mounts = {by_path.get(m["name"]): m for m in c.get("volumeMounts", [])}
        for host, why in ((kubelet_dir, "staging and publish mounts for Pods"),
                          (state_dir, "the FUSE export the loop devices sit on")):
            m = mounts.get(host.rstrip("/"))
            if m is None:
                problems.append(f"{name}: does not mount {host} ({why} would stay in its own mount namespace)")
            elif m["mountPath"].rstrip("/") != host.rstrip("/"):
                problems.append(f"{name}: mounts {host} at {m['mountPath']}, not at the same path")
            elif m.get("mountPropagation") != "Bidirectional":
                problems.append(f"{name}: {host} without mountPropagation Bidirectional "
                                f"({m.get('mountPropagation', 'None')}): its mounts do not reach the host")
        for host in ("/dev", "/sys"):
            m = mounts.get(host)
            if m is None or m["mountPath"] != host:
                problems.append(f"{name}: does not mount the host's {host} at {host}")
        if not (c.get("securityContext") or {}).get("privileged"):
            problems.append(f"{name}: not privileged (Bidirectional propagation, loop devices and mount need it)")
    return problems
