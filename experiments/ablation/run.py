"""The recipe ablation (README "Recipe ablation") in one command:
``python experiments/ablation/run.py [--out=runs/ablation] [--rows=…] [--sites=…]``.

1. Caches at least 140,000 activations per site of res.4/8/12 of Gemma 3 270M once (``python -m
   gemma_scope.activations``, bfloat16, 256-token sequences of the corpus's train split; 9 shards, 146,800
   activations; 1,600 steps × 256 visit each about 2.8 times, the default run's ``data.passes = 2`` twice).
2. Trains every row × site of ``experiments/ablation/config.py`` from that cache (same tokens, same seed).
3. Takes, per row and site, the released SAE with L0 closest to 100, and evaluates all of them together on the
   first ``--num_sequences`` held-out sequences × 256 tokens (one clean pass shared by all), in two disjoint
   halves: each metric is the token-weighted mean of the halves, its noise half the halves' difference (the
   standard error of a mean of two halves), and for the change from a row's parent row (``PARENT`` of
   config.py) the same is taken of the paired difference (both rows see the same tokens, so the pair's noise is
   smaller than either row's).
4. Writes ``<out>/ablation.json`` and ``<out>/ablation.md`` (the table in the README).

Steps already done (a manifest, a release) are skipped, so a killed run resumes by rerunning the command.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments/ablation/config.py"
SITES = ("res.4", "res.8", "res.12")
TOKENS = 140_000
SEQ_LEN = 256


def _run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def _ablation():
    sys.path.insert(0, str(CONFIG.parent))
    import config  # experiments/ablation/config.py

    return config


def _closest_release(workdir: pathlib.Path, target: float) -> tuple[pathlib.Path, dict]:
    """The released SAE of a run whose average L0 is closest to ``target``, with its cfg.json metadata."""
    metas = [(p, json.loads((p.parent / "cfg.json").read_text())["metadata"])
             for p in sorted(workdir.glob("release/**/params.npz"))]
    if not metas:
        raise FileNotFoundError(f"no released SAE under {workdir}/release")
    return min(metas, key=lambda pm: abs(pm[1]["average_l0"] - target))


def _combine(halves: list[dict]) -> dict:
    """Token-weighted mean of two halves' metrics, each with its noise (half the halves' difference)."""
    out = {}
    weights = np.array([h["n_targets"] for h in halves], np.float64)
    for key in ("l0", "fvu", "delta_lm_loss", "loss_recovered", "clean_loss"):
        values = np.array([h[key] for h in halves])
        out[key] = float(values @ weights / weights.sum())
        out[key + "_noise"] = float(abs(values[0] - values[1]) / 2)
    fires = sum(h["frequencies"] * h["n_tokens"] for h in halves)
    out["dead_fraction"] = float(np.mean(fires == 0))
    out["n_tokens"] = int(sum(h["n_tokens"] for h in halves))
    return out


def evaluate(saes: list[tuple[str, str, pathlib.Path]], num_sequences: int, lm_batch_size: int) -> list[dict]:
    """``(row, site, path)`` → metrics on two disjoint halves of the held-out sequences (module docstring)."""
    from gemma_scope import model, release
    from gemma_scope.data.reader import SequenceReader
    from gemma_scope.evaluation.splice import evaluate_grid
    from gemma_scope.sites import Site

    lm = model.load("gemma3_270m")
    reader = SequenceReader(None, split="heldout", seq_len=SEQ_LEN, packing="packed", tokenizer=lm.tokenizer)
    if num_sequences > reader.sequences_per_epoch:
        raise ValueError(f"held-out split has only {reader.sequences_per_epoch} sequences of {SEQ_LEN} tokens")
    held_out = reader.sequences(0, num_sequences)
    tokens, mask = held_out["tokens"], held_out["mask"]
    grid = [(Site.parse(site), release.load_params(path)) for _, site, path in saes]
    half = num_sequences // 2
    halves = [evaluate_grid(lm.params, lm.config, tokens[s], mask[s], grid, batch_size=lm_batch_size)
              for s in (slice(0, half), slice(half, num_sequences))]
    results = []
    for i, (row, site, path) in enumerate(saes):
        pair = [halves[0][i], halves[1][i]]
        meta = json.loads((path.parent / "cfg.json").read_text())["metadata"]
        results.append({"row": row, "site": site, "sae": str(path), **_combine(pair),
                        "l0_coefficient": meta.get("l0_coefficient"), "target_l0": meta.get("target_l0"),
                        "halves": {k: [h[k] for h in pair] for k in ("delta_lm_loss", "fvu")}})
    return results


def change_and_noise(cur: dict, base: dict, key: str) -> tuple[float, float]:
    """``cur[key] − base[key]`` and its noise, half the difference between the two halves' paired differences
    (records of ``evaluate`` on the same held-out sequences)."""
    change = np.array(cur["halves"][key]) - np.array(base["halves"][key])
    return float(cur[key] - base[key]), float(abs(change[0] - change[1]) / 2)


def add_change_noise(results: list[dict], parent: dict[str, str]) -> list[dict]:
    """Adds to each row whose parent row was evaluated at the same site its change from the parent, with the noise
    of that change: half the difference between the two halves' paired differences."""
    by_key = {(r["row"], r["site"]): r for r in results}
    for cur in results:
        prev = by_key.get((parent.get(cur["row"]), cur["site"]))
        if prev is None:
            continue
        cur["parent"] = prev["row"]
        for key in ("delta_lm_loss", "fvu"):
            cur[f"{key}_change"], cur[f"{key}_change_noise"] = change_and_noise(cur, prev, key)
    return results


def table(results: list[dict]) -> str:
    lines = ["| row | site | λ | L0 | FVU | delta LM loss (nats) | change from its parent row | loss recovered "
             "| dead fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        change = (f"{r['delta_lm_loss_change']:+.3f} ± {r['delta_lm_loss_change_noise']:.3f} ({r['parent']})"
                  if "delta_lm_loss_change" in r else "–")
        lines.append(f"| {r['row']} | {r['site']} | {r['l0_coefficient']} | {r['l0']:.1f} | "
                     f"{r['fvu']:.3f} ± {r['fvu_noise']:.3f} | {r['delta_lm_loss']:.3f} ± {r['delta_lm_loss_noise']:.3f} "
                     f"| {change} | {100 * r['loss_recovered']:.1f}% | {r['dead_fraction']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ablation", help="output directory (relative to the repository)")
    parser.add_argument("--num_sequences", type=int, default=64, help="held-out sequences × 256 tokens (≥ 16k tokens)")
    parser.add_argument("--lm_batch_size", type=int, default=8)
    parser.add_argument("--sites", default=",".join(SITES), help="a subset of res.4,res.8,res.12")
    ablation = _ablation()
    parser.add_argument("--rows", default=",".join(ablation.ROWS), help="a subset of the rows of config.py")
    args = parser.parse_args()
    sites, rows = tuple(args.sites.split(",")), tuple(args.rows.split(","))
    if not set(sites) <= set(SITES):
        parser.error(f"--sites must be a subset of {SITES}, got {sites}")
    if not set(rows) <= set(ablation.ROWS):
        parser.error(f"--rows must be a subset of {ablation.ROWS}, got {rows}")
    out = (ROOT / args.out).resolve()
    acts = out / "acts"
    if not all((acts / site / "manifest.json").is_file() for site in sites):
        _run(["-m", "gemma_scope.activations", f"--config={ROOT / 'experiments/gemma3_270m_res.py'}",
              f"--config.data.sites={','.join(SITES)}", f"--config.data.seq_len={SEQ_LEN}", f"--out={acts}",
              f"--tokens={TOKENS}", "--storage_dtype=bfloat16"])
    saes = []
    for row in rows:
        for site in sites:
            workdir = out / row / site
            if not any(workdir.glob("release/**/params.npz")):
                _run(["-m", "gemma_scope.train", f"--config={CONFIG}:row={row},site={site}",
                      f"--config.data.path={acts / site}", f"--config.workdir={workdir}"])
            saes.append((row, site, _closest_release(workdir, 100.0)[0]))
    results = add_change_noise(evaluate(saes, args.num_sequences, args.lm_batch_size), ablation.PARENT)
    (out / "ablation.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "ablation.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    os.environ.setdefault("GEMMA_SCOPE_CORPUS", str(ROOT / "corpus"))
    main()
