#!/usr/bin/env bash
# Debian packages the real-kubelet peer (../shared/peers/k8s-node, used by tests/kubelet) needs: containerd (CRI),
# runc and the CNI plugins (bridge, host-local, loopback in /usr/lib/cni). Idempotent: does nothing when they are
# installed, when the peer is absent (the tests skip then) or when not root (the tests skip then too, saying why).
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER=${KUBELET_PEER:-../shared/peers/k8s-node}
if [ ! -x "$PEER/node-up.sh" ]; then
  echo "kubelet peer: $PEER absent, nothing to install"
  exit 0
fi
pkgs=(containerd runc containernetworking-plugins)
missing=()
for p in "${pkgs[@]}"; do
  # capture, then match: with pipefail, `grep -q` closing the pipe early would fail dpkg-query with SIGPIPE
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "kubelet peer: missing Debian packages (need root to install): ${missing[*]}" >&2
    exit 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "kubelet peer: $(containerd --version 2>/dev/null || echo 'containerd ?'), $(runc --version 2>/dev/null | sed -n 1p || echo 'runc ?')"
