"""Whole arrays on every host of a multi-host run (an identity on one process)."""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils


def to_host(tree):
    """Whole global arrays as NumPy on every process (shards live on other hosts in multi-host runs)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
