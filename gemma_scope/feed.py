"""Feeding an activation source to the step: the normalisation constants (Gemma Scope §3), summed on the devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def normalisation_constants(source, mesh, batch_size: int, n_batches: int) -> dict[str, np.ndarray]:
    """C per site with ``E||x / C||² = 1``, from the source's first ``n_batches`` global batches (Gemma Scope §3).

    Summed on the devices; one transfer at the end. Returns ``{group: float32 [n_sites]}``.

    Raises:
      ValueError: non-finite activations (naming the batches and site), or all-zero ones.
    """
    mean_sq = jax.jit(lambda batch: {g: jnp.mean(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1), axis=-1)
                                     for g, x in batch.items()}, out_shardings=NamedSharding(mesh, P()))
    batches = source.batches(batch_size, 0, mesh)
    sums = None
    for _, batch in zip(range(n_batches), batches):
        sums = mean_sq(batch) if sums is None else jax.tree.map(jnp.add, sums, mean_sq(batch))
    batches.close()
    source.check_finite()
    constants = {}
    for g, total in sums.items():
        value = np.asarray(total, np.float64) / n_batches
        if not (np.isfinite(value).all() and (value > 0).all()):
            raise ValueError(f"cannot normalise sites {source.groups[g]}: mean squared norms {value.tolist()} "
                             "(zero or not finite)")
        constants[g] = np.sqrt(value).astype(np.float32)
    return constants
