# Two commands set up a fresh machine that has only Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: run test test-compiled compile pure install install-test install-compile install-js install-examples example \
	lint bench bench-anchor bench-fleet bench-idle-sse bench-tracing check-dashboard conformance clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The editable install is the pure-Python form; `make compile` builds the compiled one in place (setup.py).
# With the otel extra, so that the OTEL_* variables switch tracing on for `make run` (docs/observability.md);
# a plain `pip install .` has no tracing, and with tracing off nothing of OpenTelemetry is imported.
$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/python
	AENV_GATEWAY_COMPILE=0 $(PIP) install -e '.[otel]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

$(VENV)/.installed-compile: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[compile]'
	touch $@

$(VENV)/.installed-examples: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[examples]'
	touch $@

install: $(VENV)/.installed

install-examples: $(VENV)/.installed-examples

install-test: $(VENV)/.installed-test

install-compile: $(VENV)/.installed-compile

# The compiled form: the data plane's modules built by mypyc (about 90 s) into extension modules next to their
# sources, which Python imports instead of the .py files; rebuilt when a source changes. `make pure` removes them.
SOURCES := $(wildcard gateway/*.py gateway/*/*.py)
COMPILED := $(VENV)/.compiled
$(COMPILED): $(SOURCES) setup.py $(VENV)/.installed-compile
	AENV_GATEWAY_COMPILE=1 $(BIN)/python setup.py --quiet build_ext --inplace
	touch $@

compile: $(COMPILED)

pure:
	rm -f gateway/*.so gateway/*/*.so $(COMPILED)

# Node 22 and the JavaScript packages (js/package.json: the TypeScript SDK, the conformance suite), for
# the TypeScript client test and `make conformance`; without npm those are skipped, saying why.
JS_INSTALLED := js/node_modules/.package-lock.json
$(JS_INSTALLED): js/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd js && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null; \
	else echo "npm not found: the TypeScript client test and make conformance are skipped"; fi

install-js: $(JS_INSTALLED)

# Compiled when this machine can (a C compiler and the Python headers), else the pure-Python form.
run: install
	@$(MAKE) --no-print-directory compile || { $(MAKE) --no-print-directory pure; \
		echo "could not compile the gateway (see above): running the pure-Python form"; }
	$(BIN)/mcp-gateway --config config/gateway.toml

# The bundled example MCP server on 127.0.0.1:9000, for the README's walkthrough.
example: install-examples
	$(BIN)/python examples/mcp_server.py --port 9000

# The suite on the pure-Python form (compiled modules built in place are removed first) ...
test: install-test install-js pure
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ... and on the compiled form. CI runs both (.ci/run).
test-compiled: install-test install-js compile
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff and mypy --strict, as configured in pyproject.toml (both pinned in the test extra).
lint: install-test
	$(BIN)/ruff check gateway tests bench examples
	$(BIN)/mypy --strict gateway

# The official MCP conformance suite's server scenarios against tests/conformance_server.py, directly and through
# the gateway, compared check by check (tests/conformance.py). Needs npm: the first run installs js/package.json
# (Node 22 and the suite, about 15 s), then each run takes about 5 s.
conformance: install-test install-js
	$(BIN)/python -m tests.conformance

# About three minutes: the gateway, pure and compiled, beside direct (req/s, p50/p99, CPU per request, SSE, RSS).
# See docs/performance.md.
bench: install
	@$(MAKE) --no-print-directory compile || echo "could not compile: the pure-Python form only"
	$(BIN)/python bench/run.py

# The shared anchor benchmark (nginx, go-mimic, direct, the gateway) when ../shared/bench exists; ~4 minutes.
ANCHOR ?= $(wildcard $(CURDIR)/../shared/bench)
bench-anchor: install
	@test -n "$(ANCHOR)" || { echo "no ../shared/bench here: use make bench"; exit 1; }
	@$(MAKE) --no-print-directory compile || echo "could not compile: the pure-Python form"
	B=$$(mktemp -d)/bench && cp -r $(ANCHOR) "$$B" && \
	CANDIDATE_NAME=gateway CANDIDATE_CWD="$(CURDIR)" \
	CANDIDATE_CMD='exec $(CURDIR)/$(BIN)/python -m gateway --host 127.0.0.1 --port {port} --admin-port 0' \
	"$$B/run.sh"

# The gateway (and go-mimic, from ../shared/bench) in front of 1 to 4,000 upstream addresses, plus the idle,
# RLIMIT_NOFILE 1024 and stale-connection scenarios; ~10 minutes (FLEET_QUICK=1: ~1). See docs/scaling.md.
# Installs wrk and golang-go with apt-get if they are missing (as root).
bench-fleet: install
	$(BIN)/python bench/fleet.py

# RSS growth per idle SSE stream, up to 10,000 streams opened and closed by the script (STREAMS=...).
bench-idle-sse: install
	$(BIN)/python bench/idle_sse.py $(if $(STREAMS),--streams $(STREAMS)) $(if $(ROUNDS),--rounds $(ROUNDS))

# Gateway CPU per request with tracing off, on (always_on, exported), sampled at 1%, and without the extra;
# alternated rounds, ~2 minutes (CALLGRIND=1: instruction counts under valgrind instead, ~15 minutes).
bench-tracing: install
	$(BIN)/python bench/tracing_cost.py $(if $(CALLGRIND),--callgrind)

# The Grafana dashboard and the alerting rules against a real Prometheus scraping a gateway under real
# traffic (tests/check_dashboard.py, ~20 s). Needs Debian's prometheus package: installed with apt-get
# when missing and run as root, else it says so and fails.
check-dashboard: install-test
	$(BIN)/python -m tests.check_dashboard

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache gateway/*.so gateway/*/*.so
