#!/usr/bin/env bash
# Create the project's virtual environment (default .venv) with the machine's python3.
# Stock Debian refuses `pip install` outside a venv (externally-managed-environment) and ships
# `python3 -m venv` without ensurepip until python3-venv is installed: install it then, once.
# Usage: scripts/venv.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.venv}"
[ -x "$dir/bin/python" ] && exit 0
if ! python3 -m venv "$dir" 2>/dev/null; then
  rm -rf "$dir"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "python3 -m venv needs Debian's python3-venv: installing it" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  python3 -m venv "$dir"
fi
