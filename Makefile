# One task runner for the README, CI and developers.
PY ?= python3

.PHONY: install install-pkg run demo test test-core lint typecheck check bench clean

install:            ## apt + pip: servers for the tests and the package with every extra
	scripts/install.sh

install-pkg:        ## pip only (servers already installed)
	scripts/install.sh --no-apt

run: install-pkg    ## the main job on the embedded default: memory bus + SQLite, HTTP on 127.0.0.1:8000
	squadbus serve

demo: install-pkg   ## an example squad printed to the terminal
	squadbus demo

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

bench:              ## every benchmark, squadbus beside the raw client in the same run
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist src/*.egg-info
