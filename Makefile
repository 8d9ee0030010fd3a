# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install puma into it. torch is pinned at install time so that
# pip takes the CPU build instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
# More pip options for the install, e.g. PyTorch's CPU index where PyPI's torch is a CUDA build.
PIP_ARGS ?=

.PHONY: demo test check clean constraints

# The pins in constraints.txt (numpy 2.4, scipy 1.17) need Python 3.11 or newer: say so
# before making a venv, not after pip has failed on a pin.
$(BIN)/puma: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	    found=$$(command -v $(PYTHON) >/dev/null && $(PYTHON) -V 2>&1 || echo 'not found'); \
	    echo "Error: puma needs Python 3.11 or newer; '$(PYTHON)' is $$found: run make" \
	        "again with PYTHON=python3.11 (or newer)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt $(PIP_ARGS) $(TORCH_PIN) -e '.[dev]'
	touch $@

# The newest versions pyproject.toml allows, resolved in a scratch venv, as the new pins.
constraints:
	rm -rf .venv-resolve
	$(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/pip install --quiet $(TORCH_PIN) -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; .venv-resolve/bin/pip freeze --exclude-editable \
	    | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-resolve

demo: $(BIN)/puma
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

check: $(BIN)/puma
	$(BIN)/ruff check puma_cli tests scripts $(wildcard benchmarks)
	$(BIN)/ruff format --check puma_cli tests scripts $(wildcard benchmarks)
	$(BIN)/mypy puma_cli

# One pytest worker per core (pytest-xdist), each torch on one thread: 4.9 minutes on
# 2 cores against 7.1 for one process over both.
test: check
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) demo-out
