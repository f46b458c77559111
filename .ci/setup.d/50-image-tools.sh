#!/usr/bin/env bash
# Debian packages `make image` uses (deploy/image/build.sh): debootstrap makes the Debian bookworm base from
# Debian's mirror (no container registry is reachable), buildah builds the Dockerfile on it without a daemon and
# writes the docker-archive. Idempotent: does nothing when they are installed, or when not root (the image test
# skips then, saying why).
set -euo pipefail
pkgs=(buildah debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  # capture, then match: with pipefail, `grep -q` closing the pipe early would fail dpkg-query with SIGPIPE
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "image tools: missing Debian packages (need root to install): ${missing[*]}" >&2
    exit 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "image tools: $(buildah --version 2>/dev/null || echo 'buildah ?'), debootstrap $(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo '?')"
