# Everything a newcomer needs: `make demo` runs the main demo, `make test` runs the test suite.
# Both create .venv on first use (CPU torch first, so pip never pulls a multi-gigabyte CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo quickstart test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/collapse_demo.py

quickstart: setup
	$(PY) examples/quickstart.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache .ruff_cache
