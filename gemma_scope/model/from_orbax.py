"""Params from a `gemma`-library / Kaggle Flax checkpoint saved with orbax (the layout this package uses too)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from gemma_scope.model import config as configs
from gemma_scope.model.config import Config
from gemma_scope.model.params import check_params, unflatten


def _infer_config(params: dict, source: str) -> Config:
    """The named config with the checkpoint's depth, width and family (QK-norm ⇒ Gemma 3)."""
    num_layers = sum(key.startswith("layer_") for key in params)
    d_model = int(np.shape(params["embedder"]["input_embedding"])[1])
    gemma3 = "_query_norm" in params.get("layer_0", {}).get("attn", {})
    for name in configs.config_names():
        cfg = configs.get_config(name)
        if (cfg.num_layers, cfg.d_model, cfg.use_qk_norm) == (num_layers, d_model, gemma3):
            return cfg
    raise ValueError(f"{source}: no known config has {num_layers} layers and d_model {d_model} "
                     f"({'Gemma 3' if gemma3 else 'Gemma 2'}); pass config= explicitly")


def read_orbax(path: str | pathlib.Path, cfg: Config | None = None, dtype=np.float32) -> tuple[Config, dict]:
    """(config, params) from an orbax checkpoint directory in the `gemma` library's layout.

    Accepts trees nested under "transformer" or "params" (Kaggle checkpoints) and "/"-joined keys. ``cfg`` defaults
    to the known config matching the checkpoint; vocab_size always follows the embedding table (Gemma 2
    checkpoints have 256000 or 256128 rows).

    Raises:
      FileNotFoundError: ``path`` is not a directory.
      ValueError: not an orbax checkpoint, or params that do not fit the config (names the entries).
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        params = unflatten(checkpointer.restore(path, restore_args=restore_args))
    except (FileNotFoundError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is not a readable orbax checkpoint of Gemma params: {e}") from e
    for wrapper in ("transformer", "params"):
        if set(params) == {wrapper}:
            params = params[wrapper]
    if "embedder" not in params:
        raise ValueError(f"{path}: no 'embedder' in the checkpoint (top-level keys {sorted(params)[:8]}); "
                         "expected the gemma library's param tree")
    cfg = cfg or _infer_config(params, str(path))
    cfg = dataclasses.replace(cfg, vocab_size=int(np.shape(params["embedder"]["input_embedding"])[0]))
    params = jax.tree.map(lambda a: np.asarray(a, dtype), params)
    check_params(params, cfg, str(path))
    return cfg, params
