"""The errors the CSI servicers raise for rules they check themselves, one helper per status code.

The Backend raises engine errors (csi_driver.engine.errors); csi_driver.status.status_for maps both, once,
along the class hierarchy.
"""

from __future__ import annotations

import grpc

from csi_driver.status import StatusError


class CsiError(StatusError):
    """A request the driver refuses with a specific gRPC status code."""


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


def resource_exhausted(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED, what)


def aborted(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.ABORTED, what)


def unavailable(what: str) -> CsiError:
    return CsiError(grpc.StatusCode.UNAVAILABLE, what)
