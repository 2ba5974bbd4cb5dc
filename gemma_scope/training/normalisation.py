"""The normalisation constants C of every site (training sees ``x / C``; Gemma Scope §3) and the initial b_dec
(zero, mean or geometric median), computed on the devices from an activation source's device-resident batches.
Both are per site of the source (keyed by ``source.groups``); ``grid.Grid.constants`` lays them out as the
stacked params are."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

B_DEC_INITS = ("zero", "mean", "geometric_median")  # zero: the paper (§3); the others as SAELens offers them
NORMALISATIONS = ("scalar", "per_dimension")  # scalar: the paper (§3)


def geometric_median(points: jax.Array, iterations: int = 100, eps: float = 1e-6) -> jax.Array:
    """The geometric median ``argmin_m Σ_i ||x_i − m||`` of ``points [N, d]``, float32 ``[d]``.

    Weiszfeld's algorithm (Weiszfeld 1937; as SAELens computes it for its ``b_dec_init_method="geometric_median"``):
    ``m ← Σ_i w_i x_i / Σ_i w_i`` with ``w_i = 1 / max(||x_i − m||, eps)``, starting from the mean; a fixed number
    of iterations (deterministic, jit-friendly) instead of SAELens's tolerance test.
    """
    points = jnp.asarray(points, jnp.float32)

    def update(_, m):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(points - m, axis=-1), eps)
        return (w @ points) / jnp.sum(w)

    return jax.lax.fori_loop(0, iterations, update, jnp.mean(points, axis=0))


def normalisation_constants(source, mesh, batch_size: int, n_batches: int, b_dec_init: str = "zero",
                            normalisation: str = "scalar") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each site's normalisation constants C (training sees ``x / C``, elementwise) and initial b_dec in
    normalised units, both from one pass over the source's first ``n_batches`` global batches, summed on the
    devices (one transfer at the end; on several processes the figures are over the global batches).

    ``normalisation``:
      ``"scalar"`` (the paper, §3): one C for all dimensions with ``E||x / C||² = 1``.
      ``"per_dimension"``: ``C_j = σ_j · √d`` with σ_j the standard deviation of dimension j, so every dimension
        of the centred ``x / C`` has variance 1/d and ``E||(x − E x) / C||² = 1``. Deviation from the paper (our
        choice): the MSE then weights every dimension alike, where the paper's lets one outsized dimension
        of a residual stream take the SAE's capacity from the dimensions the LM needs (README "Recipe" and
        "Recipe ablation" give the measurements). A dimension with σ_j < 1e-6 of the mean σ is treated as having
        that σ (no division by 0).

    ``b_dec_init``: ``"zero"`` (the paper, §3), ``"mean"`` (the activations' mean / C) or ``"geometric_median"``
    (``geometric_median`` of these batches / C; it keeps them on the devices). Deviation from the paper where
    the mean is used: Adam moves b_dec by about the learning rate per step, so a short run never gets from 0 to a
    residual stream whose mean holds most of E||x||² (README "Recipe").

    Returns:
      ``({group: C float32 [n_sites, d]}, {group: b_dec float32 [n_sites, d]})``, keyed and ordered as the
      source's width groups (``source.groups``); a scalar C is repeated over d.

    Raises:
      ValueError: activations not finite (naming the batches and site) or all zero; an unknown ``b_dec_init`` or
        ``normalisation``.
    """
    if b_dec_init not in B_DEC_INITS:
        raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {b_dec_init!r}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    replicated = NamedSharding(mesh, P())
    # Moments about the first batch's mean (per site and dimension): E x² − (E x)² would cancel float32 digits
    # where a dimension's mean is large against its spread, as residual streams' are.
    first_mean = jax.jit(lambda batch: {g: jnp.mean(x.astype(jnp.float32), axis=1) for g, x in batch.items()},
                         out_shardings=replicated)

    def about(batch, shift):  # per site and dimension: E u², E u over the batch, u = x − shift
        u = {g: x.astype(jnp.float32) - shift[g][:, None] for g, x in batch.items()}
        return {g: (jnp.mean(jnp.square(v), axis=1), jnp.mean(v, axis=1)) for g, v in u.items()}

    moments = jax.jit(about, out_shardings=replicated)
    batches = source.batches(batch_size, 0, mesh, stop=n_batches)
    shift, totals, kept = None, None, []
    for batch in batches:
        shift = first_mean(batch) if shift is None else shift
        totals = moments(batch, shift) if totals is None else jax.tree.map(jnp.add, totals, moments(batch, shift))
        if b_dec_init == "geometric_median":
            kept.append(batch)
    source.check_finite()
    if kept:
        median = jax.jit(lambda xs: {g: jax.vmap(geometric_median)(jnp.concatenate([x[g] for x in xs], axis=1))
                                     for g in xs[0]}, out_shardings=replicated)(kept)
    scales, b_dec = {}, {}
    for g, (sum_sq, sum_u) in totals.items():  # per site and dimension: E u_j², E u_j of u = x − shift
        offset = np.asarray(sum_u, np.float64) / n_batches
        variance = np.maximum(np.asarray(sum_sq, np.float64) / n_batches - offset**2, 0.0)
        mean = np.asarray(shift[g], np.float64) + offset
        norm_sq = (variance + mean**2).sum(axis=-1)  # E||x||²
        if not (np.isfinite(norm_sq).all() and (norm_sq > 0).all()):
            raise ValueError(f"cannot normalise sites {source.groups[g]}: mean squared norms {norm_sq.tolist()} "
                             "(zero or not finite)")
        if normalisation == "scalar":
            scale = np.repeat(np.sqrt(norm_sq)[:, None], mean.shape[-1], axis=-1)
        else:
            std = np.sqrt(variance)
            std = np.maximum(std, 1e-6 * std.mean(axis=-1, keepdims=True) + np.finfo(np.float32).tiny)
            scale = std * np.sqrt(mean.shape[-1])
        scales[g] = scale.astype(np.float32)
        centre = {"zero": np.zeros_like(mean), "mean": mean}.get(b_dec_init)
        centre = np.asarray(median[g], np.float64) if centre is None else centre
        b_dec[g] = (centre / scale).astype(np.float32)
    return scales, b_dec
