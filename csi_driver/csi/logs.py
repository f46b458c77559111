"""Request logging helpers for the CSI layer: `strip_secrets` blanks every field the CSI spec marks with the
csi_secret option, so a request can be logged at debug level without its secrets; `short_text` is one line of it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi_driver.proto_gen import csi_pb2

#: the csi_secret field option (typed as a plain FieldDescriptor by the generated stubs)
_SECRET: Any = csi_pb2.csi_secret


def _is_secret(fd: FieldDescriptor) -> bool:
    opts = fd.GetOptions()
    return bool(opts.Extensions[_SECRET]) if opts.HasExtension(_SECRET) else False


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
    return bool(flag) if flag is not None else getattr(fd, "label", None) == FieldDescriptor.LABEL_REPEATED


def short_text(msg: Message) -> str:
    return text_format.MessageToString(strip_secrets(msg), as_one_line=True)
