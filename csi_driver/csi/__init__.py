"""CSI spec mapping: thin servicers (one module per CSI service) over the narrow Backend interface.

Request flow: rpc.RpcInterceptor (log line, error -> status) -> servicer method (validate, lock, call the
Backend, build the response). Nothing here knows whether the engine runs in this process or another one.
"""
