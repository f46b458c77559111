# syntax=docker/dockerfile:1
# csi-flashcopy: the CSI driver (`csi-flashcopy serve`) and the node engine (`csi-flashcopy engine`) in one image.
#   docker build -t <registry>/csi-flashcopy:<version> .
# The chart and deploy/kubernetes run it non-root for the controller and privileged (uid 0) for the node plugin
# and engine only.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel is built from (the gRPC stubs are committed under csi_driver/proto_gen).
COPY pyproject.toml README.md ./
COPY csi_driver ./csi_driver
# a C compiler for the data path's FUSE loop (csi_driver/datapath/_fuseloop.c); the wheel must carry it, so the
# build checks that it was really compiled (the extension is optional for source installs only)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN pip wheel --wheel-dir /wheels . \
 && python -c "import sys, zipfile, glob; w = glob.glob('/wheels/csi_flashcopy-*.whl')[0]; sys.exit(0 if any('_fuseloop' in n for n in zipfile.ZipFile(w).namelist()) else 'the FUSE loop extension was not built')"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="csi-flashcopy" \
      org.opencontainers.image.description="CSI driver for node-local volumes with FlashCopy-style point-in-time copies" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Host tools of the node data path:
#   e2fsprogs, xfsprogs   mkfs.ext4/mkfs.xfs, resize2fs/xfs_growfs
#   util-linux, mount     losetup, blkid, fsfreeze, mount/umount
#   (FUSE needs no package: the engine speaks the kernel protocol on /dev/fuse itself)
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels csi-flashcopy && rm -rf /wheels
# Non-root by default (the controller Deployment runs as this user); the node DaemonSet sets runAsUser 0.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin csi
USER 10001:10001
ENTRYPOINT ["csi-flashcopy"]
CMD ["serve"]
