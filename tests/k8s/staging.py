"""A volume staged and published as a raw block device through a node engine's socket: the node plugin's job,
done by tests that have no kubelet."""

from __future__ import annotations

import os
from pathlib import Path


class StagedBlock:
    def __init__(self, engine_endpoint: str, work: Path, volume_id: str) -> None:
        from csi_driver.remote.client import RemoteBackend

        self.b = RemoteBackend(engine_endpoint)
        self.vid = volume_id
        self.staging, self.target = work / "staging", work / "target"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.b.node_stage(volume_id, str(self.staging), block=True, fs_type="", mount_flags=[], read_only=False)
        self.b.node_publish(volume_id, str(self.staging), str(self.target), block=True, read_only=False,
                            mount_flags=[])
        self.fd = os.open(self.target, os.O_RDWR)

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        os.fsync(self.fd)

    def read(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        os.close(self.fd)
        self.b.node_unpublish(self.vid, str(self.target))
        self.b.node_unstage(self.vid, str(self.staging))
        self.b.close()
