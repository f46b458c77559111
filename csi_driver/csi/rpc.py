"""One server interceptor does the cross-cutting work for every unary RPC.

- maps any exception to a gRPC status through csi_driver.status.status_for (INTERNAL + traceback for
  the unexpected ones), so servicer bodies hold business logic only;
- writes exactly one log line per RPC: method, the request's ids, gRPC code, duration (and the error
  message when not OK). Only named id fields are logged, never the request itself, so secrets cannot leak;
  at debug level the request is also logged with every csi_secret field blanked;
- hands every call's (method, code, seconds) to an RpcObserver: csi_driver.metrics.RpcMetrics, the
  flashcopy_csi_rpc_duration_seconds histogram of the optional metrics endpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from csi_driver.csi.errors import invalid
from csi_driver.csi.logs import short_text
from csi_driver.status import status_for

log = logging.getLogger("csi_flashcopy.rpc")

# Request fields worth a log column (all plain ids or names; secrets are never among them).
ID_FIELDS = ("name", "volume_id", "snapshot_id", "source_volume_id", "group_snapshot_id", "node_id",
             "starting_token", "base_snapshot_id", "target_snapshot_id", "starting_offset")
# The liveness probe calls Probe every few seconds: its successes are logged at debug level only.
QUIET_METHODS = frozenset({"Probe"})


def request_ids(request: Any) -> dict[str, Any]:
    """The ids a request names (read by field name, from any request type)."""
    out: dict[str, Any] = {}
    fields = request.DESCRIPTOR.fields_by_name
    for name in ID_FIELDS:
        if name in fields:
            value = getattr(request, name)
            if value:
                out[name] = value
    if "volume_content_source" in fields and request.HasField("volume_content_source"):
        src = request.volume_content_source
        kind = src.WhichOneof("type")
        if kind == "snapshot":
            out["source_snapshot_id"] = src.snapshot.snapshot_id
        elif kind == "volume":
            out["source_volume_id"] = src.volume.volume_id
    for name in ("source_volume_ids", "snapshot_ids"):
        if name in fields:
            values = list(getattr(request, name))
            if values:
                out[name] = ",".join(values[:32]) + (",..." if len(values) > 32 else "")
    return out


def response_ids(response: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(response, Message):
        return out
    r: Any = response  # fields are read by name, from any response type
    fields = r.DESCRIPTOR.fields_by_name
    if "volume" in fields and r.HasField("volume"):
        out["result_volume_id"] = r.volume.volume_id
    if "snapshot" in fields and r.HasField("snapshot"):
        out["result_snapshot_id"] = r.snapshot.snapshot_id
    if "group_snapshot" in fields and r.HasField("group_snapshot"):
        out["result_group_snapshot_id"] = r.group_snapshot.group_snapshot_id
    if "entries" in fields:
        out["entries"] = len(r.entries)
        if r.next_token:
            out["next_token"] = r.next_token
    return out


def _ids(request: Any, extract: Callable[[Message], dict[str, Any]]) -> dict[str, Any]:
    return extract(request) if isinstance(request, Message) else {}


def _debug_request(method: str, request: Message) -> None:
    try:
        text = short_text(request)  # csi_secret fields blanked
    except Exception as exc:  # a logging aid must never fail the call
        text = f"<unprintable: {exc}>"
    log.debug("request", extra={"fields": {"method": method, "request": text}})


class RpcObserver(Protocol):
    """Told every call's method, gRPC code name and duration (csi_driver.metrics.RpcMetrics)."""

    def observe(self, method: str, code: str, seconds: float) -> None: ...


class RpcInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]  # generic in the stubs only
    def __init__(self, metrics: RpcObserver | None = None) -> None:
        self.metrics = metrics

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        full = handler_call_details.method  # "/csi.v1.Controller/CreateVolume"
        method = full.rsplit("/", 1)[-1]
        if handler.unary_stream is not None:  # SnapshotMetadata: server streams
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream, handler.request_deserializer),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            return handler
        # The request is decoded here rather than by gRPC, so undecodable bytes are INVALID_ARGUMENT
        # (gRPC's own deserializer failure would be reported as INTERNAL).
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary, handler.request_deserializer),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(self, method: str, inner: Callable[[Any, grpc.ServicerContext], Any],
                     deserialize: Callable[[bytes], Any] | None
                     ) -> Callable[[bytes, grpc.ServicerContext], Iterator[Any]]:
        """As _wrap, for a server stream: an error raised before or between messages ends the stream with its
        status; one log line when the stream ends, with the number of messages sent."""
        def call(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            code, message = grpc.StatusCode.OK, ""
            request: Any = None
            sent = 0
            try:
                request = _decode(method, raw, deserialize)
                for response in inner(request, context):
                    yield response
                    sent += 1
            except GeneratorExit:  # the client went away
                code, message = grpc.StatusCode.CANCELLED, "stream closed by the client"
                raise
            except Exception as exc:
                code, message = self._failed(method, request, exc)
                context.abort(code, message)
            finally:
                fields = self._done(method, request, code, start, {"messages": sent})
                if code != grpc.StatusCode.OK:
                    fields["error"] = message
                log.info("rpc", extra={"fields": fields})

        call.__name__ = f"rpc_{method}"
        return call

    def _wrap(self, method: str, inner: Callable[[Any, grpc.ServicerContext], Any],
              deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes, grpc.ServicerContext], Any]:
        def call(raw: bytes, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code, message = grpc.StatusCode.OK, ""
            response = None
            request: Any = None
            try:
                request = _decode(method, raw, deserialize)
                response = inner(request, context)
                return response
            except Exception as exc:
                code, message = self._failed(method, request, exc)
                context.abort(code, message)
            finally:
                fields = self._done(method, request, code, start, {})
                if code == grpc.StatusCode.OK:
                    fields.update(response_ids(response))
                else:
                    fields["error"] = message
                level = logging.DEBUG if method in QUIET_METHODS and code == grpc.StatusCode.OK else logging.INFO
                log.log(level, "rpc", extra={"fields": fields})

        call.__name__ = f"rpc_{method}"
        return call

    @staticmethod
    def _failed(method: str, request: Any, exc: Exception) -> tuple[grpc.StatusCode, str]:
        """The status an exception answers with (a bug or unclassified failure is logged with its traceback)."""
        st = status_for(exc)
        if st.unexpected:
            log.error("unexpected error", exc_info=True,
                      extra={"fields": {"method": method, **_ids(request, request_ids)}})
        return st.code, st.message

    def _done(self, method: str, request: Any, code: grpc.StatusCode, start: float,
              extra: dict[str, Any]) -> dict[str, Any]:
        """Record the call's duration and return its log fields."""
        elapsed = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe(method, code.name, elapsed)
        return {"method": method, **_ids(request, request_ids), "code": code.name,
                "duration_ms": round(elapsed * 1000, 3), **extra}


def _decode(method: str, raw: bytes, deserialize: Callable[[bytes], Any] | None) -> Any:
    try:
        request: Any = deserialize(raw) if deserialize is not None else raw
    except Exception as exc:
        raise invalid("request", f"cannot decode {method} request: {exc}") from None
    if log.isEnabledFor(logging.DEBUG):
        _debug_request(method, request)
    return request
