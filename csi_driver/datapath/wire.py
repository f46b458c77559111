"""Errors across proto/engine.proto: engine error classes <-> gRPC status code + message + class name.

The server side (daemon.py) turns an exception into a status code, a message and the trailing metadata key
ERROR_KEY naming the engine error class; the client (client.py) raises that same class again, so the CSI
layer maps it exactly as it would an embedded engine's error. A failure without the key (the engine process
is down, the socket is gone) becomes EngineUnavailable.
"""

from __future__ import annotations

import errno

import grpc

from csi_driver.csi.errors import ENGINE_CODES
from csi_driver.engine import errors

ERROR_KEY = "flashcopy-error"


class EngineUnavailable(errors.EngineClosed):
    """The node engine process does not answer (not started yet, restarting, or dead).

    A subclass of EngineClosed, so the CSI layer answers UNAVAILABLE (retry later).
    """


# Engine error classes that may cross the wire, with their status code: the same table the CSI layer answers
# with, so a remote engine's error reaches the CO with the code an embedded engine's would.
CODES = ENGINE_CODES
_BY_NAME: dict[str, type[BaseException]] = {cls.__name__: cls for cls, _ in CODES}
_BY_NAME["EngineError"] = errors.EngineError


def encode(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, class name) for an exception raised while serving a call."""
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__, cls.__name__
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"no space left: {exc.strerror}", "NoSpace"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return grpc.StatusCode.OUT_OF_RANGE, "larger than the state directory's filesystem allows", "OutOfRange"
    # anything else (a failed host command, a bug): INTERNAL, still an engine error on the client side
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", "EngineError"


def decode(err: grpc.RpcError, endpoint: str) -> errors.EngineError:
    """The engine error to raise for a failed call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else "") or ""
    name = ""
    md = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in md or ():
        if key == ERROR_KEY:
            name = value if isinstance(value, str) else value.decode()
    cls = _BY_NAME.get(name)
    if cls is not None:
        return cls(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return EngineUnavailable(f"the node engine process at {endpoint} is not answering ({code.name}: {details})")
    return errors.EngineError(f"node engine process: {code.name}: {details}")
