# Each target sets up what it needs: a .venv with torch, the test tools and bandadv built in place.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
PINS ?=
# The TRL adapter's tests run TRL's trainers; pinned together (the adapter uses TRL 1.16 internals).
TRL ?= trl==1.16.0 transformers==5.24.0 accelerate==1.15.0 datasets==5.2.0
# The verl adapter's tests run verl 0.9.1's own trainer functions. verl pins torch 2.11 and
# transformers < 5.11, so verl goes in without its dependencies (with tensordict 0.10, the newest it
# allows, and the TransferQueue client its V1 trainer imports; no Ray cluster or queue is started),
# then only what importing verl.trainer.ppo.{core_algos,ray_trainer,v1.utils} needs.
VERL ?= verl==0.9.1 tensordict==0.10.0 transferqueue==0.1.11
VERL_IMPORTS ?= ray==2.60.0 omegaconf==2.3.1 hydra-core==1.3.8 codetiming==1.4.0 orjson==3.13.0 cloudpickle \
	importlib_metadata 'pyvers<0.2' torchdata==0.11.0 peft==0.21.2 cachetools fastapi uvicorn pyzmq msgspec psutil \
	prometheus_client aiohttp
# The OpenRLHF adapter's tests run OpenRLHF 0.11.2's own experience maker, samples generator and
# train_ppo_ray launcher. OpenRLHF pins transformers 5.15, ray 2.55 and CUDA-only builds (vLLM,
# flash-attn: faked inside tests/test_openrlhf.py), so it goes in without its dependencies, with
# DeepSpeed (which it imports at module level; an sdist, built against the venv's torch with no
# ops compiled), then only what importing openrlhf.trainer and openrlhf.cli.train_ppo_ray needs
# beyond the verl imports above.
OPENRLHF ?= openrlhf==0.11.2 deepspeed==0.19.6
OPENRLHF_IMPORTS ?= pylatexenc==2.11 hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 msgpack pydantic
export CUDA_HOME ?= /usr/local/cuda

# The oldest supported torch, as on the GPU machine that benchmarks/gpu_check.sh targets: Python
# 3.12, torch 2.11.0, Triton 3.6.0. Triton 3.6's interpreter calls int() on one-element arrays,
# which NumPy 2.4 refuses (Triton 3.8 fixed it), so its tests run with NumPy < 2.4.
OLDEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
OLDEST := PYTHON=$(OLDEST_PYTHON) VENV=.venv-oldest TORCH=torch==2.11.0 PINS="'triton==3.6.0' 'numpy<2.4'"

.PHONY: setup build simulate compare compare-tokens demo bench test test-oldest test-other-torch gpu-check-dry-run lint format clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "setuptools>=64" wheel ninja pytest hypothesis numpy ruff matplotlib $(PINS)
	$(PY) -m pip install -q $(TRL) $(PINS)
	$(PY) -m pip install -q $(VERL_IMPORTS) $(PINS)
	$(PY) -m pip install -q --no-deps $(VERL)
	$(PY) -m pip install -q $(OPENRLHF_IMPORTS) $(PINS)
	$(PY) -m pip install -q --no-deps --no-build-isolation $(OPENRLHF)
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

# The whole suite again on the oldest supported torch, in its own .venv-oldest (the in-place
# builds of two Pythons sit side by side: _C.cpython-3XX-....so).
test-oldest:
	$(MAKE) setup $(OLDEST)
	@# what the trainers' packages install beside it must not have moved torch, Triton or NumPy
	.venv-oldest/bin/python -c "import sys, torch, triton, numpy; v = (torch.__version__, triton.__version__, \
		numpy.__version__); print('oldest:', *v); sys.exit(not (v[0].startswith('2.11.0') and v[1] == '3.6.0' \
		and tuple(map(int, v[2].split('.')[:2])) < (2, 4)))"
	$(MAKE) test $(OLDEST)

# This build loaded under another torch (torch 2.11.0 beside the same Python, in .venv-other-torch):
# refused at import with one line, not loaded.
.venv-other-torch/.deps:
	test -x .venv-other-torch/bin/python || $(PYTHON) -m venv .venv-other-torch
	.venv-other-torch/bin/python -m pip install -q torch==2.11.0
	touch $@

test-other-torch: build .venv-other-torch/.deps
	BANDADV_OTHER_TORCH_PYTHON=.venv-other-torch/bin/python $(PY) -m pytest -q tests/test_api.py -k another_torch

# benchmarks/gpu_check.sh on the CPU, with the GPU machine's Python, torch and Triton (run
# test-oldest first): every step but what needs the device.
gpu-check-dry-run:
	$(MAKE) build $(OLDEST)
	GPU_CHECK_DRY_RUN=1 PYTHON=.venv-oldest/bin/python bash benchmarks/gpu_check.sh

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.deps
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build python/bandadv/_C*.so python/bandadv/_C*.torch *.egg-info python/*.egg-info

# The token-level testbed's full comparison (every method, both rewards, 3 seeds, two runs at a
# time): the table and plot land in benchmarks/results/, named with this machine's CPU and the date.
TOKENS_RESULT ?= benchmarks/results/tokens_cpu_$(shell grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //; s/[^A-Za-z0-9]\+/_/g')_$(shell date +%F)
compare-tokens: build
	$(PY) -m bandadv simulate --testbed tokens --compare --seeds 3 --jobs 2 --out $(TOKENS_RESULT).txt --png $(TOKENS_RESULT).png
