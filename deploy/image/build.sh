#!/usr/bin/env bash
# `make image`: the driver image, built from the Dockerfile with only Debian's and PyPI's package registries
# reachable (no container registry, no docker daemon), into dist/image.tar (docker-archive; `ctr images import`,
# `docker load` and `podman load` take it), tagged ghcr.io/csi-flashcopy/csi-flashcopy:<the chart's appVersion>.
#   1. the base, once: a Debian bookworm rootfs made by debootstrap (minbase + python3, i.e. CPython 3.11, the ABI
#      of the wheel) from Debian's mirror, trimmed like the Docker "slim" images (no docs, man pages, locales, apt
#      lists) and committed as $BASE_IMAGE to buildah storage of our own ($IMAGE_CACHE/containers); kept there for
#      the next builds (BASE_REFRESH=1 makes it again, e.g. for Debian's security updates)
#   2. buildah bud on the Dockerfile with PYTHON_IMAGE=$BASE_IMAGE (--layers: an unchanged step is not run again);
#      the build stage is tagged too, so that pruning the layers of older builds keeps this build's cache
#   3. buildah push to dist/image.tar, then the reference and the sizes are printed
# Needs root and buildah + debootstrap (.ci/setup.d/50-image-tools.sh installs them).
# Knobs: IMAGE (the reference), BASE_IMAGE, DEBIAN_MIRROR, IMAGE_CACHE (debootstrap's .deb cache, buildah's storage:
#        rm -rf it for a cold build), IMAGE_STORE, BASE_REFRESH=1,
#        OUT (default dist/image.tar).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "make image: needs root (buildah's storage, debootstrap)" >&2; exit 1; }
for t in buildah debootstrap; do
  command -v "$t" >/dev/null || { echo "make image: no $t: run .ci/setup.d/50-image-tools.sh" >&2; exit 1; }
done
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/csi-flashcopy/Chart.yaml)
[ -n "$version" ] || { echo "make image: no appVersion in charts/csi-flashcopy/Chart.yaml" >&2; exit 1; }
IMAGE=${IMAGE:-ghcr.io/csi-flashcopy/csi-flashcopy:$version}
BASE_IMAGE=${BASE_IMAGE:-localhost/csi-flashcopy-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE_CACHE=${IMAGE_CACHE:-/var/cache/csi-flashcopy-image}
OUT=${OUT:-dist/image.tar}
# buildah's storage of its own (the base, the layer cache): never the machine's podman/buildah images, so that
# pruning the old layers below touches nothing else
STORE=${IMAGE_STORE:-$IMAGE_CACHE/containers}
bh() { buildah --root "$STORE" --runroot /run/csi-flashcopy-image "$@"; }
start=$(date +%s)

if [ "${BASE_REFRESH:-0}" = 1 ] || ! bh inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "make image: base $BASE_IMAGE: debootstrap bookworm (minbase + python3) from $DEBIAN_MIRROR"
  mkdir -p "$IMAGE_CACHE/debs"
  root=$(mktemp -d /var/tmp/csi-flashcopy-base.XXXXXX)
  ctr=""
  cleanup() {
    [ -z "$ctr" ] || bh rm "$ctr" >/dev/null 2>&1 || true
    rm -rf --one-file-system "$root"
  }
  trap cleanup EXIT
  debootstrap --variant=minbase --include=python3 --cache-dir="$IMAGE_CACHE/debs" bookworm "$root" \
    "$DEBIAN_MIRROR" > "$IMAGE_CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$IMAGE_CACHE/debootstrap.log" >&2; exit 1; }
  # what later apt-get installs (the Dockerfile's) leave out, as in Docker's slim images; copyright files stay
  cat > "$root/etc/dpkg/dpkg.cfg.d/01-csi-flashcopy-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
EOF
  cat > "$root/etc/apt/apt.conf.d/01-csi-flashcopy-slim" <<'EOF'
APT::Install-Recommends "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
EOF
  cat > "$root/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-${DEBIAN_MIRROR%/debian}/debian-security} bookworm-security main
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$root"/usr/share/{man,info,groff,lintian}/* "$root"/usr/share/locale/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/debconf/*-old \
    "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
  : > "$root/etc/machine-id"
  ctr=$(bh from scratch)
  tar -C "$root" -cf - . | tar -C "$(bh mount "$ctr")" -xpf -
  bh umount "$ctr" >/dev/null
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash \
    --label org.opencontainers.image.description="Debian bookworm minbase + python3 (debootstrap)" "$ctr"
  bh commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  ctr=""
  cleanup
  trap - EXIT
  echo "make image: base $BASE_IMAGE made in $(( $(date +%s) - start )) s"
fi

# pip in the build stage trusts what the host's pip trusts (the host's CA bundle, mounted read-only for RUN steps)
ca=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}}
ca_args=()
[ ! -f "$ca" ] || ca_args=(--volume "$ca:/run/csi-flashcopy-build-ca.crt:ro" --build-arg PIP_CA_BUNDLE=/run/csi-flashcopy-build-ca.crt)
mkdir -p "$(dirname "$OUT")"
log=$(dirname "$OUT")/image-build.log
bh bud --layers --force-rm --isolation chroot --network host --pull-never "${ca_args[@]}" \
  --build-arg PYTHON_IMAGE="$BASE_IMAGE" -t "$IMAGE" . > "$log" 2>&1 || { tail -30 "$log" >&2; exit 1; }
grep '^prune: ' "$log" || true
# the build stage by name (all its steps are cached now), then the images of older builds, which nothing names any
# more, go: a layer is removed once no image uses it (a few passes: a removed image can leave its parent unnamed)
bh bud --quiet --layers --force-rm --isolation chroot --network host --pull-never "${ca_args[@]}" \
  --build-arg PYTHON_IMAGE="$BASE_IMAGE" --target build -t localhost/csi-flashcopy-build:cache . >> "$log" 2>&1
for _ in 1 2 3 4 5 6; do
  [ -n "$(bh images --quiet --filter dangling=true)" ] || break
  bh rmi --prune >> "$log" 2>&1 || break
done
rm -f "$OUT"
bh push --quiet "$IMAGE" "docker-archive:$OUT:$IMAGE" >/dev/null
# the root filesystem as a container sees it (uncompressed)
ctr=$(bh from --pull-never "$IMAGE")
rootfs=$(du -sx --block-size=1 "$(bh mount "$ctr")" | cut -f1)
bh rm "$ctr" >/dev/null
tarsize=$(stat -c %s "$OUT")
echo "image: $IMAGE"
echo "file:  $OUT $(( tarsize / 1000000 )) MB (docker-archive, uncompressed layers)"
echo "size:  $(( rootfs / 1000000 )) MB root filesystem (uncompressed); built in $(( $(date +%s) - start )) s"
