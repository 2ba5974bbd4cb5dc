"""Per-latent statistics of one pass of the model over held-out tokens, with an SAE encoding the activations of
its site; the feature browser (``python -m gemma_scope.browse``) shows them.

Every statistic counts document tokens only (BOS, EOS and padding are masked out, as in evaluation):

- firing frequency (fraction of tokens with ``f_i > 0``), the mean activation over the tokens it fires on, and
  the maximum;
- a histogram of its non-zero activations on log2 bins (``BINS_PER_OCTAVE`` per octave, clipped at both ends);
- the top-k activating contexts: a running top-k in JAX over the whole pass (each batch's top-k candidates are
  merged with the running ones, so no activation array outlives its batch), each with the latent's activation
  on every token of a window around the peak token;
- a uniform random sample of the tokens it fires on (the same running top-k, keyed by a uniform random number
  instead of the activation: reservoir sampling), as Neuronpedia's "activation quantiles" show what the latent
  does when it fires weakly;
- for ``res`` sites, the output tokens its decoder direction promotes and suppresses (`logit_effects`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gemma_scope import model, sae
from gemma_scope.sites import Site

BINS_PER_OCTAVE = 4
# Histogram bin j holds activations in [2**((j + LOWEST_BIN) / 4), 2**((j + LOWEST_BIN + 1) / 4)): 2**-12 .. 2**20.
LOWEST_BIN = -12 * BINS_PER_OCTAVE
NUM_BINS = 32 * BINS_PER_OCTAVE


@dataclasses.dataclass
class TopK:
    """Per latent, the k best tokens of a pass by some key: ``keys`` float32 [M, k] (descending, -inf where fewer
    than k tokens qualified), ``ids`` int32 [M, k] (global token index: sequence * seq_len + position, -1 when
    empty) and ``windows`` float32 [M, k, before + 1 + after] (the latent's activation around the token; the
    token itself at index ``before``; zeros beyond the sequence's ends)."""

    keys: jax.Array
    ids: jax.Array
    windows: jax.Array


jax.tree_util.register_dataclass(TopK, data_fields=["keys", "ids", "windows"], meta_fields=[])


def empty_topk(width: int, k: int, window: int) -> TopK:
    """A `TopK` holding nothing, for ``width`` latents and windows of ``window`` tokens."""
    return TopK(jnp.full((width, k), -jnp.inf, jnp.float32), jnp.full((width, k), -1, jnp.int32),
                jnp.zeros((width, k, window), jnp.float32))


def merge_topk(best: TopK, f: jax.Array, keys: jax.Array, first_id: jax.Array, before: int) -> TopK:
    """The running top-k after one more batch.

    Args:
      best: the top-k so far (`TopK`, k and the window length from its shapes).
      f: float32 [B, T, M] latent activations of the batch (the windows are cut from these).
      keys: float32 [B, T, M], the ranking key of each (token, latent); -inf for tokens that must not enter.
      first_id: int32 scalar, the global index of the batch's token (0, 0).
      before: tokens of context before the key token in each window.

    Returns:
      The k largest keys over the old entries and the batch, per latent (ties keep the earlier entry first, as
      `jax.lax.top_k` does). Equal to a top-k over every token seen so far (tests/test_browse.py).
    """
    b, t, m = f.shape
    k, window = best.keys.shape[1], best.windows.shape[2]
    batch_keys, flat = jax.lax.top_k(keys.reshape(b * t, m).T, min(k, b * t))  # [M, k'] per latent
    row, pos = flat // t, flat % t
    padded = jnp.pad(f, ((0, 0), (before, window - 1 - before), (0, 0)))  # padded[:, p + j] = f[:, p + j - before]
    windows = padded[row[..., None], pos[..., None] + jnp.arange(window), jnp.arange(m)[:, None, None]]
    keys_all = jnp.concatenate([best.keys, batch_keys], axis=1)
    kept_keys, kept = jax.lax.top_k(keys_all, k)
    take = lambda a: jnp.take_along_axis(a, kept.reshape(kept.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    ids = jnp.concatenate([best.ids, first_id + flat.astype(jnp.int32)], axis=1)
    return TopK(kept_keys, take(ids), take(jnp.concatenate([best.windows, windows], axis=1)))


@dataclasses.dataclass
class Stats:
    """Running per-latent statistics of a pass (device arrays; `collect` returns them as numpy).

    ``tokens``: document tokens seen; ``count`` int32 [M]: tokens each latent fired on; ``total`` float32 [M]: sum
    of its activations; ``hist`` int32 [M, NUM_BINS]: log2-binned non-zero activations; ``top``: `TopK` by
    activation; ``sample``: `TopK` by a uniform random key over firing tokens (a uniform sample of them);
    ``before``: tokens before the key token in the windows (static).
    """

    tokens: jax.Array
    count: jax.Array
    total: jax.Array
    hist: jax.Array
    top: TopK
    sample: TopK
    before: int


jax.tree_util.register_dataclass(Stats, data_fields=["tokens", "count", "total", "hist", "top", "sample"],
                                 meta_fields=["before"])


def empty_stats(width: int, k: int, samples: int, before: int, after: int) -> Stats:
    """`Stats` of no tokens for ``width`` latents: top-``k`` contexts, ``samples`` random ones, windows of
    ``before`` + 1 + ``after`` tokens."""
    window = before + 1 + after
    return Stats(jnp.zeros((), jnp.int32), jnp.zeros(width, jnp.int32), jnp.zeros(width, jnp.float32),
                 jnp.zeros((width, NUM_BINS), jnp.int32), empty_topk(width, k, window),
                 empty_topk(width, samples, window), before)


def update_stats(stats: Stats, f: jax.Array, mask: jax.Array, first_id: jax.Array, rng: jax.Array) -> Stats:
    """`Stats` after one batch of latents ``f`` float32 [B, T, M]; ``mask`` bool [B, T] is False at tokens that do
    not count (their activations are zeroed, so they neither count nor show in windows); ``first_id`` as in
    `merge_topk`; ``rng`` a key for the random sample."""
    f = jnp.where(mask[..., None], f, 0.0)
    fired = f > 0
    bins = jnp.floor(jnp.log2(jnp.where(fired, f, 1.0)) * BINS_PER_OCTAVE).astype(jnp.int32) - LOWEST_BIN
    latent = jnp.broadcast_to(jnp.arange(f.shape[-1]), f.shape)
    hist = stats.hist.at[latent.reshape(-1), jnp.clip(bins, 0, NUM_BINS - 1).reshape(-1)].add(
        fired.reshape(-1).astype(jnp.int32))
    uniform = jax.random.uniform(rng, f.shape)
    return Stats(
        tokens=stats.tokens + mask.sum(dtype=jnp.int32),
        count=stats.count + fired.sum(axis=(0, 1), dtype=jnp.int32),
        total=stats.total + f.sum(axis=(0, 1)),
        hist=hist,
        top=merge_topk(stats.top, f, jnp.where(fired, f, -jnp.inf), first_id, stats.before),
        sample=merge_topk(stats.sample, f, jnp.where(fired, uniform, -jnp.inf), first_id, stats.before),
        before=stats.before,
    )


def collect(lm_params: dict, cfg: model.Config, batches: Iterable[tuple[np.ndarray, np.ndarray]], site: Site,
            sae_params: dict, *, k: int = 20, samples: int = 32, before: int = 24, after: int = 8, seed: int = 0,
            progress: bool = True) -> Stats:
    """One pass of the model over ``batches`` of (tokens int32 [B, T], mask bool [B, T]) with the SAE encoding
    the activations at ``site``; returns the `Stats` as numpy arrays.

    Global token ids count positions of all batches in order (batch-major, so id = sequence * T + position when
    every batch has the same T). Windows hold ``before`` tokens, the token, ``after`` tokens.

    Raises:
      ValueError: an SAE whose input width differs from the site's width, a site beyond the model's layers, or
        ``k`` < 1.
    """
    d, width = sae_params["W_enc"].shape
    cfg.check_site(site, d, "SAE input")
    if k < 1:
        raise ValueError(f"k (top contexts kept per latent) must be >= 1, got {k}")

    @jax.jit
    def step(stats, lm_params, sae_params, tokens, mask, first_id, rng):
        acts = model.forward(lm_params, cfg, tokens, capture=[site], logits=False).acts[site]
        f = sae.encode(sae_params, acts.reshape(-1, d)).reshape(*tokens.shape, width)
        return update_stats(stats, f, mask, first_id, rng)

    stats = empty_stats(width, k, samples, before, after)
    rng, first_id = jax.random.key(seed), 0
    for i, (tokens, mask) in enumerate(tqdm.tqdm(batches, desc="browse pass", disable=not progress, unit="batch")):
        stats = step(stats, lm_params, sae_params, jnp.asarray(tokens), jnp.asarray(mask),
                     jnp.int32(first_id), jax.random.fold_in(rng, i))
        first_id += tokens.size
    return jax.tree.map(np.asarray, stats)


def logit_effects(lm_params: dict, cfg: model.Config, w_dec: np.ndarray, k: int = 10,
                  chunk: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The output tokens each decoder direction promotes and suppresses most (the "logit lens" of a ``res`` latent).

    For latent i the score of vocabulary token v is ``E_v · ((1 + final_norm.scale) ⊙ W_dec[i])``: the change of
    v's logit per unit of latent activation along the direct path, when ``W_dec[i]`` is added to the last layer's
    residual stream, through the final RMSNorm (its ``1 + scale`` gain) and the tied unembedding ``E``. The norm's
    division by the RMS of the whole residual is a positive factor common to all v, and the final logit softcap
    is monotonic, so neither changes the ranking; both are left out, as are later layers (the score is the direct
    effect only, as Neuronpedia's "top/bottom logits" of ``W_dec @ W_U``).

    Args:
      w_dec: float32 [M, d_model] decoder rows.
      k: tokens per side; chunk: latents per matmul (a [chunk, vocab_size] block of scores at a time).

    Returns:
      (promoted ids [M, k], their scores [M, k] descending, suppressed ids [M, k], their scores [M, k] ascending).

    Raises:
      ValueError: ``w_dec`` not [M, d_model].
    """
    if w_dec.ndim != 2 or w_dec.shape[1] != cfg.d_model:
        raise ValueError(f"W_dec has shape {w_dec.shape}; expected [M, d_model={cfg.d_model}]")
    embedding = lm_params["embedder"]["input_embedding"]
    gain = 1 + lm_params["final_norm"]["scale"]

    @jax.jit
    def block(rows):
        scores = (rows * gain) @ embedding.T.astype(jnp.float32)
        up, up_ids = jax.lax.top_k(scores, k)
        down, down_ids = jax.lax.top_k(-scores, k)
        return up_ids, up, down_ids, -down

    m = len(w_dec)
    padded = np.pad(np.asarray(w_dec, np.float32), ((0, -m % chunk), (0, 0)))
    parts = [block(jnp.asarray(padded[i:i + chunk])) for i in range(0, len(padded), chunk)]
    return tuple(np.concatenate([np.asarray(p[j]) for p in parts])[:m] for j in range(4))
