#!/usr/bin/env bash
# Debian packages the real-kubelet peer (../shared/peers/k8s-node, used by tests/kubelet) needs: containerd (CRI),
# runc and the CNI plugins (bridge, host-local, loopback in /usr/lib/cni). Idempotent: does nothing when they are
# installed, when the peer is absent (the tests skip then) or when not root (the tests skip then too, saying why).
set -euo pipefail
source "$(dirname "$0")/../debian-packages.sh"
cd "$(dirname "$0")/../.."
PEER=${KUBELET_PEER:-../shared/peers/k8s-node}
if [ ! -x "$PEER/node-up.sh" ]; then
  echo "kubelet peer: $PEER absent, nothing to install"
  exit 0
fi
ensure_packages "kubelet peer" containerd runc containernetworking-plugins
echo "kubelet peer: $(containerd --version 2>/dev/null || echo 'containerd ?'), $(runc --version 2>/dev/null | sed -n 1p || echo 'runc ?')"
