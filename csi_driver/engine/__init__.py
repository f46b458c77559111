"""The embedded FlashCopy engine. Pure Python: imports nothing of gRPC or Kubernetes."""

from csi_driver.engine import errors, model
from csi_driver.engine.engine import Engine
from csi_driver.engine.model import GroupInfo, MappingInfo, MappingState, VolumeInfo

__all__ = ["Engine", "GroupInfo", "MappingInfo", "MappingState", "VolumeInfo", "errors", "model"]
