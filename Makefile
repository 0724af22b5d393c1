# distillspec: two commands on a fresh machine
#   make demo   install everything, then run the main job on the offline default (python run.py)
#   make test   install everything, then run the fast test suite
# Dependencies are installed at the versions tested (constraints.txt; torch from TORCH_SPEC is not in it):
#   make install CONSTRAINTS=   unpinned: the newest versions pyproject.toml allows (on a fresh .venv)
#   make upgrade                upgrade every dependency within pyproject.toml, then `make lock`
#   make lock                   rewrite constraints.txt from the versions installed in .venv
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on the dev/CI machines; on a GPU machine this is the normal CUDA build.
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench-sd bench-train gpu-check report clean lock upgrade

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_C) -e ".[dev,lora]"
	touch $(STAMP)

# The installed environment now matches constraints.txt: the stamp stays newer than it.
lock: install
	$(PY) tools/lock_constraints.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	touch $(STAMP)

# Newest versions pyproject.toml allows for every dependency (torch stays at TORCH_SPEC), then a new lock.
upgrade: install
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,lora,bench]" "$(TORCH_SPEC)"
	$(MAKE) lock
	@echo "constraints.txt rewritten: run 'make test', then commit it"

demo: install
	$(PY) run.py $(ARGS)

test: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: install
	$(PY) -m pytest -q $(ARGS)

bench-sd: install
	$(PY) benchmarks/bench_sd.py $(ARGS)

bench-train: install
	$(PY) -m pip install -q $(PIP_C) -e ".[bench]"
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
