#!/usr/bin/env bash
# Debian packages `make image` uses (deploy/image/build.sh): debootstrap makes the Debian bookworm base from
# Debian's mirror (no container registry is reachable), buildah builds the Dockerfile on it without a daemon and
# writes the docker-archive. Idempotent: does nothing when they are installed, or when not root (the image test
# skips then, saying why).
set -euo pipefail
source "$(dirname "$0")/../debian-packages.sh"
ensure_packages "image tools" buildah debootstrap
echo "image tools: $(buildah --version 2>/dev/null || echo 'buildah ?'), debootstrap $(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo '?')"
