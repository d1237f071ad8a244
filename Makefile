# `make test` and `make bench` set up .venv themselves (pinned requirements.txt), build
# tfbn into it, then run. Nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: all install test bench clean

all: install

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# scikit-build-core keeps its CMake build in build/, so a rebuild is incremental.
install: $(DEPS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps .

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache
