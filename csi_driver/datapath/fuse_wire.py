"""The FUSE kernel protocol as this driver speaks it: opcodes, flags and the byte layout of each message.

Facts of the Linux uapi (include/uapi/linux/fuse.h), protocol 7.x with x >= 31 (every layout here is the
kernel's current one; older kernels are refused at INIT). A request is a 40-byte `in_header` and an
opcode-specific body; a reply is a 16-byte `out_header` (error = -errno, 0 on success) and a body.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
MIN_MINOR = 31        # FUSE_MAX_PAGES (7.28), FOPEN_PARALLEL_DIRECT_WRITES needs a newer kernel but is ignored
OUR_MINOR = 41        # what we answer: the kernel uses min(ours, its own)

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH = 20, 21, 22, 23, 24, 25
INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 26, 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY = 34, 35, 36, 38
BATCH_FORGET, FALLOCATE, READDIRPLUS, LSEEK, STATX = 42, 43, 44, 46, 52

#: requests the kernel expects no reply to
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags (init_in.flags / init_out.flags; bits 32+ live in flags2)
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
HAS_RESEND = 1 << 39

# open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# getattr_in.getattr_flags, setattr_in.valid
GETATTR_FH = 1 << 0
FATTR_SIZE = 1 << 3

# notifications (out_header.unique == 0, error = the code)
NOTIFY_RESEND = 7
#: set by the kernel in the unique of a request it sends again after NOTIFY_RESEND
UNIQUE_RESEND = 1 << 63

IN_HEADER = struct.Struct("<IIQQIIIHH")             # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")                   # len error unique
INIT_IN = struct.Struct("<IIIII")                    # major minor max_readahead flags flags2 (then unused)
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")         # ... max_write time_gran max_pages map_alignment flags2
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")            # ino size blocks a/m/ctime, nsecs, mode nlink uid gid rdev
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")            # nodeid generation entry_valid attr_valid (+nsecs), attr
ATTR_OUT_HEAD = struct.Struct("<QII")                # attr_valid attr_valid_nsec dummy, attr
GETATTR_IN = struct.Struct("<IIQ")                   # getattr_flags dummy fh
SETATTR_IN = struct.Struct("<IIQQ")                  # valid padding fh size (then times, mode, ...)
OPEN_IN = struct.Struct("<II")                       # flags open_flags
OPEN_OUT = struct.Struct("<QIi")                     # fh open_flags backing_id
READ_IN = struct.Struct("<QQII")                     # fh offset size read_flags (then lock_owner flags pad)
WRITE_IN = struct.Struct("<QQII")                    # fh offset size write_flags; data after 40 bytes
WRITE_IN_SIZE = 40
WRITE_OUT = struct.Struct("<II")                     # size padding
FSYNC_IN = struct.Struct("<QII")                     # fh fsync_flags padding
FALLOCATE_IN = struct.Struct("<QQQII")               # fh offset length mode padding
RELEASE_IN = struct.Struct("<QII")                   # fh flags release_flags
KSTATFS = struct.Struct("<QQQQQIIII24x")             # blocks bfree bavail files ffree bsize namelen frsize pad
DIRENT_HEAD = struct.Struct("<QQII")                 # ino off namelen type, then the name padded to 8


def out(unique: int, body: bytes = b"", error: int = 0) -> bytes:
    """A whole reply: out_header + body (error is a positive errno; the wire carries its negative)."""
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def notify_resend() -> bytes:
    """The notification that makes the kernel send again every request it sent and has no reply to."""
    return OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0)


def attr(ino: int, size: int, mode: int, nlink: int, mtime: int) -> bytes:
    return ATTR.pack(ino, size, (size + 511) // 512, mtime, mtime, mtime, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0)


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    pad = (-(DIRENT_HEAD.size + len(name))) % 8
    return DIRENT_HEAD.pack(ino, off, len(name), dtype) + name + b"\0" * pad
