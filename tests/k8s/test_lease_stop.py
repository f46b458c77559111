"""An engine's shutdown never waits on an API server that does not answer (issue 23: the Lease was deleted with no
request timeout, before the exports were unmounted, so an API outage during a node drain left a dead FUSE export
mounted). A real socket that takes connections and never answers stands in for the unreachable API server."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from csi_driver.k8s.apiclient import api_client
from csi_driver.k8s.leases import STOP_TIMEOUT, LeaseKeeper


def _silent_server() -> socket.socket:
    """A listening socket nobody accepts on: connections complete (backlog), TLS and HTTP never answer."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def _kubeconfig(tmp_path: Path, port: int) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    return str(path)


def test_lease_stop_is_bounded_when_the_api_server_does_not_answer(tmp_path: Path) -> None:
    srv = _silent_server()
    try:
        keeper = LeaseKeeper(api_client(_kubeconfig(tmp_path, srv.getsockname()[1])), "ns", "node-a",
                             "10.0.0.1:9820")
        keeper.start()  # its renewals hang too
        time.sleep(0.5)
        result: list[bool] = []
        t0 = time.monotonic()
        stopper = threading.Thread(target=lambda: result.append(keeper.stop(delete=True)), daemon=True)
        stopper.start()
        stopper.join(STOP_TIMEOUT + 25)
        took = time.monotonic() - t0
        assert not stopper.is_alive(), f"LeaseKeeper.stop still waiting on the API server after {took:.0f} s"
        assert result == [False]  # not deleted: the Lease expires by itself
        assert took < STOP_TIMEOUT + 2, took
    finally:
        srv.close()
