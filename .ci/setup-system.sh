#!/usr/bin/env bash
# Debian packages the driver and its tests use. Idempotent; skips apt when everything is present.
set -euo pipefail
pkgs=(gcc libc6-dev fuse3 e2fsprogs xfsprogs util-linux fio xz-utils openssl curl bc)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages (need root to install): ${missing[*]}" >&2
    exit 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
