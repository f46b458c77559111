"""The node pod in every layout: the container that mounts (NodeStage/NodePublish: the engine container when
engine.separateContainer, else the plugin container; the doctor init container) has the kubelet dir and the state
dir with Bidirectional propagation, /dev and /sys, and is privileged. A mount made without the kubelet dir lands
in the container's private mount namespace: the Pod's volume would be the host's root disk (issue 23)."""

from __future__ import annotations

import itertools

import pytest

from tests.packaging import node_layout
from tests.packaging import packaging_manifests as pm

CUSTOM_DIRS = {"kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet", "stateDir": "/srv/flashcopy"}
# every layout value (topology x engine container x keeper); half of them with the custom dirs (a render takes
# seconds on this machine)
LAYOUTS = {
    f"{topo}-separate={sep}-keeper={keeper}": pm.deep_merge(
        {"topology": topo, "engine": {"separateContainer": sep}, "fuseKeeper": {"enabled": keeper},
         "metrics": {"enabled": keeper}}, {} if keeper else CUSTOM_DIRS)
    for topo, sep, keeper in itertools.product(("single-node", "multi-node"), (True, False), (True, False))
}


def _node_spec(objs: list[pm.Obj]) -> pm.Obj:
    (ds,) = pm.of_kind(objs, "DaemonSet")
    return ds["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_mounting_container_reaches_the_kubelet(helm: str, name: str) -> None:
    full = pm.chart_values(LAYOUTS[name])
    spec = _node_spec(pm.helm_template(LAYOUTS[name]))
    names = [c["name"] for c in node_layout.mounting_containers(spec)]
    want = "engine" if full["engine"]["separateContainer"] else "csi-flashcopy"
    assert want in names, f"{name}: the data path runs in {want}, found mounting containers {names}"
    assert node_layout.layout_problems(spec, full["kubeletDir"], full["stateDir"]) == []


def test_layout_check_sees_a_missing_kubelet_dir(helm: str) -> None:
    """The checker itself: the engine container without the kubelet dir (the chart before issue 23) fails."""
    spec = _node_spec(pm.helm_template({}))
    (engine,) = [c for c in spec["containers"] if c["name"] == "engine"]
    engine["volumeMounts"] = [m for m in engine["volumeMounts"] if m["name"] != "kubelet-dir"]
    problems = node_layout.layout_problems(spec, "/var/lib/kubelet", pm.chart_values()["stateDir"])
    assert any("engine: does not mount /var/lib/kubelet" in p for p in problems), problems


@pytest.mark.parametrize("name", sorted(pm.KUSTOMIZE_RENDERS))
def test_kustomize_node_layout(kustomized: dict[str, list[pm.Obj]], name: str) -> None:
    values = pm.chart_values(pm.KUSTOMIZE_RENDERS[name][1])
    spec = _node_spec(kustomized[name])
    assert node_layout.layout_problems(spec, values["kubeletDir"], values["stateDir"]) == []
