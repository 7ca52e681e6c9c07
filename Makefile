# Two commands do all set-up on a fresh machine:
#   make chat   - create the venv, install cascade-local, chat with the default model (MODEL=path.gguf for a file)
#   make test   - create the venv, install cascade-local with its test tools, lint, type-check, run the tests
# llama-cpp-python builds from source the first time (about 4 minutes on 2 cores); pip caches the wheel.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?=

.PHONY: chat test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

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
