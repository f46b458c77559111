# Two entry points for a fresh Debian machine (run as root):
#   make run    install, then serve the CSI driver on ./state with the engine embedded
#   make test   install everything the tests need, then run all the tests
PYTHON ?= python3
STATE ?= $(CURDIR)/state

.PHONY: setup setup-python setup-system run test lint bench

setup-system:
	bash .ci/setup-system.sh

setup-python:
	$(PYTHON) -m pip install -q -e '.[test]'

setup: setup-system setup-python
	for f in .ci/setup.d/*.sh; do [ -e "$$f" ] && bash "$$f" || exit 1; done

run: setup-system setup-python
	mkdir -p $(STATE)
	csi-flashcopy serve --endpoint unix://$(STATE)/csi.sock --state-dir $(STATE) --node-id $$(hostname) --mode all

lint:
	$(PYTHON) -m ruff check .

test: setup
	$(PYTHON) -m pytest -q

bench: setup-python
	$(PYTHON) -m bench.run_all
