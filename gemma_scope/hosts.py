"""Collecting per-process values on multi-host runs (identities on one process)."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def global_mean(values: np.ndarray) -> np.ndarray:
    """Mean of per-process values over all processes (identity on one process)."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values)).mean(axis=0)


def to_host(tree):
    """Whole global arrays as NumPy on every process (shards live on other hosts in multi-host runs)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
