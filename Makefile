# One task runner for the README, CI and developers. Everything runs in the project's virtual
# environment (VENV, default .venv), created on first use; pip installs from the lock
# (requirements/constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/constraints.txt
export VENV

.PHONY: install install-pkg install-server run demo test test-core lint typecheck check faults bench lock clean

install:            ## apt + pip: servers for the tests and the package with every extra, from the lock
	scripts/install.sh

install-pkg:        ## pip only (servers already installed), every extra
	scripts/install.sh --no-apt

# Installed again only when the project or the lock changed, so a second `make run` starts at once.
SERVER_STAMP := $(VENV)/.squadbus-server-installed
$(SERVER_STAMP): pyproject.toml $(LOCK)
	scripts/install.sh --server
	touch $@

install-server: $(SERVER_STAMP) ## only what `squadbus serve` needs (.[server])

run: $(SERVER_STAMP) ## the main job on the embedded default: memory bus + SQLite, HTTP on 127.0.0.1:8000
	$(VENV)/bin/squadbus serve

demo: $(SERVER_STAMP) ## an example squad printed to the terminal
	$(VENV)/bin/squadbus demo

lint:
	$(PY) -m ruff check src tests bench

typecheck:
	$(PY) -m mypy

test:               ## lint, typecheck and the whole suite (starts real Redis, NATS, tansu, PostgreSQL)
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q

test-core:
	$(PY) -m pytest -q tests/core

check: install test ## what .ci/run does: install from scratch, then test

faults:             ## the fault runs (tests/faults) with ROUNDS rounds each (default 5), then their table
	rm -f build/faults-report.jsonl && mkdir -p build
	SQUADBUS_FAULT_ROUNDS=$(or $(ROUNDS),5) SQUADBUS_FAULTS_REPORT=build/faults-report.jsonl \
		$(PY) -m pytest -q -p no:randomly tests/faults
	$(PY) -m squadbus.testing.ledger build/faults-report.jsonl

bench:              ## every benchmark, squadbus beside the raw client in the same run
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lock:               ## refresh the lock of exact versions (uv pip compile); commit the result
	scripts/venv.sh $(VENV)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml requirements/build.in --all-extras \
	  --constraint requirements/pins.in --universal --python-version 3.11 --upgrade -o $(LOCK)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist src/*.egg-info
