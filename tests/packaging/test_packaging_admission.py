"""Issue 22 item 6: the operations CRDs refuse a malformed VolumeRefresh selector or name at admission (the
CRD schema), and the chart ships a ValidatingAdmissionPolicy refusing a selector that names no label value.
These check the rendered objects; tests/k8s/test_operations.py applies them to a real API server."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from csi_driver.ops.reconciler import SELECTOR_PATTERN, selector_problem
from tests.packaging import packaging_manifests as pm

CRDS = pm.CHART / "crds" / "flashcopy.csi.dev.yaml"


def _spec_props(kind: str) -> dict[str, Any]:
    crd = next(d for d in yaml.safe_load_all(CRDS.read_text()) if d["spec"]["names"]["kind"] == kind)
    props: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return props


def test_crd_selector_pattern_is_the_reconcilers() -> None:
    sel = _spec_props("VolumeRefresh")["selector"]
    assert sel["pattern"] == SELECTOR_PATTERN and sel["maxLength"] == 1024
    for good in ("team=qa", "app.kubernetes.io/managed-by=csi-flashcopy-clone", "a in (x, y),b!=c", "!gone"):
        assert re.match(sel["pattern"], good) and selector_problem(good) is None
    for bad in ("a=b=c", "team=qa,", "a b", "=x", "a in ()x", "é=1"):
        assert not re.match(sel["pattern"], bad) and selector_problem(bad)
    for kind, field in (("VolumeRestore", "pvcName"), ("VolumeRestore", "snapshotName"),
                        ("VolumeRefresh", "fromSnapshot"), ("VolumeRefresh", "snapshotClassName")):
        name = _spec_props(kind)[field]
        assert not re.match(name["pattern"], "../x") and not re.match(name["pattern"], "A")
        assert re.match(name["pattern"], "prod-snap.1")


def _policy(values: pm.Obj | None = None) -> list[pm.Obj]:
    return [o for o in pm.helm_template(values)  # (not the engine Lease policy: test_packaging_multinode.py)
            if o["kind"].startswith("ValidatingAdmissionPolicy") and "engine-leases" not in o["metadata"]["name"]]


def test_admission_policy_rendered_by_default(helm: str) -> None:
    vap, binding = sorted(_policy(), key=lambda o: o["kind"])
    assert vap["kind"] == "ValidatingAdmissionPolicy" and binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"] and vap["spec"]["failurePolicy"] == "Fail"
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["flashcopy.csi.dev"] and rule["resources"] == ["volumerefreshes"]
    (check,) = vap["spec"]["validations"]
    # the CEL regex (RE2, unanchored `matches`) read with Python's re, which agrees on this subset
    regex = re.search(r"matches\('(.*)'\)", check["expression"]).group(1)  # type: ignore[union-attr]
    for selects_by_value in ("team=qa", "a!=b,team==qa", "tier in (x)", "x/y=z"):
        assert re.search(regex, selects_by_value), selects_by_value
    for sweeps in ("!gone", "team!=prod", "a", "a notin (b)"):
        assert not re.search(regex, sweeps), sweeps


@pytest.mark.parametrize("values", [{"operations": {"admissionPolicy": False}}, {"operations": {"enabled": False}}])
def test_admission_policy_off(helm: str, values: pm.Obj) -> None:
    assert _policy(values) == []
