# syntax=docker/dockerfile:1
# csi-flashcopy: the CSI driver (`csi-flashcopy serve`) and the node engine (`csi-flashcopy engine`) in one image.
#   make image      what CI and the docs use: deploy/image/build.sh makes a Debian bookworm base with debootstrap
#                   (Debian's mirror only, no container registry), builds this file on it with buildah (no daemon:
#                   --build-arg PYTHON_IMAGE=localhost/csi-flashcopy-base:bookworm) and writes dist/image.tar
#                   (docker-archive) tagged ghcr.io/csi-flashcopy/csi-flashcopy:<the chart's appVersion>
#   docker build -t <registry>/csi-flashcopy:<version> .      where Docker Hub is reachable (python:3.11-slim-bookworm)
# Either base is Debian 12 with CPython 3.11, the ABI of the wheel. The chart and deploy/kubernetes run the image
# non-root (uid 10001) for the controller and as root (privileged) for the node plugin and engine only.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
# a C compiler and Python's headers for the data path's FUSE loop (csi_driver/datapath/_fuseloop.c); venv for the
# install tree that the runtime stage copies (on python:3.11-slim python3-dev/-venv are Debian's copy, unused there)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The host's CA bundle for pip, when the build passes one (deploy/image/build.sh mounts the host's trust store
# read-only for the build's RUN steps only: PyPI may sit behind a TLS-inspecting proxy); never part of an image.
ARG PIP_CA_BUNDLE=""
# The dependencies and the build backend first (their own layer: a change under csi_driver/ downloads nothing again).
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/csi-flashcopy \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" > /tmp/requirements.txt \
 && /opt/csi-flashcopy/bin/pip install -q ${PIP_CA_BUNDLE:+--cert "$PIP_CA_BUNDLE"} -r /tmp/requirements.txt
# Only what the wheel is built from (the gRPC stubs are committed under csi_driver/proto_gen).
COPY csi_driver ./csi_driver
# The wheel must carry the FUSE loop extension (it is optional for source installs only), so the build checks that
# it was really compiled. Then deploy/image/prune.py removes what the driver never imports (the kubernetes
# client's asyncio copy and its aiohttp stack, pip and setuptools) and checks that every import the driver makes
# still works.
COPY deploy/image/prune.py /tmp/prune.py
RUN /opt/csi-flashcopy/bin/pip install -q --no-deps --no-build-isolation --no-index . \
 && /opt/csi-flashcopy/bin/python -c "import csi_driver.datapath._fuseloop" \
 && /opt/csi-flashcopy/bin/python /tmp/prune.py

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="csi-flashcopy" \
      org.opencontainers.image.description="CSI driver for node-local volumes with FlashCopy-style point-in-time copies" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/csi-flashcopy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Host tools of the node data path:
#   e2fsprogs, xfsprogs   mkfs.ext4/mkfs.xfs, resize2fs/xfs_growfs, e2fsck/dumpe2fs
#   util-linux, mount     losetup, blkid, fsfreeze, fallocate, mount/umount
#   (FUSE needs no package: the engine speaks the kernel protocol on /dev/fuse itself)
# xfsprogs depends on libicu72 (36 MB) for xfs_scrub only (its Unicode name checks); the driver never runs xfs_scrub,
# so both go, after a check that no other binary of xfsprogs links libicu.
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount \
 && if ldd $(dpkg -L xfsprogs | grep -E '/s?bin/.' | grep -v xfs_scrub) 2>/dev/null | grep libicu; then \
      echo "an xfsprogs tool other than xfs_scrub links libicu" >&2; exit 1; fi \
 && rm -f /usr/sbin/xfs_scrub /usr/sbin/xfs_scrub_all /usr/lib/systemd/system/xfs_scrub* \
 && dpkg --purge --force-depends libicu72 \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
COPY --from=build /opt/csi-flashcopy /opt/csi-flashcopy
# Non-root by default (the controller Deployment runs as this user); the node DaemonSet sets runAsUser 0.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin csi \
 && csi-flashcopy --help > /dev/null
USER 10001:10001
ENTRYPOINT ["csi-flashcopy"]
CMD ["serve"]
