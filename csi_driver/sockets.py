"""Endpoints and listening sockets, once for every server in the package (the CSI server, the engine API).

`parse_endpoint` reads unix:///path, unix:path, /path and tcp://host:port; `bind` adds the endpoint to a gRPC
server: a unix socket is born 0600 (no window where others may connect) after a stale one from an earlier run is
removed, and a live one (another server) is refused.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

import grpc

log = logging.getLogger("csi_flashcopy.sockets")


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """("unix", "/abs/path.sock") or ("tcp", "host:port"); ValueError for anything else."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    elif endpoint.startswith("tcp://"):
        addr = endpoint[len("tcp://"):]
        if not addr or ":" not in addr:
            raise ValueError(f"tcp endpoint needs host:port: {endpoint!r}")
        return "tcp", addr
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise ValueError(f"unsupported endpoint {endpoint!r} (expected unix:///path or tcp://host:port)")
    if not path:
        raise ValueError(f"empty socket path in {endpoint!r}")
    return "unix", os.path.abspath(path)


def unix_socket_path(endpoint: str, what: str = "endpoint") -> str:
    """The path of a unix endpoint; ValueError for a tcp one."""
    kind, addr = parse_endpoint(endpoint)
    if kind != "unix":
        raise ValueError(f"the {what} must be a unix socket (unix:///path), not {endpoint!r}")
    return addr


def unix_endpoint(path: str) -> str:
    return f"unix://{os.path.abspath(path)}"


def prepare_socket_path(path: str) -> None:
    """Make the parent directory; replace a stale socket; refuse to steal a live one or clobber a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale from a previous run
        log.info("removed stale socket", extra={"fields": {"path": path}})
        return
    finally:
        probe.close()
    raise RuntimeError(f"another server is listening on {path}")


def bind(server: grpc.Server, endpoint: str) -> str | None:
    """Add endpoint to server; returns the unix socket path (None for tcp). ValueError/RuntimeError if it cannot."""
    kind, addr = parse_endpoint(endpoint)
    if kind == "tcp":
        if server.add_insecure_port(addr) == 0:
            raise RuntimeError(f"cannot bind {addr}")
        return None
    prepare_socket_path(addr)
    old = os.umask(0o177)  # born 0600
    try:
        if server.add_insecure_port(f"unix:{addr}") == 0:
            raise RuntimeError(f"cannot bind unix socket {addr}")
    finally:
        os.umask(old)
    return addr
