"""Process logging: `text` (key=value) or `json` (one object per line), fields passed via `extra={"fields": ...}`.

Also `strip_secrets`, which blanks every field the CSI spec marks with the csi_secret option, so a request can
be logged at debug level without its secrets.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi_driver.proto_gen import csi_pb2

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


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Root logging to stderr in the chosen format (called once by the process entry point)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("grpc").setLevel(logging.WARNING)


def _is_secret(fd: FieldDescriptor) -> bool:
    opts = fd.GetOptions()
    return bool(opts.Extensions[csi_pb2.csi_secret]) if opts.HasExtension(csi_pb2.csi_secret) else False


def strip_secrets(msg: Message) -> Message:
    """A copy of msg with every csi_secret field's values replaced by "***" (recursively)."""
    out = type(msg)()
    out.CopyFrom(msg)
    _strip(out)
    return out


def _strip(msg: Message) -> None:
    for fd, value in msg.ListFields():
        if _is_secret(fd):
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                keys = list(value.keys())
                value.clear()
                for k in keys:
                    value[k] = "***"
            else:
                msg.ClearField(fd.name)
        elif fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            if _repeated(fd):
                for item in value:
                    _strip(item)
            else:
                _strip(value)


def _repeated(fd: FieldDescriptor) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 5.x; `label` is gone in newer runtimes
    return bool(flag) if flag is not None else fd.label == FieldDescriptor.LABEL_REPEATED


def short_text(msg: Message) -> str:
    return text_format.MessageToString(strip_secrets(msg), as_one_line=True)
