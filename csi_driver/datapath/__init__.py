"""Node data path: engine volumes as FUSE-exported files, loop devices, filesystems, freeze.

privileged.py is the only module that runs host commands; fuse_export.py serves volume files; the node
engine process (daemon.py) ties them to the engine and serves proto/engine.proto.
"""
