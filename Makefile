# Two commands do all set-up: `make demo` (environment + extract, head.train and a headless live
# run on the built-in digits) and `make test` (environment + the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := build/demo

.PHONY: env demo test test-all test-cuda browser lint mutation bench clean

env: $(STAMP)

# The environment is rebuilt only when the package definition or its requirements change.
# requirements.txt holds the ranges the package accepts; constraints.txt the exact versions
# the tests pass with, which make installs, so that it reproduces the tested environment.
$(STAMP): setup.cfg pyproject.toml requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
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

# The browser tests of live.serve (tests/test_live_serve_browser.py) drive Debian's chromium
# through its chromedriver; installed here where missing (as root, or through sudo).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver: present"; \
	else \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; \
	fi

# The CUDA paths against their CPU references (tests/test_cuda.py); all skip without CUDA.
test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda

# Mutation testing (tests/MUTATION.md): mutants of the preprocessing, the head's training step,
# the sweep's step, live's frame path and the server's, each run against the fast tests that
# cover it ([tool.mutmut] in pyproject.toml lists them). `mutmut show NAME` prints a mutant's diff.
MUTANTS := 'extract.preprocess.*' 'head.step.x_closed_form_step*' \
	'head.step.x_train_step*' 'head.training.x_train_epoch*' 'head.loop.x_train_pass*' \
	'head.step.x_memory_batches*' 'head.step.x_gather*' 'live.model.x_frame_pixels*' \
	'live.model.xǁClassifierǁprobabilities*' 'live.session.x_smoothed*' \
	'live.session.x_top_indices*' 'live.session.x_class_entry*' 'live.session.x_log_record*' \
	'head.wide.x_train_step*' 'head.wide.x_views*' 'head.wide.x_exported*' \
	'head.wide.x_split_scores*' 'head.adam.xǁAdamǁsettings*' 'head.adam.xǁAdamǁspans*' \
	'head.adam.xǁAdamǁrows*' 'head.adam.xǁAdamǁstep*' 'live.serve.inference.x_decode_received*' \
	'live.serve.inference.x_rgb_array*' 'live.serve.inference.xǁWorkerǁrun_batch*'

mutation: $(STAMP)
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results

lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO) build .pytest_cache mutants
