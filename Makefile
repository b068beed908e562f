# Two commands do all set-up: `make demo` (environment + extract, head.train and a headless live
# run on the built-in digits) and `make test` (environment + the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := build/demo

.PHONY: env demo test test-all test-cuda lint bench clean

env: $(STAMP)

# The environment is rebuilt only when the package definition or its requirements change;
# the versions (torch's pinned) are in requirements.txt.
$(STAMP): setup.cfg pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	W=$$($(PY) -m extract.demo --out $(DEMO)/data) && \
	$(PY) -m extract --data $(DEMO)/data --out $(DEMO)/features.h5 --weights $$W --overwrite
	$(PY) -m head.train --features $(DEMO)/features.h5 --save $(DEMO)/model --epochs 10 --standardize --overwrite
	$(PY) -m live --model $(DEMO)/model --source $(DEMO)/data/test/images --no-display \
		--output $(DEMO)/live.mp4 --log $(DEMO)/live.jsonl

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

# The CUDA paths against their CPU references (tests/test_cuda.py); all skip without CUDA.
test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda

lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO) build .pytest_cache
