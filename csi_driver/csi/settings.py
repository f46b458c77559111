"""One settings object: it decides which services run and builds every advertised capability list.

Capabilities are derived from the tuples below and nowhere else, and tests/csi check that each advertised
RPC is implemented by its servicer (and that no optional RPC is implemented without being advertised).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from csi_driver.engine.model import GiB
from csi_driver.proto_gen import csi_pb2

# Optional Controller RPC capabilities this driver implements (names of ControllerServiceCapability.RPC.Type).
CONTROLLER_RPCS: tuple[str, ...] = (
    "CREATE_DELETE_VOLUME",
    "LIST_VOLUMES",
    "GET_CAPACITY",
    "CREATE_DELETE_SNAPSHOT",
    "LIST_SNAPSHOTS",
    "CLONE_VOLUME",
    "EXPAND_VOLUME",
    "VOLUME_CONDITION",
    "GET_VOLUME",
    "SINGLE_NODE_MULTI_WRITER",
    "GET_SNAPSHOT",
    # ControllerModifyVolume: a VolumeAttributesClass's copyRate/cleanRate change the volume's running mappings
    "MODIFY_VOLUME",
)
GROUP_CONTROLLER_RPCS: tuple[str, ...] = ("CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT",)
# Node capabilities (csi_driver/csi/node.py over the NodeBackend data path). SINGLE_NODE_MULTI_WRITER: every
# publish of a staged volume binds the same loop device / filesystem, so several writers on this node share it,
# and SINGLE_NODE_SINGLE_WRITER is a CO-side (kubelet ReadWriteOncePod) restriction of the same path.
NODE_RPCS: tuple[str, ...] = (
    "STAGE_UNSTAGE_VOLUME",
    "GET_VOLUME_STATS",
    "EXPAND_VOLUME",
    "VOLUME_CONDITION",
    "SINGLE_NODE_MULTI_WRITER",
)

# Volumes live on one node: any single-node access mode works, multi-node ones cannot.
ACCESS_MODES: tuple[str, ...] = (
    "SINGLE_NODE_WRITER",
    "SINGLE_NODE_READER_ONLY",
    "SINGLE_NODE_SINGLE_WRITER",
    "SINGLE_NODE_MULTI_WRITER",
)
# Filesystems the node data path can make ("" = the node's default).
FS_TYPES: tuple[str, ...] = ("", "ext4", "xfs")


@dataclass(frozen=True)
class Settings:
    driver_name: str
    vendor_version: str
    node_id: str
    mode: str = "all"  # all | controller | node
    max_volumes_per_node: int = 0
    default_volume_size: int = 1 * GiB
    controller_rpcs: tuple[str, ...] = CONTROLLER_RPCS
    group_controller_rpcs: tuple[str, ...] = GROUP_CONTROLLER_RPCS
    node_rpcs: tuple[str, ...] = NODE_RPCS
    access_modes: tuple[str, ...] = ACCESS_MODES
    fs_types: tuple[str, ...] = FS_TYPES
    online_expansion: bool = True
    #: serve the SnapshotMetadata service (changed-block tracking) with the controller
    snapshot_metadata: bool = True
    manifest: dict[str, str] = field(default_factory=dict)

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"

    @property
    def serves_controller(self) -> bool:
        return self.mode in ("all", "controller")

    @property
    def serves_node(self) -> bool:
        return self.mode in ("all", "node")

    def has_controller(self, rpc: str) -> bool:
        return self.serves_controller and rpc in self.controller_rpcs

    def topology(self) -> csi_pb2.Topology:
        return csi_pb2.Topology(segments={self.topology_key: self.node_id})

    # ------------------------------------------------------------------ capability lists

    def plugin_capabilities(self) -> list[csi_pb2.PluginCapability]:
        svc = csi_pb2.PluginCapability.Service
        caps = [csi_pb2.PluginCapability(service=svc(type=svc.VOLUME_ACCESSIBILITY_CONSTRAINTS))]
        if self.serves_controller:
            caps.append(csi_pb2.PluginCapability(service=svc(type=svc.CONTROLLER_SERVICE)))
            if self.group_controller_rpcs:
                caps.append(csi_pb2.PluginCapability(service=svc(type=svc.GROUP_CONTROLLER_SERVICE)))
            if self.snapshot_metadata:
                caps.append(csi_pb2.PluginCapability(service=svc(type=svc.SNAPSHOT_METADATA_SERVICE)))
            if "EXPAND_VOLUME" in self.controller_rpcs:
                exp = csi_pb2.PluginCapability.VolumeExpansion
                kind = exp.ONLINE if self.online_expansion else exp.OFFLINE
                caps.append(csi_pb2.PluginCapability(volume_expansion=exp(type=kind)))
        return caps

    def controller_capabilities(self) -> list[csi_pb2.ControllerServiceCapability]:
        rpc = csi_pb2.ControllerServiceCapability.RPC
        return [csi_pb2.ControllerServiceCapability(rpc=rpc(type=n)) for n in self.controller_rpcs]

    def group_controller_capabilities(self) -> list[csi_pb2.GroupControllerServiceCapability]:
        rpc = csi_pb2.GroupControllerServiceCapability.RPC
        return [
            csi_pb2.GroupControllerServiceCapability(rpc=rpc(type=n))
            for n in self.group_controller_rpcs
        ]

    def node_capabilities(self) -> list[csi_pb2.NodeServiceCapability]:
        rpc = csi_pb2.NodeServiceCapability.RPC
        return [csi_pb2.NodeServiceCapability(rpc=rpc(type=n)) for n in self.node_rpcs]
