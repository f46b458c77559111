"""A simple model of what every volume must read: one bytearray per visible volume."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Model:
    data: dict[str, bytearray] = field(default_factory=dict)
    offline: set[str] = field(default_factory=set)

    def create(self, vid: str, size: int) -> None:
        self.data[vid] = bytearray(size)

    def copy(self, src: str, dst: str, size: int) -> None:
        img = bytearray(size)
        img[: len(self.data[src])] = self.data[src]
        self.data[dst] = img

    def write(self, vid: str, off: int, payload: bytes) -> None:
        self.data[vid][off : off + len(payload)] = payload

    def delete(self, vid: str) -> None:
        self.data.pop(vid, None)
        self.offline.discard(vid)
