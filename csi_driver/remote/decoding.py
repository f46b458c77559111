"""Engine API requests decoded by the service, not by gRPC: bytes that are no valid message answer
INVALID_ARGUMENT (with the engine error class, as every engine error), where gRPC's own deserializer failure
answers INTERNAL "Exception deserializing request!" (the CSI socket does the same in csi.rpc)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from csi_driver.engine import errors
from csi_driver.remote import wire

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:  # generic in the stubs only
    _Interceptor = grpc.ServerInterceptor


class DecodeRequests(_Interceptor):
    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        inner, deserialize = handler.unary_unary, handler.request_deserializer
        method = str(details.method).rsplit("/", 1)[-1]

        def call(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                request = deserialize(raw)
            except Exception as exc:
                st = wire.encode(errors.InvalidArgument(f"cannot decode {method} request: {exc}"[:300]))
                context.set_trailing_metadata(((wire.ERROR_KEY, st.error_class or "InvalidArgument"),))
                context.abort(st.code, st.message)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None,
                                                   response_serializer=handler.response_serializer)
