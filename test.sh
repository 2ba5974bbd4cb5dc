#!/usr/bin/env bash
# The test suite from a fresh machine: installs into .venv, then runs pytest (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# sae-probes' probing datasets (tests/test_probe.py); its own dependencies (torch, sae-lens) are not needed
.venv/bin/python -m pip install -q --no-deps sae-probes==0.4.2
.venv/bin/python -m pytest -q "$@"
