# Two commands do all set-up on a fresh machine:
#   make chat   - create the venv, install cascade-local, chat with the default model (MODEL=path.gguf for a file)
#   make test   - create the venv, install cascade-local with its test tools, lint, type-check, run the tests
# llama-cpp-python builds from source the first time (many minutes on 2 cores), always with llama.cpp's RPC
# backend (-DGGML_RPC=ON: the tests use a loopback RPC server as a real second device, and `--rpc` pools another
# machine). Add build options with CMAKE_ARGS, e.g. `make chat CMAKE_ARGS="-DGGML_CUDA=on"`; RPC stays on.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?=

# pip's wheel cache keys a source build by name and version only, not by CMAKE_ARGS, so it would silently hand
# back a wheel built without RPC (or for another CPU). Build our own wheel instead, once per flag set:
# <wheel cache>/<digest of version, flags and this CPU's features>/ (a native build uses the instructions of the CPU it
# was built on, so another machine sharing this folder gets its own wheel).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_RPC=ON $(CMAKE_ARGS)
WHEEL_KEY := $(shell { echo '$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)'; uname -m; \
	grep -m1 '^flags' /proc/cpuinfo 2>/dev/null; } | sha256sum | cut -c1-16)
# Kept in the user's cache folder, so a fresh clone on the same machine reuses it (override with WHEEL_CACHE).
WHEEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/cascade-local/wheels
WHEEL_DIR := $(WHEEL_CACHE)/$(WHEEL_KEY)
WHEEL_STAMP := $(WHEEL_DIR)/.built

.PHONY: chat test lint typecheck bench clean wheel

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Built into a temporary folder and renamed when complete, so an interrupted build is never mistaken for a wheel.
$(WHEEL_STAMP): | $(VENV)/bin/python
	rm -rf $(WHEEL_DIR).partial
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' FORCE_CMAKE=1 $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir \
		--no-binary llama-cpp-python -w $(WHEEL_DIR).partial llama-cpp-python==$(LLAMA_CPP_VERSION)
	echo '$(LLAMA_CMAKE_ARGS)' > $(WHEEL_DIR).partial/cmake-args.txt
	rm -rf $(WHEEL_DIR) && mv $(WHEEL_DIR).partial $(WHEEL_DIR)
	touch $(WHEEL_STAMP)

wheel: $(WHEEL_STAMP)

# The stamp records which wheel is installed: other flags (another digest) reinstall llama-cpp-python.
$(STAMP): pyproject.toml $(WHEEL_STAMP)
	$(BIN)/python -m pip install -q --force-reinstall --no-deps $(WHEEL_DIR)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install -q $(WHEEL_DIR)/llama_cpp_python-*.whl -e '.[test]'
	echo $(WHEEL_KEY) > $(STAMP)

chat: $(STAMP)
	$(BIN)/cascade-local chat $(MODEL)

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy cannot follow setuptools' editable-install hook, which installs convert/ as cascade_local.convert:
# it checks a tree of links (build/mypy) with that layout. Paths in its messages are relative to that tree.
typecheck: $(STAMP)
	rm -rf build/mypy && mkdir -p build/mypy/cascade_local
	for f in cascade_local/*; do ln -s "$(CURDIR)/$$f" build/mypy/cascade_local/; done
	ln -s "$(CURDIR)/convert" build/mypy/cascade_local/convert
	cd build/mypy && "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" \
		--cache-dir "$(CURDIR)/.mypy_cache" -p cascade_local

test: lint typecheck
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/convert_bench.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
