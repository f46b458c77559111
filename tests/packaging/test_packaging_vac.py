"""The chart's example VolumeAttributesClasses (values volumeAttributesClasses) and what ModifyVolume needs from the
sidecars: rendered only when asked, storage.k8s.io/v1 from Kubernetes 1.34, the chart's driver name, parameters
the driver itself accepts as mutable, schema rejections, and csi-resizer's VolumeAttributesClass RBAC in every
render (chart and kustomize)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from csi_driver.csi.params import MutableParams, parse_mutable_params
from tests.packaging import packaging_manifests as pm

ON = {"volumeAttributesClasses": {"create": True}}


def _vacs(objs: list[pm.Obj]) -> dict[str, pm.Obj]:
    return {o["metadata"]["name"]: o for o in pm.of_kind(objs, "VolumeAttributesClass")}


def test_not_rendered_by_default(renders: dict[str, list[pm.Obj]]) -> None:
    for name, objs in renders.items():
        assert _vacs(objs) == {}, name


def test_example_classes(helm: str) -> None:
    vacs = _vacs(pm.helm_template(ON))
    assert sorted(vacs) == ["flashcopy-fast", "flashcopy-paused"]
    for v in vacs.values():
        assert v["apiVersion"] == "storage.k8s.io/v1" and v["driverName"] == "flashcopy.csi.dev"
        assert v["metadata"]["labels"]["app.kubernetes.io/component"] == "classes"
        assert "namespace" not in v["metadata"]  # cluster-scoped
    # the driver's own parser accepts them as they are rendered: one rule set for chart and driver
    assert parse_mutable_params(vacs["flashcopy-fast"]["parameters"]) == MutableParams(copy_rate=150)
    assert parse_mutable_params(vacs["flashcopy-paused"]["parameters"]) == MutableParams(copy_rate=0)


def test_custom_classes_driver_name_and_api_version(helm: str) -> None:
    values = {"driverName": "fc.example.com", "volumeAttributesClasses": {"create": True, "classes": [
        {"name": "slow-clean", "parameters": {"copyRate": 60, "cleanRate": "10"}}]}}
    (v,) = _vacs(pm.helm_template(values)).values()
    assert v["driverName"] == "fc.example.com"
    assert v["parameters"] == {"copyRate": "60", "cleanRate": "10"}  # strings, as the API requires
    assert parse_mutable_params(v["parameters"]) == MutableParams(60, 10)
    # before 1.34 only the beta API exists
    (old,) = _vacs(pm.helm_template(values, kube_version="1.33.2")).values()
    assert old["apiVersion"] == "storage.k8s.io/v1beta1"
    assert _vacs(pm.helm_template({"volumeAttributesClasses": {"create": True, "classes": []}})) == {}


def test_lint_strict_with_classes(helm: str, tmp_path: Path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(ON))
    r = pm.helm("lint", "--strict", str(pm.CHART), "--kube-version", "1.34.0", "-f", str(f), check=False)
    assert r.returncode == 0 and "[WARNING]" not in r.stdout, r.stdout + r.stderr


BAD: dict[str, tuple[pm.Obj, str]] = {
    "immutable-key": ({"classes": [{"name": "a", "parameters": {"grainSize": "64Ki"}}]}, "grainSize"),
    "unknown-key": ({"classes": [{"name": "a", "parameters": {"iops": "5"}}]}, "iops"),
    "rate-out-of-range": ({"classes": [{"name": "a", "parameters": {"copyRate": "151"}}]}, "copyRate"),
    "no-parameters": ({"classes": [{"name": "a", "parameters": {}}]}, "parameters"),
    "name-not-dns": ({"classes": [{"name": "Fast", "parameters": {"copyRate": "1"}}]}, "name"),
    "create-as-string": ({"create": "yes"}, "create"),
    "unknown-field": ({"enabled": True}, "enabled"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_wrong_values_are_rejected(helm: str, tmp_path: Path, name: str) -> None:
    block, where = BAD[name]
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"volumeAttributesClasses": block}))
    r = pm.helm("template", "x", str(pm.CHART), "-f", str(f), check=False)
    assert r.returncode != 0 and "values don't meet the specifications of the schema" in r.stderr, r.stderr
    assert where in r.stderr, r.stderr


def _resizer_rules(objs: list[pm.Obj]) -> list[pm.Obj]:
    (role,) = [o for o in pm.of_kind(objs, "ClusterRole") if o["metadata"]["name"].endswith("-resizer")]
    return list(role["rules"])


def test_resizer_may_read_volume_attributes_classes(renders: dict[str, list[pm.Obj]],
                                                    kustomized: dict[str, list[pm.Obj]]) -> None:
    """csi-resizer v2 watches VolumeAttributesClasses and patches the PVC status it reports ModifyVolume in."""
    for name, objs in [*renders.items(), *(("kustomize:" + k, v) for k, v in kustomized.items())]:
        rules = _resizer_rules(objs)
        vac = [r for r in rules if "volumeattributesclasses" in r["resources"]]
        assert vac and vac[0]["apiGroups"] == ["storage.k8s.io"], name
        assert set(vac[0]["verbs"]) == {"get", "list", "watch"}, name
        status = [r for r in rules if "persistentvolumeclaims/status" in r["resources"]]
        assert status and "patch" in status[0]["verbs"], name
    tag = yaml.safe_load((pm.CHART / "values.yaml").read_text())["sidecars"]["resizer"]["image"]["tag"]
    assert int(tag.lstrip("v").split(".")[0]) >= 2, f"csi-resizer {tag}: VolumeAttributesClass is GA from v2"
