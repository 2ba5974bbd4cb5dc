"""``python -m gemma_scope.activations``: write activation shards of a config's model sites, one directory per site.

    python -m gemma_scope.activations --config=experiments/gemma3_270m_res.py --out=DIR --tokens=1000000 \
        [--storage_dtype=bfloat16] [--config.data.sites=res.8,att.8]

writes ``DIR/<site>/shard_<k>.npy`` (``[n_k, d]``, content tokens of chunk k in token order) and
``DIR/<site>/manifest.json`` (model, site, dtype, d, count, token source, per-shard sha256). Train on one with
``--config=experiments/from_activations.py --config.data.path=DIR/res.8``.
"""

from __future__ import annotations

import pathlib

import jax
from absl import app, flags
from ml_collections import config_flags

from gemma_scope import cli
from gemma_scope.activations.shards import STORAGE_DTYPES, write_shards
from gemma_scope.activations.sources import make_source
from gemma_scope.files import check_output_dir
from gemma_scope.mesh import make_mesh

_CONFIG = None  # the --config flag, defined when run as a command (train defines its own)


def main(argv: list[str]) -> dict[str, pathlib.Path]:
    """``python -m gemma_scope.activations``: writes activation shards of the config's model sites (module
    docstring); ``data`` and ``seed`` come from the config (``configs.lm_data`` defaults)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=experiments/<name>.py is required")
    config, out = _CONFIG.value, flags.FLAGS.out
    if config.data.source != "model":
        raise ValueError(f"data.source must be 'model' to write activations, got {config.data.source!r}")
    check_output_dir(out, "--out")  # before the model loads
    source = make_source(config.data, config.seed)
    data = config.data
    token_source = {"model": data.model, "corpus": data.corpus or "default", "split": "train",
                    "seq_len": data.seq_len, "packing": data.packing, "seed": config.seed,
                    "chunk_sequences": data.chunk_sequences}
    dirs = write_shards(source, out, flags.FLAGS.tokens, flags.FLAGS.storage_dtype, token_source,
                        make_mesh(devices=jax.local_devices()))
    for directory in dirs.values():
        print(directory)
    return dirs


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/<name>.py)")
    flags.DEFINE_string("out", None, "output directory (one subdirectory per site)", required=True)
    flags.DEFINE_integer("tokens", None, "content-token activations to write per site", required=True)
    flags.DEFINE_enum("storage_dtype", "float32", sorted(STORAGE_DTYPES), "dtype of the written shards")
    cli.run_app(main)
