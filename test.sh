#!/usr/bin/env bash
# The test suite from a fresh machine: installs into .venv, then runs pytest (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# sae-probes' probing datasets (tests/test_probe.py); its own dependencies (torch, sae-lens) are not needed
.venv/bin/python -m pip install -q --no-deps sae-probes==0.4.2
# The peers' venv (torch + sae-lens, ~3 min once): tests/test_saelens_peer.py loads our release with SAELens.
# GEMMA_SCOPE_NO_PEERS=1 skips it; if it cannot be made, that test skips, saying why.
if [ -z "${GEMMA_SCOPE_NO_PEERS:-}" ] && [ ! -x .venv-peers/bin/python ]; then
  bash benchmarks/setup_saelens.sh .venv-peers >/dev/null || true  # its last step (tcmalloc) is optional here
  .venv-peers/bin/python -c "import sae_lens" 2>/dev/null \
    || { rm -rf .venv-peers; echo "warning: could not make .venv-peers; the SAELens round-trip test will skip" >&2; }
fi
.venv/bin/python -m pytest -q "$@"
