"""A Report as operators read it: one JSON document (`status -o json`), tables, progress bars (`--watch`).

JSON keys (stable, camelCase as in Kubernetes objects): `volumes`, `mappings`, `groups`, `missingNodes`.
A volume's `kind` is volume, snapshot or hidden (deleted, kept for the copies that still read through it); a
mapping's `kind` is snapshot (its target is a snapshot), clone, or restore (reverse FlashCopy onto a volume).
"""

from __future__ import annotations

from typing import Any

from csi_driver.api import CopyStatus, Report, VolumeStatus
from csi_driver.csi import objects as o


def volume_kind(v: VolumeStatus) -> str:
    if v.hidden:
        return "hidden"
    return "snapshot" if v.attrs.get(o.KIND) == o.KIND_SNAPSHOT else "volume"


def mapping_kind(m: CopyStatus, kinds: dict[str, str]) -> str:
    if m.restore:
        return "restore"
    return "snapshot" if kinds.get(m.target_id) == "snapshot" else "clone"


def to_json(r: Report) -> dict[str, Any]:
    kinds = {v.id: volume_kind(v) for v in r.volumes}
    volumes = []
    for v in r.volumes:
        item: dict[str, Any] = {
            "id": v.id, "name": v.attrs.get(o.NAME, v.name if not v.hidden else ""), "kind": kinds[v.id],
            "size": v.size, "allocatedBytes": v.allocated_bytes, "node": v.node or v.attrs.get(o.NODE, ""),
            "staged": v.staged, "condition": v.condition, "createdAt": v.created_at,
        }
        if v.attrs.get(o.SOURCE_VOLUME):
            item["snapshotOf"] = v.attrs[o.SOURCE_VOLUME]
        if v.attrs.get(o.SOURCE):
            item["contentSource"] = v.attrs[o.SOURCE]
        if v.hidden:
            item["dependents"] = list(v.dependents)
        volumes.append(item)
    mappings = [{
        "id": m.id, "kind": mapping_kind(m, kinds), "source": m.source_id, "target": m.target_id,
        "state": m.state, "copyRate": m.copy_rate, "cleanRate": m.clean_rate, "progress": m.progress,
        "bytesToCopy": m.bytes_to_copy, "bytesToClean": m.bytes_to_clean, "error": m.error,
        "incremental": m.incremental, "group": m.group_id, "startTime": m.start_time, "node": m.node,
    } for m in r.mappings]
    groups = [{"id": g.id, "name": g.name, "state": g.state, "mappings": list(g.mapping_ids),
               "startTime": g.start_time, "node": g.node} for g in r.groups]
    return {"volumes": volumes, "mappings": mappings, "groups": groups, "missingNodes": list(r.missing_nodes)}


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document from several nodes' documents."""
    out: dict[str, Any] = {"volumes": [], "mappings": [], "groups": [], "missingNodes": []}
    for d in docs:
        for key in out:
            out[key] += d.get(key, [])
    return out


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render(doc: dict[str, Any]) -> Any:
    """A rich renderable of a `to_json` document: volumes, mappings (a bar per background copy or cleaning),
    groups."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    vt = Table(title="Volumes", title_justify="left", expand=False)
    for col in ("ID", "NAME", "KIND", "SIZE", "ALLOCATED", "NODE", "STAGED", "CONDITION"):
        vt.add_column(col)
    for v in doc["volumes"]:
        cond = v["condition"] or (f"kept for {', '.join(v['dependents'])}" if v["kind"] == "hidden" else "")
        vt.add_row(v["id"], v["name"], v["kind"], human_bytes(v["size"]), human_bytes(v["allocatedBytes"]),
                   v["node"], "yes" if v["staged"] else "", Text(cond, style="red" if v["condition"] else ""))
    mt = Table(title="Mappings", title_justify="left", expand=False)
    for col in ("ID", "KIND", "SOURCE", "TARGET", "STATE", "RATE", "PROGRESS", "", "LEFT", "ERROR"):
        mt.add_column(col)
    for m in doc["mappings"]:
        # a copy at rate 0 (a no-copy snapshot, a paused clone) moves grains only on copy-on-write: no bar
        busy = m["state"] == "stopping" or (m["state"] == "copying" and m["copyRate"] > 0)
        bar: Any = ProgressBar(total=100.0, completed=m["progress"], width=20) if busy else ""
        left = m["bytesToCopy"] if m["state"] == "copying" else m["bytesToClean"]
        mt.add_row(m["id"], m["kind"], m["source"], m["target"],
                   Text(m["state"], style="red" if m["state"] == "stopped" else ""),
                   f"{m['copyRate']}/{m['cleanRate']}", f"{m['progress']:.1f}%", bar,
                   human_bytes(left) if busy else ("no copy" if m["state"] == "copying" else ""),
                   Text(m["error"], style="red"))
    parts: list[Any] = [vt, mt]
    if doc["groups"]:
        gt = Table(title="Consistency groups", title_justify="left", expand=False)
        for col in ("ID", "NAME", "STATE", "MAPPINGS"):
            gt.add_column(col)
        for g in doc["groups"]:
            gt.add_row(g["id"], g["name"], g["state"], str(len(g["mappings"])))
        parts.append(gt)
    if doc["missingNodes"]:
        parts.append(Text(f"not answering (their objects are missing above): {', '.join(doc['missingNodes'])}",
                          style="yellow"))
    return Group(*parts)
