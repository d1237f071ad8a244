# `make test` and `make bench` set up .venv themselves (pinned requirements.txt), build
# tfbn into it, then run. Nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
# What `make lint` checks. LINT_PY_EXCLUDE: Python files not yet brought to the ruff
# rules (comma-separated); LINT_CC: folders whose C++/CUDA must match .clang-format.
LINT_PY_EXCLUDE ?=
LINT_CC ?= cc

.PHONY: all install system-deps lint test bench docs clean

all: install

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Headers from Debian that the build uses where they are: highwayhash and farmhash for the
# XLA lowerings (the TensorFlow wheel's XLA headers include but do not ship them), zlib for
# compressing the CUDA images. Best effort: installed with apt-get where missing and
# running as root; otherwise the build leaves the lowerings out and says why
# (tfbn.build_info()["xla_reason"]), and embeds the images uncompressed.
SYSTEM_HEADERS := /usr/include/highwayhash/arch_specific.h /usr/include/farmhash.h \
                  /usr/include/zlib.h
SYSTEM_PACKAGES := libhighwayhash-dev libfarmhash-dev zlib1g-dev
system-deps:
	@for h in $(SYSTEM_HEADERS); do [ -e $$h ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing $(SYSTEM_PACKAGES) (XLA lowerings, compressed CUDA images)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $(SYSTEM_PACKAGES)) >/dev/null 2>&1 \
	      || echo "make: could not install them; building without what they serve"; \
	  else \
	    echo "make: headers missing (as root: apt-get install $(SYSTEM_PACKAGES));" \
	         "building without the XLA lowerings or without compressed CUDA images"; \
	  fi; \
	fi

# scikit-build-core keeps its CMake build in build/, so a rebuild is incremental.
install: $(DEPS) system-deps
	$(PY) -m pip install --quiet --no-build-isolation --no-deps .

lint: $(DEPS)
	$(VENV)/bin/ruff check --extend-exclude "$(LINT_PY_EXCLUDE)" .
	@if [ -n "$(strip $(LINT_CC))" ]; then \
	  find $(LINT_CC) \( -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc' \) \
	    -print0 | sort -z | xargs -0 $(VENV)/bin/clang-format --dry-run --Werror; \
	fi

test: install lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# The tables of docs/performance.md and the README's figures, from benchmarks/results.
docs: $(DEPS)
	$(PY) benchmarks/tables.py --write

clean:
	rm -rf build .pytest_cache
