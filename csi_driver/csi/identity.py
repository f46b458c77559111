"""CSI Identity service."""

from __future__ import annotations

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_driver.csi.driver import Driver
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
                      ) -> csi_pb2.GetPluginInfoResponse:
        s = self.driver.settings
        return csi_pb2.GetPluginInfoResponse(name=s.driver_name, vendor_version=s.vendor_version,
                                             manifest=s.manifest)

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
                              ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=self.driver.settings.plugin_capabilities())

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        # ready only once the engine is open (and not while shutting down)
        return csi_pb2.ProbeResponse(ready=BoolValue(value=self.driver.slot.ready()))
