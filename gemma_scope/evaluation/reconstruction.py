"""How well SAEs and transcoders reconstruct on raw activations (arXiv 2408.05147 §4), from running sums over
batches, so the activations may be larger than memory. All use folded (release-convention) params
(``sae.encode`` / ``sae.predict``); a transcoder's reconstruction is of the site it predicts.

- L0: mean number of active latents per token.
- FVU: mean squared reconstruction error / mean squared distance to the dataset mean (both summed over d).
- MSE: mean over tokens of ``||x − x̂||²`` (summed over d, as in the training loss, Eq. 4).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope import sae

# Latent activations of one batch may take this many bytes (float32 [batch, M]) when batch_size is not given.
_LATENT_BYTES_PER_BATCH = 2**28


def default_batch_size(width: int) -> int:
    """Tokens per batch so that one batch's float32 latents take at most 256 MiB (between 64 and 4096)."""
    return int(min(4096, max(64, _LATENT_BYTES_PER_BATCH // (4 * width))))


@jax.jit
def _reconstruction_sums(params: dict, x: jax.Array, y: jax.Array, weight: jax.Array,
                         shift: jax.Array) -> dict[str, jax.Array]:
    """Weighted sums over tokens that the metrics are ratios of; also the per-token squared error.

    Args:
      params: folded SAE or transcoder params, width M, input width d_in, output width d.
      x: raw input activations ``[n, d_in]`` (any float dtype).
      y: raw activations to predict ``[n, d]``: ``x`` for an SAE.
      weight: float32 ``[n]``, 1 for tokens that count and 0 for padding / special tokens.
      shift: float32 ``[d]``, subtracted before the variance sums so they do not cancel catastrophically
        (shifted-data variance; any value near the data mean works).

    Returns:
      float32 ``n`` (tokens), ``sq_err`` (Σ||y − ŷ||²), ``active`` (Σ L0), ``fires [M]`` (tokens each latent is
      active on), ``centred [d]`` (Σ(y − shift)), ``centred_sq`` (Σ||y − shift||²), ``token_sq_err [n]``.
    """
    f = sae.encode(params, x)
    y = y.astype(jnp.float32)
    token_sq_err = jnp.sum((y - sae.predict(params, x)) ** 2, axis=-1)
    active = (f > 0).astype(jnp.float32)
    centred = y - shift
    return {
        "n": weight.sum(),
        "sq_err": weight @ token_sq_err,
        "active": weight @ active.sum(axis=-1),
        "fires": weight @ active,
        "centred": weight @ centred,
        "centred_sq": weight @ jnp.sum(centred**2, axis=-1),
        "token_sq_err": token_sq_err,
    }


class Totals:
    """Float64 running totals of an SAE's reconstruction sums over batches (``add``) and the metrics they give."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.shift: np.ndarray | None = None

    def add(self, params: dict, x: jax.Array, weight: np.ndarray, y: jax.Array | None = None) -> np.ndarray:
        """Adds one batch (input ``x [n, d_in]``, target ``y [n, d]`` (default x), ``weight [n]``); returns its
        per-token squared error ``[n]``."""
        y = x if y is None else y
        if self.shift is None:
            counted = np.asarray(y, np.float64)[weight > 0]
            self.shift = (counted.mean(axis=0) if len(counted) else np.zeros(y.shape[-1])).astype(np.float32)
        sums = jax.device_get(_reconstruction_sums(params, x, y, jnp.asarray(weight, jnp.float32), self.shift))
        token_sq_err = sums.pop("token_sq_err")
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + np.asarray(value, np.float64)
        return token_sq_err

    def variance(self) -> float:
        """Mean squared distance of the counted tokens to their mean, ``E||x − E x||²``."""
        n = self.sums["n"]
        return float(self.sums["centred_sq"] / n - np.sum((self.sums["centred"] / n) ** 2))

    def metrics(self) -> dict:
        """The metrics of the batches added so far (keys as ``activation_metrics``). Raises ValueError if no
        token counted."""
        n = float(self.sums.get("n", 0.0))
        if n == 0:
            raise ValueError("no tokens to evaluate on (empty input or every token masked out)")
        mse = float(self.sums["sq_err"] / n)
        frequencies = self.sums["fires"] / n
        return {
            "l0": float(self.sums["active"] / n),
            "fvu": mse / self.variance(),
            "mse": mse,
            "dead_fraction": float(np.mean(self.sums["fires"] == 0)),
            "n_tokens": int(round(n)),
            "frequencies": frequencies.astype(np.float32),
        }


def activation_metrics(
    params: dict, x: np.ndarray | Iterable[np.ndarray], batch_size: int | None = None
) -> dict:
    """L0, FVU, MSE, latent firing frequencies and dead fraction of an SAE on raw activations (§4).

    Streams in batches, so ``x`` may be larger than memory (a memory-mapped array or an iterable of arrays);
    only running sums are kept.

    Args:
      params: folded SAE params (``W_enc [d, M]`` ...), numpy or jax arrays.
      x: raw site activations ``[N, d]`` (float32/bfloat16), or an iterable of ``[n_i, d]`` arrays.
      batch_size: tokens per jitted call; default ``default_batch_size(M)``. Batches are zero-padded to this
        size (padding has weight 0), so the computation compiles once.

    Returns:
      dict with float ``l0`` (mean active latents per token), ``fvu``, ``mse`` (mean ``||x − x̂||²`` summed over
      d), ``dead_fraction`` (latents never active on these tokens), int ``n_tokens`` and float32
      ``frequencies [M]`` (fraction of tokens each latent is active on).

    Raises:
      ValueError: activations whose width is not the SAE's d, NaN/Inf in them (naming the file of a memory-mapped
        shard and the row), or no tokens.
    """
    params = jax.tree.map(jnp.asarray, params)
    d, width = params["W_enc"].shape
    batch_size = batch_size or default_batch_size(width)
    if isinstance(x, (np.ndarray, jax.Array)):
        x, batch_size = [x], max(1, min(batch_size, len(x)))
    totals = Totals()
    for batch in _rebatch(x, batch_size, d):
        n = len(batch)
        weight = np.zeros(batch_size, np.float32)
        weight[:n] = 1
        padded = np.zeros((batch_size, d), batch.dtype)
        padded[:n] = batch
        totals.add(params, padded, weight)
    return totals.metrics()


def _rebatch(arrays: Iterable[np.ndarray], batch_size: int, d: int) -> Iterator[np.ndarray]:
    """Re-cuts a stream of ``[n_i, d]`` arrays into ``[batch_size, d]`` batches (the last may be shorter)."""
    pending, count = [], 0
    for array in arrays:
        if array.ndim != 2 or array.shape[1] != d:
            raise ValueError(f"activations have shape {array.shape}; expected [tokens, {d}] to match the SAE's W_enc")
        start = 0
        while start < len(array):
            take = min(batch_size - count, len(array) - start)
            pending.append(np.asarray(array[start : start + take]))
            if not np.isfinite(pending[-1]).all():
                row = start + int(np.argmin(np.isfinite(pending[-1]).all(axis=-1)))
                where = getattr(array, "filename", None) or "the activations"
                raise ValueError(f"{where}: row {row} holds NaN/Inf; expected finite activations (FVU and L0 would "
                                 "be undefined)")
            count += take
            start += take
            if count == batch_size:
                yield np.concatenate(pending)
                pending, count = [], 0
    if count:
        yield np.concatenate(pending)
