"""Who may call what on an engine's TCP port (mutual TLS), by the name in the client's certificate.

The unix socket (0600, this node's `serve` only) serves every RPC of proto/engine.proto. The TCP port serves a
method only to the client roles TCP_POLICY lists for it (remote.tls: CONTROLLER, NODE), and nothing else:
a method missing from the table (the Node verbs, any new RPC until someone decides) is PERMISSION_DENIED,
whoever asks. The Node verbs mount, unmount and delete at host paths as root and the controller never calls them
remotely, so no certificate reaches them over the network.

Cross-node reads (an engine reading another node's volume for a copy) will admit NODE for their own RPCs; the
handler then gets the calling node from `caller()` and answers only what a mapping targeting that node needs
(a shared wildcard node certificate names no node, so it must not pass such a check: Peer.is_node).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from csi_driver.remote.tls import CONTROLLER, Peer, peer_of

log = logging.getLogger("csi_flashcopy.engine")

SERVICE = "/flashcopy.engine.v1.Engine/"

#: what a controller calls (remote.client over remote.cluster): metadata, copies, groups, extents
CONTROLLER_RPCS = frozenset({
    "Ping", "Capacity", "CreateVolume", "GetVolume", "FindVolume", "FindVolumes", "DeleteVolume", "ResizeVolume",
    "Snapshot", "Clone", "SnapshotGroup", "DeleteGroup", "PrepareGroup", "StartGroup", "ReleaseGroup", "Report",
    "ModifyCopies", "RestoreVolume", "RefreshVolume", "AllocatedExtents", "DeltaExtents",
})
#: the node's own `serve` only, on the unix socket
NODE_RPCS = frozenset({"NodeStage", "NodeUnstage", "NodePublish", "NodeUnpublish", "NodeStats", "NodeExpand"})

#: method -> client roles the TCP port serves it to
TCP_POLICY: dict[str, frozenset[str]] = {m: frozenset({CONTROLLER}) for m in CONTROLLER_RPCS}

_caller: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("engine_caller", default=None)


def caller() -> Peer | None:
    """The TCP client of the call being served (None on the unix socket)."""
    return _caller.get()


def admitted(method: str, peer: Peer) -> bool:
    return peer.role in TCP_POLICY.get(method, frozenset())


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:  # generic in the stubs only
    _Interceptor = grpc.ServerInterceptor


class TcpAccess(_Interceptor):
    """The TCP server's gate: TCP_POLICY by the peer certificate's names, before the request is handled."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        full: str = details.method
        method = full[len(SERVICE):] if full.startswith(SERVICE) else full
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            peer = peer_of(context.auth_context())
            if not admitted(method, peer):
                log.warning("call refused", extra={"fields": {"method": method, "peer": str(peer),
                                                              "address": context.peer()}})
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"{method} is not served to {peer} on the engine's TCP port"
                              + ("" if method in TCP_POLICY else " (unix socket only)"))
            token = _caller.set(peer)
            try:
                return inner(request, context)
            finally:
                _caller.reset(token)

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
