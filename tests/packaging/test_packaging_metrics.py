"""The chart's metrics option (docs/metrics.md): metrics ports and flags on serve and the engine container, the
headless metrics Services, and the ServiceMonitor rendered only when asked for."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from csi_driver import cli
from tests.packaging import packaging_manifests as pm

ON = {"metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}


def _ports(c: pm.Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def test_nothing_by_default(helm: str) -> None:
    objs = pm.helm_template()
    assert not pm.of_kind(objs, "ServiceMonitor") and not pm.of_kind(objs, "Service")
    for _, _, c in pm.containers(objs):
        assert "metrics" not in _ports(c) and "engine-metrics" not in _ports(c)
        assert pm.flag_value(c.get("args", []), "--metrics-address") is None
    # metrics on without the ServiceMonitor: ports and Services, no ServiceMonitor
    objs = pm.helm_template({"metrics": {"enabled": True}})
    assert not pm.of_kind(objs, "ServiceMonitor") and len(pm.of_kind(objs, "Service")) == 2


@pytest.mark.parametrize("topology", ["multi-node", "single-node"])
def test_ports_flags_services_and_service_monitor(helm: str, topology: str) -> None:
    objs = pm.helm_template({**ON, "topology": topology})
    parser = cli.build_parser()
    served: dict[str, set[str]] = {}  # component -> the port names its pods' containers declare
    for w, _, c in pm.containers(objs):
        if not pm.is_driver_container(c):
            continue
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        ns = parser.parse_args([a.replace("$(", "").replace(")", "") for a in c["args"]])
        if ns.command in ("fuse-keeper", "doctor"):
            continue  # no metrics of its own
        if ns.command == "serve":
            assert ns.metrics_address == "POD_IP:9810" and _ports(c)["metrics"] == 9810
        else:
            assert ns.command == "engine"
            assert ns.metrics_address == "POD_IP:9821" and _ports(c)["engine-metrics"] == 9821
        # bound to the pod IP only, from the downward API (issue 22: not every address of the pod)
        assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
        served.setdefault(component, set()).update(_ports(c))
    assert set(served) == ({"node"} if topology == "single-node" else {"controller", "node"})
    assert "engine-metrics" in served["node"]

    services = pm.of_kind(objs, "Service")
    assert len(services) == len(served)
    for svc in services:
        component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == component
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in served[component], f"{component}: {p} names no container port"
    (sm,) = pm.of_kind(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    sel = sm["spec"]["selector"]
    for svc in services:
        labels = svc["metadata"]["labels"]
        assert all(labels[k] == v for k, v in sel["matchLabels"].items())
        assert labels["app.kubernetes.io/component"] in sel["matchExpressions"][0]["values"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [pm.NAMESPACE]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"metrics", "engine-metrics"}
    assert all(e["path"] == "/metrics" and e["interval"] == "30s" for e in sm["spec"]["endpoints"])


def test_embedded_engine_has_no_engine_port(helm: str) -> None:
    objs = pm.helm_template({**ON, "engine": {"separateContainer": False}})
    (node,) = [s for s in pm.of_kind(objs, "Service") if s["metadata"]["name"].endswith("-node-metrics")]
    assert [p["name"] for p in node["spec"]["ports"]] == ["metrics"]


def _lint(values: pm.Obj, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    return pm.helm("lint", "--strict", str(pm.CHART), "--namespace", pm.NAMESPACE, "--kube-version", "1.34.0",
                   "-f", str(f), check=False)


def test_lint_strict_with_service_monitor(helm: str, tmp_path: Path) -> None:
    r = _lint(ON, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("values, where", [
    ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
    ({"metrics": {"serviceMonitor": {"interval": 30}}}, "/metrics/serviceMonitor/interval"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"metrics": {"serviceMonitor": {"selector": {}}}}, "selector"),
    ({"metrics": {"enginePort": 0}}, "/metrics/enginePort"),
    ({"metrics": {"service": {"create": 1}}}, "/metrics/service/create"),
])
def test_wrong_metrics_values_are_rejected(helm: str, tmp_path: Path, values: pm.Obj, where: str) -> None:
    r = _lint(values, tmp_path)
    assert r.returncode != 0 and where in r.stdout + r.stderr, r.stdout + r.stderr


def test_service_monitor_needs_metrics(helm: str) -> None:
    r = pm.helm("template", "x", str(pm.CHART), "--set", "metrics.serviceMonitor.enabled=true", check=False)
    assert r.returncode != 0 and "metrics.serviceMonitor.enabled needs metrics.enabled" in r.stderr
