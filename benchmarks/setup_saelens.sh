#!/usr/bin/env bash
# Optional peer environment: SAELens (torch, CPU) in its own venv, and tcmalloc for both sides. The benchmarks
# (benchmarks.run, benchmarks.quality) and the SAELens round-trip test (tests/test_saelens_peer.py; test.sh makes
# .venv-peers with it) use it. Never a dependency of the gemma_scope package.
# Usage: bash benchmarks/setup_saelens.sh [VENV_DIR]   (about 3 minutes and 1.9 GB; a made venv is kept)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-saelens}"
TORCH_PIN="torch==2.13.0"  # any other torch spec resolves to the CUDA build (GBs of nvidia-* wheels)
SAELENS_PIN="sae-lens==6.54.12"  # the release whose loader and trainer tests/ and benchmarks/ were checked against

python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet "$TORCH_PIN"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" > "$constraints"  # keeps sae-lens from upgrading torch
"$VENV/bin/pip" install --quiet -c "$constraints" "$SAELENS_PIN"
"$VENV/bin/python" -c "import torch, sae_lens; print('torch', torch.__version__, '| sae_lens', sae_lens.__version__)"

# tcmalloc (Debian libtcmalloc-minimal4): system-wide if we can, else unpacked under .cache/tcmalloc.
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; then
    echo "installed libtcmalloc-minimal4"
  else
    tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get download libtcmalloc-minimal4)
    mkdir -p .cache/tcmalloc
    dpkg -x "$tmp"/libtcmalloc-minimal4_*.deb .cache/tcmalloc
    rm -rf "$tmp"
    echo "unpacked libtcmalloc-minimal4 under .cache/tcmalloc"
  fi
fi
