# slora's two commands: `make run` (the main job) and `make test` (every CPU test tier).
# Both create .venv from pyproject.toml when it is missing, so a fresh clone needs nothing else.

VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that pip finds on this machine's disk; GPU users install their CUDA build first (README).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.slora-installed

.PHONY: run test test-fast test-slow test-gpu test-simd assets reference clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# fetch and check the real models and data into $$SLORA_HOME (default ~/.cache/slora); idempotent
assets: $(STAMP)
	$(PY) -m slora.assets

# the main job: the embedded default run of python -m slora.finetune
run: assets
	$(PY) -m slora.finetune

# fast tier (unit + properties) and slow tier (real assets); the gpu tier skips itself without CUDA
test: assets
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: assets
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

# the numeric tests again on torch's default CPU kernels (no AVX2/AVX-512): fp32 rounds differently by SIMD path,
# so one machine catches a tolerance that holds on its own path only (tests/support/bounds.py)
SIMD_TESTS := tests/method tests/dist tests/models tests/train/test_loop.py tests/train/test_loop_epoch_live.py \
              tests/train/test_resume_dist.py
test-simd: assets
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q $(SIMD_TESTS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# regenerate the recorded CI run folder reference_runs/minilm-rt-polarity-short/ (review the diff like code)
reference: assets
	$(PY) reference_runs/record.py
