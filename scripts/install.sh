#!/usr/bin/env bash
# Install squadbus into the project's virtual environment, every version from the lock
# (requirements/constraints.txt, refreshed by `make lock`).
#   scripts/install.sh             apt (redis-server, postgresql, nodejs, rabbitmq-server, chromium, chromium-driver) + the package with every extra and the dev tools
#   scripts/install.sh --no-apt    the same without apt
#   scripts/install.sh --server    only what `squadbus serve` needs on the embedded default (.[server])
# VENV (default .venv) names the virtual environment; it is created if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
mode="${1:-all}"

if [ "$mode" = "all" ]; then
  need=()
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  [ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
  command -v node >/dev/null 2>&1 || need+=(nodejs)     # the dashboard's JavaScript test runs under Node
  command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)           # the dashboard's browser tests
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

scripts/venv.sh "$venv"
extras='redis,nats,kafka,rabbitmq,postgres,server,a2a,dev'
[ "$mode" = "--server" ] && extras='server'
# PIP_CONSTRAINT (not -c) so the pins also hold inside pip's isolated build environment (setuptools).
PIP_CONSTRAINT="$PWD/requirements/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1 \
  "$venv/bin/python" -m pip install -q -e ".[$extras]"
