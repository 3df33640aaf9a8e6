# Quick start: `make demo` (set up, then train the embedded demo) and `make test` (set up, then run the tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-fast setup bench k8s clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned: the CPU wheel here; GPU images install their own CUDA build of the same version first.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) service/launch.py

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Unit tests only (no Ray cluster, S3 server, prometheus or helm): seconds to a couple of minutes.
test-fast: setup
	$(PY) -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) service/launch.py bench step --resolution 8 --resolution 16 --resolution 32 --resolution 64 \
	    --batch 16 --fmap-max 128 --threads 2

k8s:
	helm template pggan deploy/helm/pggan --api-versions monitoring.coreos.com/v1 > k8s/pggan.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
