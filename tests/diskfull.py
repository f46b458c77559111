"""Filling a (small, test-mounted) filesystem to its last byte, for the out-of-space tests."""

from __future__ import annotations

import os


def fill_to_last_byte(directory: str | os.PathLike[str], name: str = "filler") -> str:
    """Append to directory/name until not even one byte fits (halving the chunk on each ENOSPC); its path."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        n = 1 << 20
        while n:
            try:
                os.write(fd, b"\xee" * n)
            except OSError:
                n //= 2
    finally:
        os.close(fd)
    return path
