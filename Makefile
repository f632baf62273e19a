# gradcomp: `make demo` runs the main job on local Ray; `make test` sets up and runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, pinned, so that pip never swaps in a different build.
# On a CUDA machine the default PyPI wheel brings CUDA; for a CPU-only wheel use e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench proto docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/gradcomp train examples/digits-rtopk.yaml

test: install
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/python tools/archcheck.py --src src
	$(BIN)/mypy src/gradcomp
	$(BIN)/python -m pytest -q

# The quick loop while editing: the tests that start neither Ray nor a server and are not slow (no ruff).
test-fast: install
	$(BIN)/python -m pytest -q -m "not ray and not server and not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/python tools/archcheck.py --src src
	$(BIN)/mypy src/gradcomp

format: install
	$(BIN)/ruff check --fix src tests benchmarks tools
	$(BIN)/ruff format src tests benchmarks tools

bench: install
	$(BIN)/python benchmarks/compress.py --out runs/bench/compress.json

proto: install
	$(BIN)/python -m gradcomp._proto.generate

# The job-key and metric references in docs/ are generated from the code; tests/test_docs.py fails when stale.
docs: install
	$(BIN)/python tools/docgen.py

clean:
	rm -rf $(VENV) runs .pytest_cache build src/*.egg-info
