"""Node data path: engine volumes as FUSE-exported files, loop devices, filesystems, freeze. Node I/O only.

node.py (DataPath: stage/publish/stats/expand/quiesce over an engine), fuse_export.py (serves volume files),
privileged (the only place host commands run). It imports the engine and csi_driver.api, nothing else of the
package: the engine process that serves it remotely is csi_driver.remote.
"""

from csi_driver.datapath.node import DataPath, datapath_unavailable

__all__ = ["DataPath", "datapath_unavailable"]
