"""Param trees in the `gemma` library's layout: nesting "a/b/c" keys and validation against a config."""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from gemma_scope.model.config import Config
from gemma_scope.model.forward import init_params


def flatten(tree: dict) -> dict[str, np.ndarray]:
    """{"layer_0": {"attn": {"q_einsum": {"w": a}}}} -> {"layer_0/attn/q_einsum/w": a}."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of `flatten`; also nests trees whose keys are partly "/"-joined (old Kaggle checkpoints)."""
    return traverse_util.unflatten_dict(flatten(flat), sep="/")


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """{"layer_0/attn/q_einsum/w": (num_heads, d_model, head_dim), …} for ``cfg``, computed without allocating."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in flatten(shapes).items()}


def check_params(params: dict, cfg: Config, source: str) -> None:
    """Raises ValueError naming missing, unexpected and mis-shaped entries of ``params`` for ``cfg``.

    ``source`` (a file or directory) is quoted in the message.
    """
    want = expected_shapes(cfg)
    have = {path: tuple(np.shape(leaf)) for path, leaf in flatten(params).items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = [f"{p}: {have[p]} (expected {want[p]})" for p in sorted(set(want) & set(have)) if have[p] != want[p]]
    if missing or unexpected or wrong:
        def show(items):
            return ", ".join(items[:6]) + (f" … ({len(items)} in all)" if len(items) > 6 else "")

        parts = [f"{name}: {show(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise ValueError(f"params from {source} do not fit config {cfg.name!r}: " + "; ".join(parts))
