# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv lint protos bench clean

# The third-party backend example, installed next to casframe and tested with it.
EXAMPLE := examples/casframe-sqlite
EXAMPLE_STAMP := $(VENV)/.example-installed
EXAMPLE_FILES := $(EXAMPLE)/pyproject.toml $(EXAMPLE)/README.md \
	$(wildcard $(EXAMPLE)/casframe_sqlite/*.py) $(EXAMPLE)/casframe_sqlite/py.typed

$(STAMP): pyproject.toml $(EXAMPLE)/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Installed as a user installs a plugin (a built wheel, not editable), so that its packaging
# (entry point, package data) is what the tests exercise; reinstalled whenever a file of it
# changes. setuptools builds in the source tree: its leftovers go before and after, so that a
# file deleted from the package cannot linger in the next wheel.
$(EXAMPLE_STAMP): $(STAMP) $(EXAMPLE_FILES)
	rm -rf $(EXAMPLE)/build $(EXAMPLE)/*.egg-info
	$(PY) -m pip install --quiet ./$(EXAMPLE)
	rm -rf $(EXAMPLE)/build $(EXAMPLE)/*.egg-info
	touch $(EXAMPLE_STAMP)

venv: $(EXAMPLE_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(EXAMPLE_STAMP)
	$(PY) -m pytest -q

lint: $(EXAMPLE_STAMP)
	$(VENV)/bin/ruff check casframe plugins tests bench examples
	$(VENV)/bin/mypy

protos: $(STAMP)
	$(PY) protos/generate.py

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info $(EXAMPLE)/build $(EXAMPLE)/*.egg-info
