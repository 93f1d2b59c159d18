# Everything a newcomer needs: `make demo` runs the main demo, `make test` runs lint, the docs build and the tests.
# Both create .venv on first use (CPU torch first, so pip never pulls a multi-gigabyte CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo quickstart test lint docs bench screenshots clean

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

# The documentation site, offline: nitpicky (-n: every cross-reference must resolve), warnings are errors (-W),
# from a fresh environment (-E), so a page added since the last build is never missed.
docs: setup
	rm -rf build/docs
	$(PY) -m sphinx -b html -n -W --keep-going -E -q docs build/docs/html
	@echo "docs: build/docs/html/index.html"

# lint, then pytest (pyproject.toml): the tests, the docstring examples (--doctest-modules), every python block of
# README.md and docs/ (--markdown-docs) and docs/test_docs.py, which builds the site exactly as `make docs` does
# (once: the build is a test) and checks the commands, outputs and messages the pages quote. pytest exits 5 when it
# collects no test, which make turns into a failure, as it does any failed test.
test: lint
	$(PY) -m pytest

# The pictures of README.md and the docs (docs/images/): needs Debian's chromium (apt-get install -y chromium).
screenshots: setup
	$(PY) docs/screenshots.py

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) lightning_logs runs build/docs .pytest_cache .ruff_cache
