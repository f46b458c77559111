"""Process logging: `text` (key=value) or `json` (one object per line), fields passed via `extra={"fields": ...}`.

Configured once by each entry point (`serve`, `engine`); every module logs through the standard logging module.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import stat
import sys
import time
from typing import Any, TextIO

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _text_value(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in " \t\"=")) else s


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [ts, record.levelname, record.name, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update(_fields(record))
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


#: room kept allocated past the end of a log file that stderr is (the node engine's <state dir>/engine.log)
LOG_ROOM = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01


def _keep_room(stream: TextIO) -> None:
    """When stream is a regular file, allocate LOG_ROOM bytes past its end without changing its size: appends
    land there, so the log goes on when its filesystem (the state dir) is full. Best effort."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fd = stream.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_blocks * 512 - st.st_size >= LOG_ROOM // 2:
            return
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, st.st_size, LOG_ROOM)


class _RoomKeepingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that tops up the room past a log file's end now and then (`_keep_room`)."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self._count = getattr(self, "_count", 0) + 1
        if self._count % 64 == 0:
            _keep_room(self.stream)


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Root logging to stderr in the chosen format (called once by the process entry point)."""
    _keep_room(sys.stderr)
    handler = _RoomKeepingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("grpc").setLevel(logging.WARNING)
