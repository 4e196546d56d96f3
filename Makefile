# Each target sets up what it needs: a .venv with torch, the test tools and bandadv built in place.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
# The TRL adapter's tests run TRL's trainers; pinned together (the adapter uses TRL 1.16 internals).
TRL ?= trl==1.16.0 transformers==5.24.0 accelerate==1.15.0 datasets==5.2.0
export CUDA_HOME ?= /usr/local/cuda

.PHONY: setup build simulate compare demo bench test lint format clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "setuptools>=64" wheel ninja pytest hypothesis numpy ruff matplotlib
	$(PY) -m pip install -q $(TRL)
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/* csrc/cuda/*)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

setup: $(VENV)/.deps
build: $(VENV)/.built

simulate: build
	$(PY) -m bandadv simulate

compare: build
	$(PY) -m bandadv simulate --compare --seeds 5

demo: build
	$(PY) -m bandadv demo

bench: build
	$(PY) -m bandadv bench

test: build
	BANDADV_REQUIRE_EXT=1 $(PY) -m pytest -q tests

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.deps
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build python/bandadv/_C*.so *.egg-info python/*.egg-info
