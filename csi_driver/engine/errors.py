"""Engine errors. Each class names the gRPC status code it stands for (`status`, a code *name*: the engine
imports no gRPC); csi_driver.status.status_for turns any of them, or a subclass, into that code.

Other layers that raise on the engine's behalf (the node data path's privileged commands) subclass these, so a
new class lands on its parent's code instead of falling through to INTERNAL.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose. Unclassified: INTERNAL."""

    status = "INTERNAL"


class InvalidArgument(EngineError):
    """A caller passed a value the engine cannot accept (bad size, rate, grain size, id)."""

    status = "INVALID_ARGUMENT"


class NotFound(EngineError):
    """The named volume, mapping or group does not exist (or is deleted)."""

    status = "NOT_FOUND"


class AlreadyExists(EngineError):
    """A visible object with that name or id exists already."""

    status = "ALREADY_EXISTS"


class OutOfRange(EngineError):
    """A size or offset outside what the object allows (e.g. a target smaller than its source, a file larger than
    the state directory's filesystem allows)."""

    status = "OUT_OF_RANGE"


class InvalidState(EngineError):
    """The object is in a state that does not allow the operation (FlashCopy state rules)."""

    status = "FAILED_PRECONDITION"


class NoSpace(EngineError):
    """The state directory's filesystem is full (ENOSPC/EDQUOT)."""

    status = "RESOURCE_EXHAUSTED"


class VolumeOffline(EngineError):
    """The volume's data is not available: its mapping was stopped before the copy completed."""

    status = "FAILED_PRECONDITION"


class EngineLocked(EngineError):
    """Another process holds the state directory: retry later."""

    status = "UNAVAILABLE"


class EngineClosed(EngineError):
    """The engine was closed (or, for a remote engine, does not answer): retry later."""

    status = "UNAVAILABLE"


class Timeout(EngineError):
    """An operation did not finish in its time (a host command killed at its deadline): the caller may retry."""

    status = "DEADLINE_EXCEEDED"


def error_classes() -> dict[str, type[EngineError]]:
    """Every EngineError class defined so far (this module's and subclasses elsewhere), by class name: what may
    cross the engine wire and be raised again on the other side."""
    found: dict[str, type[EngineError]] = {}
    todo: list[type[EngineError]] = [EngineError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found
