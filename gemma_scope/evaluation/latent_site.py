"""The feature browser's static site: one pass's per-latent statistics (``evaluation.latents``) as HTML/CSS/JS
that opens from disk.

The site (``index.html``) lists the latents (sortable by frequency and activation, searchable by promoted token
and context text) and shows one latent's contexts, histogram and tokens on click. It is plain HTML/CSS/JS from
``gemma_scope/browser/``; the data are JavaScript files (not JSON, which browsers do not fetch from ``file://``).
Dead latents (never fired on the pass's tokens) and dense ones (frequency above ``DENSE_FREQUENCY``, the
"high-frequency" cut of the JumpReLU paper, arXiv 2407.14435 §5) are flagged. Below the top contexts, random
contexts are shown by interval of the latent's maximum activation (``SAMPLE_INTERVALS``).
"""

from __future__ import annotations

import functools
import json
import pathlib
import shutil
from collections.abc import Callable

import numpy as np

from gemma_scope.evaluation.latents import BINS_PER_OCTAVE, LOWEST_BIN, Stats
from gemma_scope.files import space_for

ASSETS = pathlib.Path(__file__).parents[1] / "browser"
DENSE_FREQUENCY = 0.1
# Random contexts are shown in these intervals of the latent's maximum activation (the top-k covers the rest).
SAMPLE_INTERVALS = ((0.0, 1 / 3), (1 / 3, 2 / 3))


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
      stats: numpy `Stats` of ``latents.collect`` (its token ids index ``tokens``).
      tokens: int [num_sequences, T], the tokens of the pass in order.
      piece: display text of a token id (e.g. the SentencePiece piece with "▁" as a space).
      promoted: ``latents.logit_effects``' four arrays, with ``piece`` applied to show the ids, or None (no token
        lists).
      title, meta: page heading and facts shown under it (model, site, tokens, SAE path, ...).
      dense_frequency: frequency above which a latent is flagged "dense".
      per_interval: random contexts shown per interval of `SAMPLE_INTERVALS`.

    Files: ``index.html``, ``browser.js``, ``style.css`` (copied from ``gemma_scope/browser``), ``data/index.js``
    (one row per latent) and ``data/latents/<i>.js`` (one latent's view).
    """
    out = pathlib.Path(out)
    (out / "data" / "latents").mkdir(parents=True, exist_ok=True)
    for asset in ASSETS.iterdir():
        with space_for(out / asset.name, asset.stat().st_size):
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
        _write(out / "data" / "latents" / f"{i}.js",
               "BROWSE.showLatent(" + json.dumps(latent, ensure_ascii=False, separators=(",", ":")) + ");\n")
        search = " ".join("".join(c["tokens"]) for c in top[:5])
        rows.append([i, _rounded([frequency])[0], max_act, _rounded([latent["mean"]])[0], flag,
                     [p for p, _ in latent.get("promoted", [])[:5]], search])
    index = {"title": title, "meta": meta or {}, "tokens": int(stats.tokens), "dense_frequency": dense_frequency,
             "columns": ["id", "frequency", "max", "mean", "flag", "promoted", "text"], "latents": rows}
    _write(out / "data" / "index.js",
           "var BROWSE_INDEX = " + json.dumps(index, ensure_ascii=False, separators=(",", ":")) + ";\n")
    return out / "index.html"


def _write(path: pathlib.Path, text: str) -> None:
    """Writes UTF-8 text; NoSpaceError naming the file and its size if the disk is full."""
    data = text.encode("utf-8")
    with space_for(path, len(data)):
        path.write_bytes(data)


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
