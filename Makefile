# Two commands do all set-up on a fresh clone: `make repro` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DVC runs stage commands through the shell; put the venv first so `python` is ours.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: repro test test-slow test-all plots venv clean-venv

# --no-cache-dir / --no-cache: torch's CUDA wheels are ~3 GB; a copy in a cache beside the ~6 GB venv
# once ran a CI machine out of disk. uv installs the same requirements in about a quarter of pip's time
# (27 s against ~110 s here, which counts against make repro's budget); where uv cannot be installed or
# fails, pip does it. On failure, say how much room there was. --compile-bytecode: uv writes no .pyc by
# default (pip does), and where PYTHONDONTWRITEBYTECODE is set nothing writes them later, so every stage
# process compiled torch's and transformers' sources again, about twice the import time
# (docs/PERFORMANCE.md, bench/startup.py).
$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --upgrade pip
	{ $(BIN)/pip install --quiet --no-cache-dir uv && $(BIN)/uv pip install --quiet --no-cache --compile-bytecode --python $(BIN)/python -r requirements.txt; } \
	  || $(BIN)/pip install --quiet --no-cache-dir -r requirements.txt || { df -h . "$${TMPDIR:-/tmp}"; exit 1; }
	touch $@

venv: $(BIN)/.installed

repro: venv
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show || true

# One test file per worker, every core (-n auto), torch on one thread each: most of the suite is
# processes starting and small models, which two cores run side by side; two workers with torch's
# default threads each would oversubscribe the cores. `make test` is the quick tier (every test not
# marked slow); `make test-slow` the end-to-end tier: whole DVC pipelines, torchrun, resumes after a kill,
# the benches' smallest runs, processes started per test. .ci/run runs both; `make test-all` is the two
# in one pytest run. tests/conftest.py starts the longest file first.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile
test: venv
	$(PYTEST) -m "not slow"

test-slow: venv
	$(PYTEST) -m slow

test-all: venv
	$(PYTEST)

# The plots page, offline (no CDN), checked in headless Chromium when it is installed.
plots: venv
	$(BIN)/python scripts/plots_page.py -o dvc_plots $$(command -v chromium >/dev/null && echo --check)

clean-venv:
	rm -rf $(VENV)
