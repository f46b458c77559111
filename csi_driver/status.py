"""The one mapping from exceptions to gRPC status: `status_for`.

Used by the CSI servicers (csi.rpc's interceptor) and by the engine API (remote.service encodes, remote.wire
decodes), so an error reaches the CO with the same code whether the engine runs in this process or behind
proto/engine.proto. Classes carry their code: engine errors (and the data path's subclasses of them) name it in
`status`, StatusError (what the CSI layer raises for rules it checks itself) holds it. Lookup follows the class
hierarchy, so a new subclass lands on its parent's code; anything unclassified is INTERNAL and unexpected.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import grpc

from csi_driver.engine import errors as engine_errors

# the engine's own file I/O already raises NoSpace for these; a host call outside it may still raise the OSError
from csi_driver.engine.fileio import NOSPACE_ERRNOS


class StatusError(Exception):
    """A request refused with a specific gRPC status code (CSI rule violations, transport conditions)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str
    #: the engine error class name that crosses proto/engine.proto ("" for none)
    error_class: str
    #: a bug or an unclassified failure: log it with its traceback
    unexpected: bool


def status_for(exc: BaseException) -> Status:
    if isinstance(exc, StatusError):
        return Status(exc.code, exc.message, "", False)
    if isinstance(exc, engine_errors.EngineError):
        code = grpc.StatusCode[type(exc).status]
        name = type(exc).__name__
        if code == grpc.StatusCode.INTERNAL:
            return Status(code, f"engine error: {exc}" if str(exc) else f"engine error: {name}", name, True)
        return Status(code, str(exc) or name, name, False)
    if isinstance(exc, OSError) and exc.errno in NOSPACE_ERRNOS:
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no space left: {exc.strerror}", "NoSpace", False)
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return Status(grpc.StatusCode.OUT_OF_RANGE, "larger than the state directory's filesystem allows",
                      "OutOfRange", False)
    if isinstance(exc, NotImplementedError):
        return Status(grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented", "", False)
    return Status(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", "EngineError", True)
