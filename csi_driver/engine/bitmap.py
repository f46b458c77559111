"""Per-grain bitmaps that remember which bits are not yet durable.

Invariant (kept by the engine's commit): a bit in ``undurable`` has been set in memory since the last metadata
commit; after a crash it reads as clear. The engine never lets data that the bit protects be overwritten on disk
while the bit is undurable.
"""

from __future__ import annotations

import re

_NOT_FULL = re.compile(rb"[^\xff]")
_NOT_EMPTY = re.compile(rb"[^\x00]")
_NONZERO_RUN = re.compile(rb"[^\x00]+")


class Bitmap:
    __slots__ = ("n", "bits", "undurable")

    def __init__(self, n: int, data: bytes | None = None, *, fill: bool = False) -> None:
        self.n = n
        nbytes = (n + 7) >> 3
        if data is not None:
            self.bits = bytearray(data[:nbytes].ljust(nbytes, b"\0"))
        else:
            self.bits = bytearray(b"\xff" * nbytes if fill else nbytes)
        self._mask_tail()
        self.undurable: set[int] = set()

    def _mask_tail(self) -> None:
        # bits past n are kept clear so byte-wise scans and counts stay exact
        rem = self.n & 7
        if rem and self.bits:
            self.bits[-1] &= (1 << rem) - 1

    def get(self, g: int) -> bool:
        return bool(self.bits[g >> 3] & (1 << (g & 7)))

    def set(self, g: int) -> bool:
        """Set bit g; True if it was clear (the bit is then undurable until the next commit)."""
        i = g >> 3
        b = 1 << (g & 7)
        if self.bits[i] & b:
            return False
        self.bits[i] |= b
        self.undurable.add(g)
        return True

    def durable(self, g: int) -> bool:
        """True if bit g is set and survives a crash."""
        return bool(self.bits[g >> 3] & (1 << (g & 7))) and g not in self.undurable

    def set_range(self, start: int, stop: int) -> None:
        for g in range(start, min(stop, self.n)):
            self.set(g)

    def count(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()

    def full(self) -> bool:
        if self.n == 0:
            return True
        whole = self.n >> 3
        if _NOT_FULL.search(self.bits, 0, whole):
            return False
        rem = self.n & 7
        return not rem or self.bits[whole] == (1 << rem) - 1

    def empty(self) -> bool:
        return _NOT_EMPTY.search(self.bits) is None

    def as_int(self) -> int:
        return int.from_bytes(self.bits, "little")

    def clear_grains(self, start: int = 0) -> list[int]:
        """Clear bits from `start` on, in order."""
        out: list[int] = []
        n = self.n
        for m in _NOT_FULL.finditer(self.bits, start >> 3):
            base = m.start() << 3
            byte = m.group()[0]
            for k in range(8):
                g = base + k
                if g >= n:
                    return out
                if g >= start and not byte & (1 << k):
                    out.append(g)
        return out

    def first_clear(self, start: int = 0) -> int:
        """Index of the first clear bit at or after `start`, or -1."""
        pos = start >> 3
        while True:
            m = _NOT_FULL.search(self.bits, pos)
            if m is None:
                return -1
            base = m.start() << 3
            byte = m.group()[0]
            for k in range(8):
                g = base + k
                if g >= self.n:
                    return -1
                if g >= start and not byte & (1 << k):
                    return g
            pos = m.start() + 1

    def resize(self, n: int, *, fill: bool) -> None:
        """Grow to n bits; new bits are set (durably, as part of the caller's commit) when fill."""
        old = self.n
        nbytes = (n + 7) >> 3
        self.bits.extend(bytes(nbytes - len(self.bits)))
        self.n = n
        if fill:
            for g in range(old, n):
                self.bits[g >> 3] |= 1 << (g & 7)
        self._mask_tail()

    def copy(self) -> Bitmap:
        return Bitmap(self.n, bytes(self.bits))


def set_grains(data: bytes, n: int) -> list[int]:
    """Indices of the set bits of a packed bitmap of n bits."""
    out: list[int] = []
    for m in _NOT_EMPTY.finditer(data):
        base = m.start() << 3
        byte = m.group()[0]
        for k in range(8):
            if byte & (1 << k) and base + k < n:
                out.append(base + k)
    return out


def bit_runs(data: bytes, n: int, *, start: int = 0, limit: int = 0) -> list[tuple[int, int]]:
    """Runs of set bits of a packed bitmap of n bits, as (first, count), ascending and merged: those ending
    after bit `start` (a run holding `start` is cut to begin there), at most `limit` of them (0 = all).

    Cost follows the set bytes from `start` on (and the runs asked for): zero bytes are skipped by one regex
    scan, full bytes add eight bits at once.
    """
    out: list[list[int]] = []
    for m in _NONZERO_RUN.finditer(data, max(0, start) >> 3):
        base = m.start() << 3
        for i, byte in enumerate(m.group()):
            g0 = base + (i << 3)
            spans: tuple[tuple[int, int], ...]
            if byte == 0xFF:
                spans = ((g0, g0 + 8),)
            else:
                spans = tuple((g0 + k, g0 + k + 1) for k in range(8) if byte & (1 << k))
            for a, b in spans:
                a, b = max(a, start), min(b, n)
                if a >= b:
                    continue
                if out and out[-1][1] == a:
                    out[-1][1] = b
                else:
                    if limit and len(out) == limit:  # the runs kept are complete: the next one starts apart
                        return [(a, b - a) for a, b in out]
                    out.append([a, b])
    return [(a, b - a) for a, b in out]
