"""CSI Node service: identity of this node.

Stage/publish (the data path) come with the node data path issue; until then NodeStage/NodePublish answer
UNIMPLEMENTED through the generated base class and nothing is advertised. NodeUnpublishVolume is answered,
because every CO (and csi-sanity's cleanup) calls it unconditionally: with nothing ever published, the spec's
answer for "not published at target_path" is OK.
"""

from __future__ import annotations

import grpc

from csi_driver.csi.driver import Driver
from csi_driver.csi.errors import invalid
from csi_driver.csi.validation import require_id
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.NodeGetInfoResponse:
        s = self.driver.settings
        return csi_pb2.NodeGetInfoResponse(node_id=s.node_id, max_volumes_per_node=s.max_volumes_per_node,
                                           accessible_topology=s.topology())

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
                            ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=self.driver.settings.node_capabilities())

    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
                            ) -> csi_pb2.NodeUnpublishVolumeResponse:
        # Placeholder until the node data path lands: this build never publishes, so nothing is at target_path.
        require_id(request.volume_id, "volume_id")
        if not request.target_path:
            raise invalid("target_path", "required")
        return csi_pb2.NodeUnpublishVolumeResponse()
