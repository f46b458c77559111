"""Raw FUSE requests for driving an export's handler without a kernel (the layouts are fuse_wire's)."""

from __future__ import annotations

import itertools

from csi_driver.datapath import fuse_wire as w

_unique = itertools.count(2, 2)


class MemTarget:
    """A BlockTarget in memory, for an export without an engine."""

    def __init__(self, n: int) -> None:
        self.buf = bytearray(n)

    @property
    def size(self) -> int:
        return len(self.buf)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        self.buf[offset:offset + length] = bytes(length)


class Client:
    """Sends whole requests to a handler and parses its replies, as the kernel would."""

    def __init__(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.handler = handler

    def call(self, opcode: int, nodeid: int, body: bytes = b"") -> tuple[int, bytes]:
        """(errno, reply body): errno 0 on success."""
        unique = next(_unique)
        rep = self.handler(w.IN_HEADER.pack(w.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 0, 0, 0)
                           + body)
        assert rep is not None, f"opcode {opcode} got no reply"
        length, error, got = w.OUT_HEADER.unpack_from(rep)
        assert got == unique and length == len(rep)
        return -error, rep[w.OUT_HEADER.size:]

    def ok(self, opcode: int, nodeid: int, body: bytes = b"") -> bytes:
        err, out = self.call(opcode, nodeid, body)
        assert err == 0, f"opcode {opcode}: errno {err}"
        return out

    def init(self, flags: int = w.ASYNC_READ | w.BIG_WRITES | w.MAX_PAGES | w.INIT_EXT, flags2: int = 0) -> bytes:
        return self.ok(w.INIT, 0, w.INIT_IN.pack(7, 41, 1 << 17, flags, flags2) + bytes(44))

    def lookup(self, name: str) -> int:
        return int(w.ENTRY_OUT_HEAD.unpack_from(self.ok(w.LOOKUP, 1, name.encode() + b"\0"))[0])

    def open(self, node: int, flags: int) -> tuple[int, bytes]:
        err, out = self.call(w.OPEN, node, w.OPEN_IN.pack(flags, 0))
        return err, out

    def read(self, fh: int, offset: int, size: int) -> tuple[int, bytes]:
        return self.call(w.READ, fh, w.READ_IN.pack(fh, offset, size, 0) + bytes(16))

    def write(self, fh: int, offset: int, data: bytes) -> tuple[int, bytes]:
        return self.call(w.WRITE, fh, w.WRITE_IN.pack(fh, offset, len(data), 0) + bytes(16) + data)

    def fsync(self, fh: int) -> tuple[int, bytes]:
        return self.call(w.FSYNC, fh, w.FSYNC_IN.pack(fh, 0, 0))

    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> tuple[int, bytes]:
        return self.call(w.FALLOCATE, fh, w.FALLOCATE_IN.pack(fh, offset, length, mode, 0))
