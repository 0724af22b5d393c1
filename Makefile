# distillspec: two commands on a fresh machine
#   make demo   install everything, then run the main job on the offline default (python run.py)
#   make test   install everything, then run the fast test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on the dev/CI machines; on a GPU machine this is the normal CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench-sd bench-train gpu-check report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,lora]"
	touch $(STAMP)

demo: install
	$(PY) run.py $(ARGS)

test: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: install
	$(PY) -m pytest -q $(ARGS)

bench-sd: install
	$(PY) benchmarks/bench_sd.py $(ARGS)

bench-train: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_train.py $(ARGS)

# The prepared GPU check (benchmarks/gpu_check.py; `ARGS=--smoke` for its CPU code path). No install step:
# the GPU machines have torch/transformers/lightning but reach no package registry. Uses .venv when present.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(ARGS)

report: install
	$(PY) -m distillspec.report $(SWEEP)

clean:
	rm -rf $(VENV) outputs .pytest_cache
