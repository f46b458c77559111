"""The embedded FlashCopy engine. Pure Python: imports nothing of gRPC or Kubernetes."""

from csi_driver.engine import errors, model
from csi_driver.engine.engine import Engine
from csi_driver.engine.model import CopyItem, GroupInfo, GroupState, MappingInfo, MappingState, VolumeInfo

__all__ = ["CopyItem", "Engine", "GroupInfo", "GroupState", "MappingInfo", "MappingState", "VolumeInfo", "errors",
           "model"]
