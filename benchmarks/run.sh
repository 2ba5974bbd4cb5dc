#!/usr/bin/env bash
# One command for every benchmark of issue 6: bash benchmarks/run.sh [benchmarks.run options]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m benchmarks.run "$@"
