"""The engine API (proto/engine.proto): the node engine process serves it (service.py), `serve` uses it as its
Backend (client.py: RemoteBackend), wire.py holds what crosses it besides messages (records, errors), and
launcher.py starts (and stops) an engine process for `serve --engine auto`.
"""

from csi_driver.remote.client import RemoteBackend

__all__ = ["RemoteBackend"]
