"""Issue 22, item 1: a node may write only its own engine Lease, against the real API server of ../shared/peers/k8s.

The chart's node ServiceAccount, its Lease Role and the chart's ValidatingAdmissionPolicy are applied as rendered;
the engine's own LeaseKeeper then runs as that ServiceAccount (impersonated, with the node name a pod-bound token
carries in the user extra authentication.kubernetes.io/node-name). Its own Lease is created, renewed and deleted;
another node's Lease, a new Lease for another node, the leader-election Leases are all refused, and so is a
caller whose token names no node.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.test_k8s_flow import SKIP, Cluster, running_peer
from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

NS = "flashcopy"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"


def _keeper(c: Cluster, node: str, *, sa: str | None = None, token_node: str | None = None) -> Any:
    """The engine's LeaseKeeper for node's Lease, as the admin (sa None) or as ServiceAccount sa authenticated the
    way a pod on token_node is (impersonation headers: the python client ignores a kubeconfig's `as`; token_node
    None = a token that names no node, as a legacy Secret token)."""
    from kubernetes import config

    from csi_driver.k8s.leases import LeaseKeeper

    api = config.new_client_from_config(config_file=str(c.kubeconfig))
    if sa is not None:
        api.set_default_header("Impersonate-User", f"system:serviceaccount:{NS}:{sa}")
        if token_node is not None:
            api.set_default_header("Impersonate-Extra-" + NODE_NAME_KEY.replace("/", "%2F"), token_node)
    return LeaseKeeper(api, NS, node, "10.0.0.1:9820")


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path, str]]:
    root = tmp_path_factory.mktemp("lease-policy")
    with running_peer(root / "k8s", "") as c:
        c.kubectl("create", "namespace", NS)
        objs = pm.helm_template(namespace=NS, kube_version="1.35.0")
        sa = next(o["metadata"]["name"] for o in pm.of_kind(objs, "ServiceAccount")
                  if o["metadata"]["name"].endswith("-node"))
        wanted = [o for o in objs if o["kind"] == "ServiceAccount"
                  or (o["kind"] in ("Role", "RoleBinding") and "lease" in o["metadata"]["name"])
                  or o["kind"].startswith("ValidatingAdmissionPolicy")]
        assert any(o["kind"] == "ValidatingAdmissionPolicy" and "engine-leases" in o["metadata"]["name"]
                   for o in wanted), "the chart renders no Lease admission policy"
        c.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(wanted))
        yield c, root, sa


def _status(fn: Any) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        fn()
    except ApiException as e:
        return int(e.status)
    return 200


def test_a_node_writes_only_its_own_engine_lease(peer: tuple[Cluster, Path, str]) -> None:
    c, _, sa = peer
    admin = _keeper(c, "node-b")
    admin.renew_once()  # node-b's Lease, made by someone allowed to (the admin)
    admin._api.create_namespaced_lease(NS, {"metadata": {"name": "csi-flashcopy-operations"}})  # a leader Lease
    a = _keeper(c, "node-a", sa=sa, token_node="node-a")
    # node-a posing as node-b: the same LeaseKeeper, pointed at node-b's Lease
    forged = _keeper(c, "node-b", sa=sa, token_node="node-a")
    api = forged._api

    # the policy takes effect a moment after it is created: wait until node-a is refused node-b's Lease
    wait_for(lambda: _status(forged.renew_once) == 403, timeout=30, what="the Lease admission policy in force")
    assert _status(a.renew_once) == 200  # its own: created
    assert _status(a.renew_once) == 200  # and renewed (patch)
    assert _status(lambda: api.delete_namespaced_lease("node-b", NS)) == 403
    assert _status(lambda: api.create_namespaced_lease(NS, {
        "metadata": {"name": "node-c", "labels": forged._body()["metadata"]["labels"]}})) == 403
    leader = "csi-flashcopy-operations"
    assert _status(lambda: api.patch_namespaced_lease(leader, NS, {"spec": {"holderIdentity": "node-a"}})) == 403
    assert _status(lambda: api.delete_namespaced_lease(leader, NS)) == 403
    # a Lease named after the node but without the engine label is not an engine Lease either
    assert _status(lambda: a._api.patch_namespaced_lease("node-a", NS, {
        "metadata": {"labels": {"app.kubernetes.io/component": "other"}}})) == 403
    # no node name in the token: nothing
    anon = _keeper(c, "node-a", sa=sa)
    assert _status(anon.renew_once) in (403, 422)  # denied (422 when a rule cannot be evaluated without it)
    # node-b's Lease is untouched, and node-a deletes its own on a clean stop
    lease = admin._api.read_namespaced_lease("node-b", NS)
    assert lease.spec.holder_identity == "node-b"
    assert _status(lambda: a._api.delete_namespaced_lease("node-a", NS)) == 200
