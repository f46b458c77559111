"""A bypass that serves granted I/O in Python, the way the data path's compiled FUSE loop does in C.

Reads and writes of a range whose every grain is granted go straight to the volume's data file (through the
engine's FileIO, so crash simulation sees them); everything else goes to the engine. Used by the model and
crash tests so that they run against the bypass too (csi_driver.engine.bypass, B1-B4).
"""

from __future__ import annotations

import threading
from typing import Any

from csi_driver.engine import Engine


class SimBypass:
    def __init__(self, io: Any) -> None:
        self.io = io
        self.grants: dict[str, tuple[int, int, int, bytearray, bytearray]] = {}
        self.dirty: set[str] = set()
        self.events: list[tuple[str, str]] = []
        self.direct = {"read": 0, "write": 0}
        self.inflight = 0
        self._mu = threading.Lock()

    # Bypass protocol
    def grant(self, volume_id: str, fd: int, size: int, grain: int, read: bytes, write: bytes) -> None:
        with self._mu:
            self.grants[volume_id] = (fd, size, grain, bytearray(read), bytearray(write))
            self.events.append(("grant", volume_id))

    def revoke(self, volume_id: str) -> None:
        with self._mu:
            self.grants.pop(volume_id, None)
            self.events.append(("revoke", volume_id))
            assert self.inflight == 0  # the simulator serves requests one at a time, in the caller's thread

    def unread(self, volume_id: str, grain: int) -> None:
        with self._mu:
            g = self.grants.get(volume_id)
            if g is not None:
                g[3][grain >> 3] &= ~(1 << (grain & 7)) & 0xFF
                g[4][grain >> 3] &= ~(1 << (grain & 7)) & 0xFF

    def take_dirty(self, volume_id: str) -> bool:
        with self._mu:
            if volume_id in self.dirty:
                self.dirty.discard(volume_id)
                return True
            return False

    # the data path's side
    def _covered(self, vid: str, off: int, n: int, which: int) -> tuple[int, int] | None:
        g = self.grants.get(vid)
        if g is None or n <= 0:
            return None
        fd, size, grain, *masks = g
        if off < 0 or off + n > size:
            return None
        bits = masks[which]
        for x in range(off // grain, (off + n - 1) // grain + 1):
            if not bits[x >> 3] >> (x & 7) & 1:
                return None
        return fd, size

    def read(self, eng: Engine, vid: str, off: int, n: int) -> bytes:
        got = self._covered(vid, off, n, 0)
        if got is None:
            return eng.read(vid, off, n)
        self.direct["read"] += 1
        data: bytes = self.io.pread(got[0], n, off)
        return data

    def write(self, eng: Engine, vid: str, off: int, data: bytes) -> None:
        got = self._covered(vid, off, len(data), 1)
        if got is None:
            eng.write(vid, off, data)
            return
        self.direct["write"] += 1
        self.io.pwrite(got[0], data, off)
        self.dirty.add(vid)
