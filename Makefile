# Two commands set up a fresh machine that has only Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: run test install install-test install-examples example lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

$(VENV)/.installed-examples: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[examples]'
	touch $@

install: $(VENV)/.installed

install-examples: $(VENV)/.installed-examples

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/mcp-gateway --config config/gateway.toml

# The bundled example MCP server on 127.0.0.1:9000, for the README's walkthrough.
example: install-examples
	$(BIN)/python examples/mcp_server.py --port 9000

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
