# make demo      create .venv, install, run the main job on the embedded digits data
# make test      create or reuse .venv, install, run the test suite (slow tests skipped)
# make test-full the test suite including slow tests
# make bench     the speed benchmarks (figures go in benchmarks/README.md)
# make clean     remove caches and outputs (keeps .venv and data)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-full bench clean install

install: $(STAMP)

# Reinstall only when the dependency files change. torch/torchvision come first, pinned, so that
# pip takes the local wheels rather than resolving a newer build for another package.
$(STAMP): requirements.txt requirements-nodeps.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -qq -r requirements.txt
	$(PY) -m pip install -qq --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -qq --no-deps -e '.[dev]'
	$(PY) -m pip install -qq 'pytest>=8'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m trigact.pipeline experiment=demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-full: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_cost.py
	$(PY) benchmarks/attack_cost.py
	$(PY) benchmarks/defense_cost.py
	$(PY) benchmarks/threat_cost.py

clean:
	rm -rf outputs multirun .pytest_cache build dist src/*.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
