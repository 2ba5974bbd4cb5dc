"""A feature browser for one SAE: what each latent fires on, as a static site that opens from disk.

    python -m gemma_scope.browse --sae=PATH --model=gemma3_270m --out=DIR [--tokens=N] [--site=res.8]

One pass of the model over N held-out corpus tokens, with the SAE encoding the activations of its site, records
per latent (every statistic counts document tokens only: BOS, EOS and padding are masked out, as in evaluation):

- firing frequency (fraction of tokens with ``f_i > 0``), the mean activation over the tokens it fires on, and
  the maximum;
- a histogram of its non-zero activations on log2 bins (``BINS_PER_OCTAVE`` per octave, clipped at both ends);
- the top-k activating contexts: a running top-k in JAX over the whole pass (each batch's top-k candidates are
  merged with the running ones, so no activation array outlives its batch), each with the latent's activation
  on every token of a window around the peak token;
- a uniform random sample of the tokens it fires on (the same running top-k, keyed by a uniform random number
  instead of the activation: reservoir sampling), shown by activation interval below the top contexts, as
  Neuronpedia's "activation quantiles" show what the latent does when it fires weakly;
- for ``res`` sites, the output tokens its decoder direction promotes and suppresses (`logit_effects`).

The site (``DIR/index.html``) lists the latents (sortable by frequency and activation, searchable by promoted token
and context text) and shows one latent's contexts, histogram and tokens on click. It is plain HTML/CSS/JS from
``gemma_scope/browser/``; the data are JavaScript files (not JSON, which browsers do not fetch from ``file://``).
Dead latents (never fired on the N tokens) and dense ones (frequency above ``--dense_frequency``, 10% by default,
the "high-frequency" cut of the JumpReLU paper, arXiv 2407.14435 §5) are flagged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gemma_scope import cli, model, release, sae
from gemma_scope.sites import Site

ASSETS = pathlib.Path(__file__).with_name("browser")
BINS_PER_OCTAVE = 4
# Histogram bin j holds activations in [2**((j + LOWEST_BIN) / 4), 2**((j + LOWEST_BIN + 1) / 4)): 2**-12 .. 2**20.
LOWEST_BIN = -12 * BINS_PER_OCTAVE
NUM_BINS = 32 * BINS_PER_OCTAVE
DENSE_FREQUENCY = 0.1
# Random contexts are shown in these intervals of the latent's maximum activation (the top-k covers the rest).
SAMPLE_INTERVALS = ((0.0, 1 / 3), (1 / 3, 2 / 3))


def load_sae(path: str | pathlib.Path, site: str | None) -> tuple[pathlib.Path, dict[str, np.ndarray], Site]:
    """One SAE named on a command line: (its file, folded params, its site).

    ``site`` (e.g. "res.8") wins over what the release path or SAELens metadata says.

    Raises:
      FileNotFoundError: nothing SAE-like at path. ValueError: several SAEs under path, an unknown site, or a
      malformed SAE file (`release.load_params`).
    """
    found = release.find_saes(path)
    if len(found) != 1:
        listed = "\n  ".join(map(str, found))
        raise ValueError(f"{path} holds {len(found)} SAEs; pass one of them:\n  {listed}")
    file = found[0]
    site = site or release.sae_info(file)["site"]
    if site is None:
        raise ValueError(f"{file}: cannot tell which site the SAE reads; pass --site (e.g. --site=res.8)")
    return file, release.load_params(file), Site.parse(site)


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
      ValueError: an SAE whose input width differs from the site's width, or a site beyond the model's layers.
    """
    d, width = sae_params["W_enc"].shape
    if d != cfg.site_width(site.kind):
        raise ValueError(f"SAE input width {d} does not match site {site} of width {cfg.site_width(site.kind)}")

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


def _rounded(values, digits: int = 4) -> list:
    """Floats to ``digits`` significant digits for compact JSON."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, np.float64).ravel()]


class _Contexts:
    """Renders contexts from a pass: per token its display text and the latent's activation."""

    def __init__(self, tokens: np.ndarray, piece: Callable[[int], str], before: int):
        self.tokens, self.piece, self.before = tokens, functools.lru_cache(maxsize=None)(piece), before

    def render(self, token_id: int, window: np.ndarray) -> dict:
        seq, pos = divmod(int(token_id), self.tokens.shape[1])
        lo = max(0, pos - self.before)
        hi = min(self.tokens.shape[1], pos - self.before + len(window))
        ids = self.tokens[seq, lo:hi]
        acts = window[lo - (pos - self.before): hi - (pos - self.before)]
        return {"act": _rounded([window[self.before]])[0], "center": pos - lo,
                "tokens": [self.piece(int(i)) for i in ids], "acts": _rounded(acts)}


def _histogram(counts: np.ndarray) -> dict:
    """The occupied range of a latent's log2 histogram: bin edges (activation units) and counts."""
    nonzero = np.flatnonzero(counts)
    if not len(nonzero):
        return {"edges": [], "counts": []}
    lo, hi = nonzero[0], nonzero[-1] + 1
    edges = 2.0 ** ((np.arange(lo, hi + 1) + LOWEST_BIN) / BINS_PER_OCTAVE)
    return {"edges": _rounded(edges), "counts": counts[lo:hi].tolist()}


def write_site(out: str | pathlib.Path, stats: Stats, tokens: np.ndarray, piece: Callable[[int], str], *,
               promoted: tuple | None = None, title: str = "SAE latents", meta: dict | None = None,
               dense_frequency: float = DENSE_FREQUENCY, per_interval: int = 4) -> pathlib.Path:
    """Writes the browser for one pass into ``out``; returns the path of ``index.html``.

    Args:
      stats: numpy `Stats` of `collect` (token ids index ``tokens``).
      tokens: int [num_sequences, T], the tokens of the pass in order.
      piece: display text of a token id (e.g. the SentencePiece piece with "▁" as a space).
      promoted: `logit_effects`' four arrays, with ``piece`` applied to show the ids, or None (no token lists).
      title, meta: page heading and facts shown under it (model, site, tokens, SAE path, ...).
      dense_frequency: frequency above which a latent is flagged "dense".
      per_interval: random contexts shown per interval of `SAMPLE_INTERVALS`.

    Files: ``index.html``, ``browser.js``, ``style.css`` (copied from ``gemma_scope/browser``), ``data/index.js``
    (one row per latent) and ``data/latents/<i>.js`` (one latent's view).
    """
    out = pathlib.Path(out)
    (out / "data" / "latents").mkdir(parents=True, exist_ok=True)
    for asset in ASSETS.iterdir():
        shutil.copyfile(asset, out / asset.name)
    contexts = _Contexts(tokens, piece, stats.before)
    n_tokens = max(int(stats.tokens), 1)
    rows = []
    for i in range(len(stats.count)):
        count = int(stats.count[i])
        frequency = count / n_tokens
        flag = "dead" if count == 0 else "dense" if frequency > dense_frequency else ""
        top = [contexts.render(t, w) for t, w, key in zip(stats.top.ids[i], stats.top.windows[i], stats.top.keys[i])
               if np.isfinite(key)]
        max_act = top[0]["act"] if top else 0.0
        latent = {"id": i, "count": count, "frequency": frequency, "max": max_act,
                  "mean": float(stats.total[i]) / count if count else 0.0, "flag": flag,
                  "hist": _histogram(stats.hist[i]), "top": top,
                  "samples": _samples(stats, i, max_act, contexts, per_interval)}
        if promoted is not None:
            up_ids, up, down_ids, down = (a[i] for a in promoted)
            latent["promoted"] = [[piece(int(t)), s] for t, s in zip(up_ids, _rounded(up))]
            latent["suppressed"] = [[piece(int(t)), s] for t, s in zip(down_ids, _rounded(down))]
        (out / "data" / "latents" / f"{i}.js").write_text(
            "BROWSE.showLatent(" + json.dumps(latent, ensure_ascii=False, separators=(",", ":")) + ");\n",
            encoding="utf-8")
        search = " ".join("".join(c["tokens"]) for c in top[:5])
        rows.append([i, _rounded([frequency])[0], max_act, _rounded([latent["mean"]])[0], flag,
                     [p for p, _ in latent.get("promoted", [])[:5]], search])
    index = {"title": title, "meta": meta or {}, "tokens": int(stats.tokens), "dense_frequency": dense_frequency,
             "columns": ["id", "frequency", "max", "mean", "flag", "promoted", "text"], "latents": rows}
    (out / "data" / "index.js").write_text(
        "var BROWSE_INDEX = " + json.dumps(index, ensure_ascii=False, separators=(",", ":")) + ";\n", encoding="utf-8")
    return out / "index.html"


def _samples(stats: Stats, i: int, max_act: float, contexts: _Contexts, per_interval: int) -> list[dict]:
    """Random contexts of latent ``i`` grouped by `SAMPLE_INTERVALS` of its maximum activation."""
    sample = stats.sample
    entries = [(t, w) for t, w, key in zip(sample.ids[i], sample.windows[i], sample.keys[i]) if np.isfinite(key)]
    groups = []
    for lo, hi in SAMPLE_INTERVALS:
        chosen = [contexts.render(t, w) for t, w in entries
                  if lo * max_act < w[contexts.before] <= hi * max_act][:per_interval]
        groups.append({"label": f"{lo:.2g}–{hi:.2g} × max", "contexts": chosen})
    return groups


def piece_text(tokenizer) -> Callable[[int], str]:
    """Display text of a token id: its SentencePiece piece with "▁" shown as a space (byte-fallback pieces such
    as ``<0xE2>`` stay as they are)."""
    return lambda i: tokenizer.id_to_piece(i).replace("▁", " ")


def browse(sae_path: str | pathlib.Path, out: str | pathlib.Path, *, model_name: str = "gemma3_270m",
           site: str | None = None, corpus: str | None = None, num_tokens: int = 65_536, seq_len: int = 256,
           lm_batch_size: int = 8, k: int = 20, seed: int = 0,
           dense_frequency: float = DENSE_FREQUENCY) -> pathlib.Path:
    """Runs `collect` over the first ``num_tokens`` held-out tokens (rounded down to whole batches of sequences of
    ``seq_len``, packed as in training) and writes the site (`write_site`); returns the path of ``index.html``.

    Raises:
      ValueError / FileNotFoundError: as `load_sae`, `collect`, and the corpus reader (missing corpus, too few
      held-out tokens).
    """
    from gemma_scope.data.reader import SequenceReader

    sae_file, sae_params, sae_site = load_sae(sae_path, site)
    lm = model.load(model_name)
    reader = SequenceReader(corpus, split="heldout", seq_len=seq_len, tokenizer=lm.tokenizer)
    num_sequences = min(max(1, num_tokens // seq_len), reader.sequences_per_epoch)
    batch = min(lm_batch_size, num_sequences)
    rows = [reader.sequence(i) for i in range(num_sequences - num_sequences % batch)]  # whole batches: one compile
    tokens, mask = np.stack([t for t, _ in rows]), np.stack([m for _, m in rows])
    batches = [(tokens[i:i + batch], mask[i:i + batch]) for i in range(0, len(tokens), batch)]
    stats = collect(lm.params, lm.config, batches, sae_site, sae_params, k=k, seed=seed)
    promoted = logit_effects(lm.params, lm.config, sae_params["W_dec"]) if sae_site.kind == "res" else None
    meta = {"SAE": str(sae_file), "model": str(model_name), "site": str(sae_site), "width": len(stats.count),
            "held-out tokens": int(stats.tokens)}
    return write_site(out, stats, tokens, piece_text(lm.tokenizer), promoted=promoted, meta=meta,
                      title=f"{sae_site} SAE latents", dense_frequency=dense_frequency)


def main(argv: list[str] | None = None) -> pathlib.Path:
    """``python -m gemma_scope.browse``: writes the browser and prints the path of its index.html."""
    parser = cli.parser("python -m gemma_scope.browse", __doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True, help="params.npz, SAE directory or SAELens directory (one SAE)")
    parser.add_argument("--model", default="gemma3_270m", help="registry name (gemma3_270m), HF dir or orbax path")
    parser.add_argument("--out", required=True, help="directory for the site (index.html and data/)")
    parser.add_argument("--tokens", type=int, default=65_536, help="held-out tokens to run (whole sequences)")
    parser.add_argument("--site", help="site the SAE reads, e.g. res.8 (default: from the SAE's release path)")
    parser.add_argument("--corpus", help="built corpus directory (default: $GEMMA_SCOPE_CORPUS or ./corpus)")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per held-out sequence")
    parser.add_argument("--lm_batch_size", type=int, default=8, help="sequences per LM batch")
    parser.add_argument("--top_k", type=int, default=20, help="top-activating contexts kept per latent")
    parser.add_argument("--dense_frequency", type=float, default=DENSE_FREQUENCY,
                        help="flag latents firing on more than this fraction of tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random contexts")
    args = parser.parse_args(argv)
    if args.tokens < args.seq_len:
        parser.error(f"--tokens={args.tokens} is less than one sequence (--seq_len={args.seq_len})")
    index = browse(args.sae, args.out, model_name=args.model, site=args.site, corpus=args.corpus,
                   num_tokens=args.tokens, seq_len=args.seq_len, lm_batch_size=args.lm_batch_size, k=args.top_k,
                   seed=args.seed, dense_frequency=args.dense_frequency)
    print(index)
    return index


if __name__ == "__main__":
    cli.run(main)
