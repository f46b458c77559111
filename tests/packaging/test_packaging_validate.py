"""Every rendered object (chart for the whole values matrix, every kustomize directory, the examples) against the
Kubernetes 1.31 and 1.34 OpenAPI schemas in strict mode (kubernetes-validate), and the snapshot-class objects
against the external-snapshotter v8.6 CRD schemas (from ../shared/peers/k8s/crd when present)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.packaging import packaging_manifests as pm

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (.ci/setup.d/30-k8s-tools.sh)")

K8S_VERSIONS = ("1.31", "1.34")


def _sources(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]]) -> dict[str, list[pm.Obj]]:
    out = {f"chart:{k}": v for k, v in renders.items()}
    out.update({f"kustomize:{k}": v for k, v in kustomized.items()})
    out.update({f"example:{k}": v for k, v in pm.examples().items()})
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strict(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]],
                                       version: str) -> None:
    failures, checked = [], 0
    for source, objs in _sources(renders, kustomized).items():
        for o in objs:
            if o["kind"] in pm.CRD_KINDS:
                continue
            try:
                kv.validate(o, version, strict=True)
                checked += 1
            except (kv.ValidationError, kv.SchemaNotFoundError) as e:
                failures.append(f"{source} {o['kind']}/{o['metadata']['name']}: {str(e).splitlines()[0]}")
    assert not failures, "\n".join(failures)
    assert checked >= 100


def test_strict_validation_catches_a_typo(renders: dict[str, list[pm.Obj]]) -> None:
    # Guard against a validator that accepts everything: a misspelt container field must fail.
    (ds,) = pm.of_kind(renders["defaults"], "DaemonSet")
    bad = copy.deepcopy(ds)
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.31", strict=True)


def _strict(schema: Any) -> Any:
    """CRD structural schema -> JSON schema rejecting fields the API server would prune (strict, like kubectl)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def test_snapshot_kinds_validate_against_crds(renders: dict[str, list[pm.Obj]],
                                              kustomized: dict[str, list[pm.Obj]]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = pm.peer_crd_schemas()
    if not schemas:
        pytest.skip(f"no snapshot CRDs at {pm.PEER_K8S / 'crd'} (the k8s test peer is absent)")
    failures, checked = [], 0
    for source, objs in _sources(renders, kustomized).items():
        for o in objs:
            if o["kind"] not in pm.CRD_KINDS:
                continue
            schema = schemas.get((o["apiVersion"], o["kind"]))
            if schema is None:
                failures.append(f"{source} {o['kind']}: {o['apiVersion']} is not served by the CRDs")
                continue
            body = {k: v for k, v in o.items() if k != "metadata"}
            errors = list(jsonschema.Draft7Validator(_strict(schema)).iter_errors(body))
            failures += [f"{source} {o['kind']}/{o['metadata']['name']}: {e.message}" for e in errors]
            checked += 1
    assert not failures, "\n".join(failures)
    assert checked >= 10
    # groupsnapshot.storage.k8s.io/v1 is what the chart emits (served by external-snapshotter v8.6 CRDs).
    kinds = {(o["apiVersion"], o["kind"]) for o in renders["defaults"] if o["kind"] in pm.CRD_KINDS}
    assert kinds == {("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"),
                     ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshotClass")}
