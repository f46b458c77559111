"""The held-write journal: host writes acknowledged before they are durable, kept where the next engine finds them.

A host write normally lands in its volume's data file at once, where it survives the engine process (the kernel's
page cache outlives any process; the next flush makes it durable). Some writes cannot land there yet: a write held
in memory behind a bit that is not committed (I5), a write into a grain whose ownership bit is not committed yet (a
target filling a grain; a crash would forget the bit and the grain would read upstream again). Their effect lives
in the engine's memory until the next commit. Under a FUSE keeper an engine may die and a new one take the same
connection over, and the kernel then asks the new engine to fsync writes the old one acknowledged: the new engine
must still have them.

J1 (recoverable)  every host write or discard whose effect depends on state only in memory is appended here
                  (one record: its bytes, then a head naming volume, offset and length, with a CRC) before it is
                  acknowledged (`Engine.write`,
                  `Engine.discard`); a write whose every grain the volume owns durably and may overwrite in place
                  (`Cascade._can_write_in_place` and `Vol.owns_durably`) needs no record: its file holds it.
J2 (emptied)      the journal is emptied only by a commit that left every recorded effect in the data files with
                  its bits durable (`Durability._commit`, at its end): from then on the files alone hold them.
J3 (replay)       an engine opened in the same boot as the journal's writer replays its records in order through
                  its own write path (copy-on-write and all) before it serves anything, commits, and only then
                  empties the journal; a replay cut short by another death starts over from the same records
                  (replaying a write twice in order leaves what replaying it once does).
J4 (reboot)       after a reboot the journal is dropped unread: no connection survived a reboot, so no fsync can
                  ask for those writes, and records written before the last commits may have reached the disk
                  where the truncation that dropped them did not (replaying them could undo a newer, synced
                  write). The boot is told by the kernel's boot id, written in the journal's header.

Nothing here is synced: the journal protects against a process death, which leaves the page cache alone; against
power loss the fsync semantics of the volume (flush makes it durable) are what they always were.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from dataclasses import dataclass

from csi_driver.engine.fileio import FileIO

log = logging.getLogger(__name__)

JOURNAL_FILE = "writes.journal"
JOURNAL_LIMIT = 64 * 1024 * 1024  # bytes of records before a commit is forced (it empties the journal)
_MAGIC = b"FCJ2"
_HEADER = struct.Struct("<4s48s")  # magic, boot id (ASCII, NUL padded)
#: a record's head: kind (W write, D discard), volume id length, length, offset, CRC32 of these and the id;
#: the volume id follows, then the bytes written (W only)
_RECORD = struct.Struct("<cBIQI")


@dataclass(frozen=True)
class Record:
    kind: bytes  # b"W" or b"D"
    volume_id: str
    offset: int
    length: int
    data: bytes  # the bytes written (empty for a discard)


def _crc(kind: bytes, vid: bytes, length: int, offset: int) -> int:
    return zlib.crc32(vid, zlib.crc32(kind + struct.pack("<IQ", length, offset)))


class Journal:
    """One state dir's journal file (J1-J4). Every method expects the engine lock held."""

    def __init__(self, io: FileIO, state_dir: str) -> None:
        self._io = io
        self.path = os.path.join(state_dir, JOURNAL_FILE)
        self._boot = io.boot_id.encode("ascii", "replace")[:48]
        self._fd = -1
        self._end = _HEADER.size  # where the next record goes
        #: True while replaying: the records replayed are already in the file (J3)
        self.replaying = False

    @property
    def size(self) -> int:
        """Bytes of records held (0 when empty)."""
        return self._end - _HEADER.size

    def open(self) -> list[Record]:
        """Open (creating) the journal; the records a replay must apply: those of an engine of this boot (J4)."""
        self._fd = self._io.open(self.path, create=True)
        raw = _read_all(self._fd)
        if len(raw) <= _HEADER.size:
            return []
        magic, boot = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            log.warning("journal %s has no valid header: dropped", self.path)
            return []
        if not self._boot or boot.rstrip(b"\0") != self._boot:
            log.info("journal %s was written before a reboot: dropped (%d bytes)", self.path, len(raw))
            return []
        out: list[Record] = []
        pos = _HEADER.size
        while pos + _RECORD.size <= len(raw):
            kind, vlen, length, offset, crc = _RECORD.unpack_from(raw, pos)
            body = pos + _RECORD.size
            dlen = length if kind == b"W" else 0
            end = body + vlen + dlen
            if kind not in (b"W", b"D") or end > len(raw):
                break
            vid = raw[body:body + vlen]
            data = raw[body + vlen:end]
            if _crc(kind, vid, length, offset) != crc:
                break  # a head never written (the writer died before it): nothing from here on was acknowledged
            out.append(Record(kind, vid.decode("ascii", "replace"), offset, length, bytes(data)))
            pos = end
        if pos != len(raw):
            log.warning("journal %s: %d bytes after the last whole record ignored", self.path, len(raw) - pos)
        return out

    def append(self, kind: bytes, volume_id: str, offset: int, data: bytes | memoryview = b"",
               length: int | None = None) -> None:
        """J1: one record, in the file (page cache) when this returns."""
        if self.replaying:
            return
        vid = volume_id.encode("ascii")
        n = len(data) if length is None else length
        head = _RECORD.pack(kind, len(vid), n, offset, _crc(kind, vid, n, offset)) + vid
        if self._end == _HEADER.size:
            self._io.pwrite(self._fd, _HEADER.pack(_MAGIC, self._boot), 0)
        # the bytes first, the head after them: a death before the head is written leaves zeros where it goes
        # (the file grew past it), so a reader never takes a record whose bytes are not all there. The page
        # cache keeps a process's writes in order, and nothing else reads this file. No CRC over the bytes:
        # it cost more than the copy-on-write it protects.
        try:
            if data:
                self._io.pwrite(self._fd, data, self._end + len(head), stream=False)
            self._io.pwrite(self._fd, head, self._end)
        except Exception:
            with contextlib.suppress(Exception):
                self._io.truncate(self._fd, self._end)  # no part of a record nobody acknowledged stays behind
            raise
        self._end += len(head) + len(data)

    def reset(self) -> None:
        """J2: empty the journal (the caller's commit made every recorded effect durable in the files). Not
        while replaying: the records not yet replayed are still only here (J3)."""
        if self._end > _HEADER.size and not self.replaying:
            self._io.truncate(self._fd, 0)
            self._end = _HEADER.size

    def replayed(self) -> None:
        """J3: the replay is over and committed: drop the records it applied."""
        self.replaying = False
        self._io.truncate(self._fd, 0)
        self._end = _HEADER.size

    def close(self) -> None:
        if self._fd >= 0:
            self._io.close(self._fd)
            self._fd = -1


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    pos = 0
    while True:
        b = os.pread(fd, 1 << 20, pos)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        pos += len(b)

