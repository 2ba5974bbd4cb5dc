"""A cross-layer transcoder (CLT) against per-layer transcoders at the same L0 and the same tokens (README
"CLT against per-layer transcoders"), in one command:
``python experiments/clt_science/run.py [--workdir=runs/clt_vs_transcoders] [--steps=300] [--num_sequences=64]``.

1. Trains, unless released at ``--steps``, ONE grid on the embedded Gemma 3 270M (``experiments/gemma3_270m_clt.py`` with
   ``TRAIN_FLAGS``): one LM pass per batch feeds four dictionaries over all 18 layers, so all see the same tokens in
   the same order, with the same seed, ``--steps`` × 256 tokens, learning rate and target L0 16 per layer: a CLT
   with F = 128 latents per layer, the same with an affine skip (``x_ℓ @ W_skip[ℓ]``), and 18 per-layer
   transcoders (``mlp_in.ℓ → mlp.ℓ``, width 128) without and with the skip. Per layer each has 128 latents and the
   same L0 target, so the totals (2,304 latents, target L0 288 per token) match. A tcmalloc ``LD_PRELOAD`` (Debian's
   libtcmalloc-minimal4) cut the step's kernel time (page faults of glibc malloc; benchmarks/README.md) but is not
   needed.
2. Evaluates the four as replacement models, every ``mlp.ℓ`` replaced at once in one forward pass
   (``evaluation.crosslayer``; the per-layer transcoders as the CLT whose only decoders are ``W_dec[ℓ, :, ℓ]``), on
   the first ``--num_sequences`` held-out sequences × 256 tokens, sharing the clean and zero-ablation passes
   (``evaluate_crosslayers``): delta LM loss, loss recovered, FVU and L0 by layer, the fraction of latents that
   never fired on those tokens.
3. Noise: the standard error of delta LM loss over held-out batches of ``--lm_batch_size`` consecutive sequences
   (a ratio of sums, so the residuals ``D_b − Δ·T_b`` of each batch's NLL change D_b and target count T_b), and the
   same of each arm's paired change from the per-layer transcoders of its skip variant (both see the same tokens,
   so the pair's noise is smaller than either arm's).
4. Writes ``<workdir>/science/science.json`` and ``science.md`` (the README's tables) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEQ_LEN = 256
TRAIN_FLAGS = ["--config.clt.skip=False,True", "--config.transcoder.layers=*", "--config.transcoder.skip=False,True",
               "--config.sae.width=128", "--config.eval.num_sequences=0"]
ARMS = ("transcoders", "transcoders +skip", "CLT", "CLT +skip")
BASELINE = {"transcoders": None, "transcoders +skip": "transcoders", "CLT": "transcoders",
            "CLT +skip": "transcoders +skip"}


def _train(workdir: pathlib.Path, steps: int) -> float:
    """Runs the training command (module docstring, step 1); returns its wall seconds."""
    cmd = [sys.executable, "-m", "gemma_scope.train", f"--config={ROOT / 'experiments/gemma3_270m_clt.py'}",
           f"--config.workdir={workdir}", *TRAIN_FLAGS, f"--config.train.steps={steps}"]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def load_arms(workdir: pathlib.Path, n_layers: int) -> dict[str, dict]:
    """The four released dictionaries of the run, each in ``sae.crosslayer``'s CLT layout (per-layer transcoders
    on the diagonal ``W_dec[i, :, i]``).

    Raises:
      FileNotFoundError: a CLT or a layer's transcoder missing from ``<workdir>/release_gs2``.
    """
    from gemma_scope import release

    root, arms = workdir / "release_gs2", {}
    for clt_dir in sorted((root / "clt").glob("width_*")):
        params, info = release.load_crosslayer(clt_dir, n_layers=n_layers)
        arms["CLT +skip" if info["affine"] else "CLT"] = params
    for affine in (False, True):
        found = [[p for p in sorted((root / "transcoder_all").glob(f"layer_{layer}_width_*/params.safetensors"))
                  if p.parent.name.endswith("_affine") == affine] for layer in range(n_layers)]
        if any(len(files) != 1 for files in found):
            raise FileNotFoundError(f"{root / 'transcoder_all'}: expected one {'affine ' if affine else ''}"
                                    f"transcoder per layer 0..{n_layers - 1}, found {[len(f) for f in found]}")
        loaded = [release.load_params(files[0]) for files in found]
        width, d = loaded[0]["W_dec"].shape
        w_dec = np.zeros((n_layers, width, n_layers, d), np.float32)
        for i, tc in enumerate(loaded):
            w_dec[i, :, i] = tc["W_dec"]
        keys = ("W_enc", "b_enc", "threshold", "b_dec") + (("W_skip",) if affine else ())
        arms["transcoders +skip" if affine else "transcoders"] = {"W_dec": w_dec} | {
            k: np.stack([tc[k] for tc in loaded]) for k in keys}
    missing = [arm for arm in ARMS if arm not in arms]
    if missing:
        raise FileNotFoundError(f"{root}: no release of {missing}; train first (module docstring)")
    return {arm: arms[arm] for arm in ARMS}


def standard_error(change: np.ndarray, targets: np.ndarray, block: int) -> float:
    """Standard error of ``Σ change / Σ targets`` over consecutive blocks of ``block`` sequences (``change``,
    ``targets``: per-sequence sums ``[N]``): the delta method for a ratio of sums."""
    blocks = len(change) // block
    d = change[: blocks * block].reshape(blocks, block).sum(1)
    t = targets[: blocks * block].reshape(blocks, block).sum(1)
    residual = d - d.sum() / t.sum() * t
    return float(np.sqrt(blocks / (blocks - 1) * np.sum(residual**2)) / t.sum())


def evaluate(arms: dict[str, dict], num_sequences: int, lm_batch_size: int) -> dict[str, dict]:
    """Each arm's replacement-model record (module docstring, steps 2–3)."""
    from gemma_scope import model
    from gemma_scope.data.reader import SequenceReader
    from gemma_scope.evaluation.crosslayer import evaluate_crosslayers

    lm = model.load("gemma3_270m")
    reader = SequenceReader(None, split="heldout", seq_len=SEQ_LEN, packing="packed", tokenizer=lm.tokenizer)
    if num_sequences > reader.sequences_per_epoch:
        raise ValueError(f"held-out split has only {reader.sequences_per_epoch} sequences of {SEQ_LEN} tokens")
    held_out = reader.sequences(0, num_sequences)
    layers = list(range(lm.config.num_layers))
    records = evaluate_crosslayers(lm.params, lm.config, held_out["tokens"], held_out["mask"], list(arms.values()),
                                   layers, "clt", per_layer=False, batch_size=lm_batch_size)
    results = {}
    for arm, (record,) in zip(arms, records):
        seq = record["by_sequence"]
        results[arm] = {k: record[k] for k in ("delta_lm_loss", "loss_recovered", "clean_loss", "zero_ablation_loss",
                                               "fvu", "l0", "fvu_by_layer", "l0_by_layer", "dead_fraction",
                                               "n_targets")}
        results[arm]["delta_lm_loss_se"] = standard_error(seq["spliced_nll"] - seq["clean_nll"], seq["n_targets"],
                                                          lm_batch_size)
        results[arm]["_spliced"] = seq["spliced_nll"]
        results[arm]["_targets"] = seq["n_targets"]
    for arm, base in BASELINE.items():
        if base is not None:
            change = results[arm]["_spliced"] - results[base]["_spliced"]
            results[arm]["change"] = {"from": base, "delta_lm_loss": results[arm]["delta_lm_loss"] -
                                      results[base]["delta_lm_loss"],
                                      "se": standard_error(change, results[arm]["_targets"], lm_batch_size)}
    for result in results.values():
        del result["_spliced"], result["_targets"]
    return results


def tables(results: dict[str, dict]) -> str:
    """The README's two tables: the replacement models, then FVU and L0 by layer."""
    lines = ["| dictionaries (18 layers × 128 latents) | L0 per token (all layers) | FVU (pooled) | delta LM loss "
             "(nats) | change from per-layer transcoders | loss recovered | dead latents |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        change = (f"{r['change']['delta_lm_loss']:+.3f} ± {r['change']['se']:.3f} ({r['change']['from']})"
                  if "change" in r else "–")
        lines.append(f"| {arm} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['delta_lm_loss']:.3f} ± "
                     f"{r['delta_lm_loss_se']:.3f} | {change} | {100 * r['loss_recovered']:.1f}% | "
                     f"{100 * r['dead_fraction']:.1f}% |")
    arms = list(results)
    lines += ["", "| layer | " + " | ".join(f"FVU {a}" for a in arms) + " | " + " | ".join(f"L0 {a}" for a in arms)
              + " |", "|---" * (1 + 2 * len(arms)) + "|"]
    for layer in range(len(results[arms[0]]["fvu_by_layer"])):
        lines.append(f"| {layer} | " + " | ".join(f"{results[a]['fvu_by_layer'][layer]:.3f}" for a in arms) + " | "
                     + " | ".join(f"{results[a]['l0_by_layer'][layer]:.1f}" for a in arms) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/clt_vs_transcoders", help="the run (relative to the repository)")
    parser.add_argument("--steps", type=int, default=600, help="training steps × 256 tokens (the CLT config's 600)")
    parser.add_argument("--num_sequences", type=int, default=64, help="held-out sequences × 256 tokens")
    parser.add_argument("--lm_batch_size", type=int, default=8, help="sequences per pass; the unit of the noise")
    args = parser.parse_args()
    if args.num_sequences < 2 * args.lm_batch_size:
        parser.error(f"--num_sequences={args.num_sequences} must give at least two batches of --lm_batch_size="
                     f"{args.lm_batch_size} (the noise is a standard error over batches)")
    workdir = (ROOT / args.workdir).resolve()
    walls = {}
    released = [json.loads(c.read_text()).get("training_steps") for c in workdir.glob("release_gs2/clt/*/config.json")]
    if released != [args.steps] * 2:  # else resumes (or extends) the run and releases it again
        walls["train_s"] = _train(workdir, args.steps)
    start = time.perf_counter()
    results = evaluate(load_arms(workdir, 18), args.num_sequences, args.lm_batch_size)
    walls["evaluate_s"] = time.perf_counter() - start
    out = workdir / "science"
    out.mkdir(exist_ok=True)
    report = {"results": results, "walls": walls, "num_sequences": args.num_sequences,
              "lm_batch_size": args.lm_batch_size, "load_average": os.getloadavg()}
    (out / "science.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "science.md").write_text(tables(results) + "\n")
    print(tables(results))
    print(f"walls: {walls}; load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    os.environ.setdefault("GEMMA_SCOPE_CORPUS", str(ROOT / "corpus"))
    main()
