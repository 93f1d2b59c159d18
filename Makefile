# Everything a newcomer needs: `make demo` runs the main demo, `make test` runs lint, the docs build and the tests.
# Both create .venv on first use (CPU torch first, so pip never pulls a multi-gigabyte CUDA build), with the versions
# of constraints.txt: the releases the suite last passed with. `make upgrade-deps` moves to the newest releases.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
# A second float path: scalar ATen kernels and SSE4.2 MKL kernels round differently from the AVX2/AVX-512 ones
FLOAT_PATH_ENV := MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default
UPGRADE_VENV := build/upgrade-venv

.PHONY: setup demo quickstart test test-float-paths upgrade-deps lint docs bench bench-check screenshots clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev,docs]"
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

# The tests and docstring examples once more on another float path: every kernel rounds differently there, so a test
# that compares two different computations with == instead of tests/helpers.assert_same_numbers fails. (The docs'
# quoted outputs are checked by `make test`; their tolerance, stated in docs/test_docs.py, covers float paths.)
test-float-paths: setup
	$(FLOAT_PATH_ENV) $(PY) -m pytest tests lightning_mc -q -p no:cacheprovider

# Moving to new releases, deliberately: a fresh venv with the newest release of every dependency (no constraints;
# torch stays TORCH_SPEC), `make test` in it, and only when that passes, constraints.txt rewritten from it.
upgrade-deps:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(UPGRADE_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(UPGRADE_VENV)/bin/python -m pip install --quiet -e ".[dev,docs]"
	touch $(UPGRADE_VENV)/.installed
	$(MAKE) -o $(UPGRADE_VENV)/.installed VENV=$(UPGRADE_VENV) test
	{ echo "# The releases the suite passed with, installed by make setup (pip install -c constraints.txt)."; \
	  echo "# Written by make upgrade-deps after make test passed; torch is TORCH_SPEC in the Makefile."; \
	  $(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "upgrade-deps: $(CONSTRAINTS) rewritten; make setup (rm -rf $(VENV) first) installs it"

# The pictures of README.md and the docs (docs/images/): needs Debian's chromium (apt-get install -y chromium).
screenshots: setup
	$(PY) docs/screenshots.py

bench: setup
	$(PY) -m benchmarks

# The guard against regressions: the quick rows (P1, P10; about 70 s on 2 cores), each median and its quartiles
# beside the ones committed in benchmarks/results/bench-check.json; fails when a row is more than 20 % dearer and
# its rounds' middle half lies above the committed one's. After a change that makes rows cheaper:
# `$(PY) -m benchmarks.check --update` and commit the file.
bench-check: setup
	$(PY) -m benchmarks.check

clean:
	rm -rf $(VENV) lightning_logs runs build/docs .pytest_cache .ruff_cache
