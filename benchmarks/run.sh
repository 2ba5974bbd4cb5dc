#!/usr/bin/env bash
# One command for every benchmark: bash benchmarks/run.sh [benchmarks.run options]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m benchmarks.run "$@"
