# Two entry points for a fresh Debian machine (run as root):
#   make run    install, then serve the CSI driver on ./state: serve --mode all, which starts the node engine
#               process (volume data, FUSE exports) and stops it again on Ctrl-C/SIGTERM, leaving nothing behind
#   make test   install everything the tests need, then lint, type-check and run all the tests
# Also: make bench (every benchmark; BENCH_ARGS=--quick for a smoke run), make lint, make typecheck.
#   make image  the driver image from the Dockerfile into dist/image.tar (docker-archive), tagged
#               ghcr.io/csi-flashcopy/csi-flashcopy:<the chart's appVersion>; root, no container registry or daemon
#               (debootstrap + buildah: deploy/image/build.sh)
PYTHON ?= python3
STATE ?= $(CURDIR)/state
BENCH_ARGS ?=
RUN_ARGS ?=

.PHONY: setup setup-python setup-system run test lint typecheck bench image

setup-system:
	bash .ci/setup-system.sh

setup-python:
	$(PYTHON) -m pip install -q -e '.[test]'

setup: setup-system setup-python
	for f in .ci/setup.d/*.sh; do [ -e "$$f" ] && bash "$$f" || exit 1; done

run: setup-system setup-python
	mkdir -p $(STATE)
	csi-flashcopy serve --endpoint unix://$(STATE)/csi.sock --state-dir $(STATE) --node-id $$(hostname) --mode all $(RUN_ARGS)

lint:
	$(PYTHON) -m ruff check .

typecheck:
	$(PYTHON) -m mypy

# make test builds the driver image too (tests/packaging/test_packaging_image.py checks it; CI runs this every
# time): CSI_FLASHCOPY_IMAGE_BUILD=0 checks an existing dist/image.tar instead, or skips without one
test: export CSI_FLASHCOPY_IMAGE_BUILD ?= 1
test: setup typecheck
	$(PYTHON) -m pytest -q --durations=15

bench: setup-python
	$(PYTHON) -m bench.run_all $(BENCH_ARGS)

image:
	bash .ci/setup.d/50-image-tools.sh
	bash deploy/image/build.sh
