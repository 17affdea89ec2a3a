# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two stamps in one venv: casframe with its runtime dependencies (all the demo needs), then
# the test extras on top (what `make test`, `make lint` and `make protos` need).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: demo test prereqs venv lint protos bench clean

# The third-party backend example, installed next to casframe and tested with it.
EXAMPLE := examples/casframe-sqlite
EXAMPLE_STAMP := $(VENV)/.example-installed
EXAMPLE_FILES := $(EXAMPLE)/pyproject.toml $(EXAMPLE)/README.md \
	$(wildcard $(EXAMPLE)/casframe_sqlite/*.py) $(EXAMPLE)/casframe_sqlite/py.typed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) $(EXAMPLE)/pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

# Installed as a user installs a plugin (a built wheel, not editable), so that its packaging
# (entry point, package data) is what the tests exercise; reinstalled whenever a file of it
# changes. flit_core builds in memory: nothing is left in the source tree.
$(EXAMPLE_STAMP): $(TEST_STAMP) $(EXAMPLE_FILES)
	$(PY) -m pip install --quiet ./$(EXAMPLE)
	touch $(EXAMPLE_STAMP)

venv: $(EXAMPLE_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Peers from outside Python that the tests run (Bazel, the AWS CLI, BuildGrid, BuildStream):
# installed once, cached in $${CASFRAME_PREREQS:-~/.cache/casframe-prereqs}; needs root or sudo.
prereqs:
	scripts/test-prereqs

test: prereqs $(EXAMPLE_STAMP)
	$(PY) -m pytest -q

lint: $(EXAMPLE_STAMP)
	$(VENV)/bin/ruff check casframe plugins tests bench examples
	$(VENV)/bin/mypy

protos: $(TEST_STAMP)
	$(PY) protos/generate.py

bench: $(TEST_STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) dist
