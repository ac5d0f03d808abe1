# Two commands do all set-up on a fresh clone (see README):
#   make demo   -- creates .venv, installs the package, runs the main example
#   make test   -- creates .venv, installs the package with the test and cli extras, runs the test suite
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (CI has no GPU); override, e.g. TORCH_SPEC="torch>=2.2", for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,cli]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python lightning_examples/sparse_regression.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
