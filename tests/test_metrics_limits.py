"""Issue 22 item 7: /metrics listens only where it is told (the chart passes the pod IP) and serves a bounded
number of connections at once: one more is answered 503 at once instead of costing a thread, and a slow client
holds its slot only for the request timeout."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

from csi_driver.metrics import MAX_SCRAPES, new_registry, serve_metrics


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _get(host: str, port: int, path: str = "/metrics") -> int:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_metrics_bind_only_the_given_address() -> None:
    port = _free_port("127.0.0.2")
    httpd = serve_metrics(f"127.0.0.2:{port}", new_registry("test"), lambda: True)
    try:
        assert _get("127.0.0.2", port, "/healthz") == 200
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        httpd.shutdown()


def test_concurrent_scrapes_are_capped() -> None:
    assert MAX_SCRAPES == 4
    port = _free_port("127.0.0.1")
    httpd = serve_metrics(f"127.0.0.1:{port}", new_registry("test"), lambda: True, request_timeout=2.0)
    slow: list[socket.socket] = []
    try:
        for _ in range(MAX_SCRAPES):  # clients that never finish their request: each holds a slot
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        time.sleep(0.3)  # accepted and waiting in their handler threads
        t0 = time.monotonic()
        assert _get("127.0.0.1", port) == 503  # the one more: refused at once, not queued
        assert time.monotonic() - t0 < 1.0
        slow.pop().close()
        time.sleep(0.3)
        assert _get("127.0.0.1", port) == 200  # a slot is free again
        # the slow ones time out (request_timeout) and free their slots; a real scrape works alongside again
        time.sleep(2.5)
        assert [_get("127.0.0.1", port) for _ in range(3)] == [200, 200, 200]
    finally:
        for s in slow:
            s.close()
        httpd.shutdown()
