"""Engine errors. The CSI layer maps each class (and its subclasses) to one gRPC status code."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidArgument(EngineError):
    """A caller passed a value the engine cannot accept (bad size, rate, grain size, id)."""


class NotFound(EngineError):
    """The named volume, mapping or group does not exist (or is deleted)."""


class AlreadyExists(EngineError):
    """A visible object with that name or id exists already."""


class OutOfRange(EngineError):
    """A size or offset outside what the object allows (e.g. a target smaller than its source)."""


class InvalidState(EngineError):
    """The object is in a state that does not allow the operation (FlashCopy state rules)."""


class NoSpace(EngineError):
    """The state directory's filesystem is full (ENOSPC/EDQUOT)."""


class VolumeOffline(EngineError):
    """The volume's data is not available: its mapping was stopped before the copy completed."""


class EngineLocked(EngineError):
    """Another process holds the state directory."""


class EngineClosed(EngineError):
    """The engine was closed."""
