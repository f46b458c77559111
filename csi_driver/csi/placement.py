"""Which node a new volume goes to, and whether a copy may be made where its source lives (CSI topology).

Volumes are node-local: the topology key `topology.<driver>/node` names one node. A new volume goes to the first
live node, in the request's order (preferred, then requisite; then, without requisite, any live node with the
most free space first), that has the space; when none has, the first live one (volumes are thin: space is taken
as data is written). A snapshot, clone or restore is made on its source's node: when the requisite topology
excludes that node, RESOURCE_EXHAUSTED names the node, so external-provisioner drops the selected node and the
scheduler tries again (NOT_FOUND or INVALID_ARGUMENT would pin the claim to the wrong node for good).
"""

from __future__ import annotations

from collections.abc import Sequence

from csi_driver.api import NodeInfo, Volume
from csi_driver.csi import objects as o
from csi_driver.csi.errors import resource_exhausted
from csi_driver.csi.settings import Settings
from csi_driver.proto_gen import csi_pb2


def node_name(info: NodeInfo, settings: Settings) -> str:
    return info.id or settings.node_id


def volume_node(v: Volume, settings: Settings) -> str:
    return v.attrs.get(o.NODE) or settings.node_id


def _nodes_of(topologies: Sequence[csi_pb2.Topology], key: str) -> tuple[list[str], bool]:
    """The nodes named, in order; any=True when a topology does not constrain the node at all."""
    names: list[str] = []
    any_node = False
    for t in topologies:
        node = t.segments.get(key)
        if node is None:
            any_node = True
        elif node not in names:
            names.append(node)
    return names, any_node


def allowed(req: csi_pb2.TopologyRequirement | None, settings: Settings) -> list[str] | None:
    """The nodes the requisite topology allows (None: any node)."""
    if req is None or not req.requisite:
        return None
    names, any_node = _nodes_of(req.requisite, settings.topology_key)
    return None if any_node else names


def choose_node(nodes: Sequence[NodeInfo], req: csi_pb2.TopologyRequirement | None, size: int,
                settings: Settings) -> str:
    """The node for a new volume of `size` bytes (module doc); RESOURCE_EXHAUSTED when no allowed node is live."""
    by_name = {node_name(n, settings): n for n in nodes}
    permitted = allowed(req, settings)
    order: list[str] = []
    if req is not None:
        for group in (req.preferred, req.requisite):
            for name in _nodes_of(group, settings.topology_key)[0]:
                if name not in order and (permitted is None or name in permitted):
                    order.append(name)
    if permitted is None:
        rest = sorted((n for n in by_name.values() if node_name(n, settings) not in order),
                      key=lambda n: -n.free_bytes)
        order += [node_name(n, settings) for n in rest]
    live = [name for name in order if name in by_name and by_name[name].live]
    for name in live:
        if by_name[name].free_bytes >= size:
            return name
    if live:
        return live[0]
    if permitted is not None:
        why = "; ".join(f"{name}: {_why_not(by_name.get(name))}" for name in permitted)
        raise resource_exhausted(f"accessibility_requirements: no requisite node can take the volume ({why})")
    raise resource_exhausted("no node is available for a new volume: "
                             + ("; ".join(f"{node_name(n, settings)}: {_why_not(n)}" for n in nodes) or "none known"))


def _why_not(info: NodeInfo | None) -> str:
    if info is None:
        return "not a node of this driver (no engine runs there)"
    return info.detail or "down"


def check_source_node(source_node: str, what: str, req: csi_pb2.TopologyRequirement | None,
                      settings: Settings) -> None:
    """RESOURCE_EXHAUSTED when the request's requisite topology excludes the node holding the content source."""
    permitted = allowed(req, settings)
    if permitted is not None and source_node not in permitted:
        key = settings.topology_key
        raise resource_exhausted(
            f"{what} is on node {source_node} ({key}={source_node}) and a copy of it can only be made there, but "
            f"accessibility_requirements allow only {', '.join(permitted) or 'no node'}: schedule the claim's "
            f"consumer on {source_node}")


def capacity_for(nodes: Sequence[NodeInfo], topology: csi_pb2.Topology | None, settings: Settings) -> int:
    """GetCapacity: free bytes of the node a topology segment names (0 when down or unknown); without a
    segment, the largest free space of any live node (what one new volume can get)."""
    node = topology.segments.get(settings.topology_key) if topology is not None else None
    if node is None:
        return max((n.free_bytes for n in nodes if n.live), default=0)
    for n in nodes:
        if node_name(n, settings) == node:
            return n.free_bytes if n.live else 0
    return 0
