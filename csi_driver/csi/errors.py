"""The one place where failures become gRPC status codes.

Servicers raise CsiError for rule violations they detect themselves; the Backend raises engine errors
(csi_driver.engine.errors). `to_status` maps both along the class hierarchy (isinstance, most specific class
first), so a new engine subclass lands on its parent's code instead of falling through to INTERNAL.
"""

from __future__ import annotations

import errno

import grpc

from csi_driver.engine import errors as engine_errors


class CsiError(Exception):
    """A request the driver refuses with a specific gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, why: str) -> CsiError:
    """INVALID_ARGUMENT naming the offending field, e.g. `name: required`."""
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {why}")


def not_found(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, what)


def already_exists(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.ALREADY_EXISTS, what)


def out_of_range(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.OUT_OF_RANGE, what)


def failed_precondition(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, what)


def aborted(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.ABORTED, what)


def unavailable(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.UNAVAILABLE, what)


# Ordered most specific first; the first isinstance match wins.
ENGINE_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (engine_errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (engine_errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (engine_errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (engine_errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (engine_errors.NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # the object's state forbids the operation now (FlashCopy state rules, data offline)
    (engine_errors.InvalidState, grpc.StatusCode.FAILED_PRECONDITION),
    (engine_errors.VolumeOffline, grpc.StatusCode.FAILED_PRECONDITION),
    # the engine is not usable right now (held by another process, shutting down): retry later
    (engine_errors.EngineLocked, grpc.StatusCode.UNAVAILABLE),
    (engine_errors.EngineClosed, grpc.StatusCode.UNAVAILABLE),
)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, bool]:
    """(code, message, unexpected): unexpected errors become INTERNAL and deserve a traceback in the log."""
    if isinstance(exc, CsiError):
        return exc.code, exc.message, False
    for cls, code in ENGINE_CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__, False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"no space left: {exc.strerror}", False
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return grpc.StatusCode.OUT_OF_RANGE, "larger than the state directory's filesystem allows", False
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented", False
    if isinstance(exc, engine_errors.EngineError):
        return grpc.StatusCode.INTERNAL, f"engine error: {exc}", True
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", True
