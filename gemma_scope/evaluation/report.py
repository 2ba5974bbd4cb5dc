"""Plots and a Markdown report of SAE evaluations, in the style of Gemma Scope's figures (arXiv 2408.05147 §4).

A *record* is one evaluated SAE: a dict with ``site`` (str, "res.6"), ``width`` (int M), ``l0``, ``fvu`` and,
when known, ``l0_coefficient`` (λ), ``target_l0``, ``delta_lm_loss``, ``clean_loss``, ``zero_ablation_loss``, ``dead_fraction``,
``n_tokens``, ``sae`` (path), ``frequencies`` (float ``[M]``, fraction of tokens each latent fires on) and
``by_position`` (``{"fvu": [T], "delta_lm_loss": [T-1], ...}``) — the outputs of ``gemma_scope.evaluate``.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from gemma_scope.files import json_ready  # noqa: E402
from gemma_scope.release.params import width_label  # noqa: E402
from gemma_scope.sites import Site  # noqa: E402

FRONTIER_PLOT = "frontier.png"
POSITION_PLOT = "by_position.png"
FREQUENCY_PLOT = "frequencies.png"
CANONICAL_L0 = 100  # the canonical SAE of a (site, width) is the one with mean L0 closest to 100 (§4).

METRICS_LEGEND = """\
L0: mean number of active latents per token. FVU: mean squared reconstruction error / mean squared distance to
the mean activation. Delta LM loss: next-token cross-entropy (nats/token) with the SAE reconstruction spliced in
at the site minus the clean cross-entropy; zero-abl. loss splices zeros instead. BOS/EOS/padding are excluded
from every average. Dead: fraction of latents that never fired on the evaluation tokens. λ: the L0 coefficient.
Definitions follow Gemma Scope (arXiv 2408.05147, §4)."""


def _label(record: dict) -> str:
    return f"{record['site']} {width_label(int(record['width']))}"


def _site_order(site: str):
    """Sorts "res.10" after "res.9"; names that are not sites (e.g. "custom") go last."""
    try:
        return (0, Site.parse(site))
    except ValueError:
        return (1, site)


def _groups(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records grouped by (site, width), each group sorted by L0."""
    keyed = sorted(records, key=lambda r: (_site_order(r["site"]), int(r["width"]), r["l0"]))
    return {label: list(group) for label, group in itertools.groupby(keyed, key=_label)}


def _canonical(records: Sequence[dict]) -> list[dict]:
    """Each (site, width)'s canonical SAE: mean L0 closest to 100 (§4)."""
    return [min(group, key=lambda r: abs(r["l0"] - CANONICAL_L0)) for group in _groups(records).values()]


def _log_x(ax) -> None:
    """Log x axis labelled with plain numbers at 1-2-5 steps."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _has(records: Sequence[dict], key: str) -> bool:
    return any(r.get(key) is not None for r in records)


def plot_frontier(records: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Sparsity–fidelity frontier over a λ sweep (Gemma Scope Figs. 2–3): L0 vs FVU, and L0 vs delta LM loss
    when records have it; one line per (site, width), L0 on a log axis. Returns the PNG path."""
    panels = ["fvu"] + (["delta_lm_loss"] if _has(records, "delta_lm_loss") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for label, group in _groups(records).items():
            points = [(r["l0"], r[key]) for r in group if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        _log_x(ax)
        ax.set_xlabel("L0 (mean active latents per token)")
        ax.set_ylabel({"fvu": "FVU", "delta_lm_loss": "delta LM loss (nats/token)"}[key])
        ax.set_title({"fvu": "Sparsity vs reconstruction", "delta_lm_loss": "Sparsity vs delta LM loss"}[key])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _log_binned(curve, bins_per_decade: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Means of a per-position curve over log-spaced position bins from 1 (position 0, BOS, left out), so that
    late positions, each seen by few tokens, do not drown the plot in noise. Returns (bin centre, mean)."""
    curve = np.asarray(curve, dtype=np.float64)
    edges = np.unique(np.round(np.logspace(0, np.log10(len(curve)), 1 + int(bins_per_decade * np.log10(len(curve))))))
    edges = np.append(edges.astype(int), len(curve))
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        values = curve[lo:hi][np.isfinite(curve[lo:hi])]
        if hi > lo and values.size:
            centres.append(np.sqrt(lo * (hi - 1)) if hi - 1 > lo else lo)
            means.append(values.mean())
    return np.array(centres), np.array(means)


def plot_by_position(records: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Reconstruction FVU and delta LM loss by sequence position (Gemma Scope Fig. 6) of each (site, width)'s
    canonical SAE, averaged over log-spaced position bins (position 0, BOS, is never spliced). Returns the PNG path."""
    records = _canonical([r for r in records if r.get("by_position")])
    if not records:
        raise ValueError("no record has by_position curves (evaluation.splice.evaluate_grid gives them)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for record in records:
        label = f"{_label(record)} L0={record['l0']:.0f}"
        for ax, key in zip(axes, ("fvu", "delta_lm_loss")):
            ax.plot(*_log_binned(record["by_position"][key]), marker=".", label=label, linewidth=1)
    for ax, title in zip(axes, ("Reconstruction FVU by position", "Delta LM loss by position")):
        _log_x(ax)
        ax.set_xlabel("token position")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("FVU (MSE at position / site variance)")
    axes[1].set_ylabel("delta LM loss (nats/token)")
    return _save(fig, path)


def plot_frequency_histograms(records: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Histograms of log10 latent firing frequency (Gemma Scope Fig. 7) of each (site, width)'s canonical SAE,
    one step curve each; dead latents (frequency 0) are left out and counted in the legend. Returns the PNG path."""
    records = _canonical([r for r in records if r.get("frequencies") is not None])
    if not records:
        raise ValueError("no record has latent frequencies (they come from reconstruction.activation_metrics)")
    logs = [np.log10(np.asarray(r["frequencies"], np.float64)[np.asarray(r["frequencies"]) > 0]) for r in records]
    low = min((x.min() for x in logs if x.size), default=-6.0)
    bins = np.linspace(math.floor(low), 0, 41)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for record, values in zip(records, logs):
        dead = len(record["frequencies"]) - values.size
        label = f"{_label(record)} L0={record['l0']:.0f} ({dead} dead)"
        ax.hist(values, bins=bins, histtype="step", density=True, linewidth=1.2, label=label)
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("density of latents")
    ax.set_title("Latent firing frequencies")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def markdown_table(records: Sequence[dict]) -> str:
    """One row per SAE (site, width, λ, target L0, L0, FVU, delta LM loss, losses, dead fraction, tokens); ★ marks
    each (site, width)'s canonical SAE, the one with L0 closest to 100 (§4)."""
    columns = ["site", "width", "λ", "target L0", "L0", "FVU", "delta LM loss", "clean loss", "zero-abl. loss", "dead",
               "tokens"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    canonical = {id(r) for r in _canonical(records)}
    for group in _groups(records).values():
        for r in group:
            cells = [
                r["site"] + (" ★" if id(r) in canonical and len(group) > 1 else ""),
                width_label(int(r["width"])),
                _fmt(r.get("l0_coefficient"), 3),
                _fmt(r.get("target_l0"), 4),
                _fmt(r["l0"], 4),
                _fmt(r["fvu"], 3),
                _fmt(r.get("delta_lm_loss"), 3),
                _fmt(r.get("clean_loss"), 4),
                _fmt(r.get("zero_ablation_loss"), 4),
                _fmt(r.get("dead_fraction"), 3),
                _fmt(r.get("n_tokens")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    records: Sequence[dict], out_dir: str | pathlib.Path, title: str = "SAE evaluation", notes: str = "",
    sections: Sequence[str] = (),
) -> pathlib.Path:
    """Writes ``report.md`` and the plots the records support into ``out_dir``; returns the report's path.

    Args:
      records: evaluated SAEs (module docstring); at least one.
      out_dir: created if missing.
      title: the report's heading.
      notes: Markdown placed under the heading (e.g. model, tokens seen, evaluation protocol).
      sections: Markdown sections appended at the end (e.g. ``probe_report.markdown``'s k-sparse probing).

    Raises:
      ValueError: no records.
    """
    if not records:
        raise ValueError("write_report needs at least one evaluated SAE record")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", notes, "## Results", markdown_table(records), METRICS_LEGEND]
    plots = [("Sparsity–fidelity frontier", FRONTIER_PLOT, plot_frontier, True),
             ("By sequence position", POSITION_PLOT, plot_by_position, _has(records, "by_position")),
             ("Latent firing frequencies", FREQUENCY_PLOT, plot_frequency_histograms, _has(records, "frequencies"))]
    for heading, name, plot, available in plots:
        if available:
            plot(records, out_dir / name)
            parts.append(f"## {heading}\n\n![{heading}]({name})")
    path = out_dir / "report.md"
    path.write_text("\n\n".join(s for s in [*parts, *sections] if s) + "\n")
    return path


def write_evaluation(records: Sequence[dict], out_dir: str | pathlib.Path, notes: str = "",
                     sections: Sequence[str] = ()) -> pathlib.Path:
    """Writes ``metrics.json`` (the records without ``frequencies``, strict JSON) and ``write_report``'s report
    (with ``sections`` at its end) into ``out_dir``; returns the report's path. Raises ValueError on no records."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = [{k: v for k, v in r.items() if k != "frequencies"} for r in records]
    (out_dir / "metrics.json").write_text(json.dumps(json_ready(metrics), indent=1) + "\n")
    return write_report(records, out_dir, notes=notes, sections=sections)
