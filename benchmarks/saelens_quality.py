"""SAELens's side of ``benchmarks.quality``: trains SAELens's JumpReLU SAE on cached activation shards; runs in the
optional SAELens venv (torch, no JAX), as ``PEER/bin/python -m benchmarks.saelens_quality --acts DIR --out DIR ...``.

The SAE is ``JumpReLUTrainingSAE`` with ``jumprelu_sparsity_loss_mode="quadratic"`` (SAELens's Gemma Scope 2 mode:
per token ``2/T · (L0 − T)²``, times ``l0_coefficient``, mean over the batch) and ``target_l0`` T, trained by
``SAETrainer.fit()`` for ``--steps`` batches of ``--batch`` rows. Everything else is SAELens's default (its
``LanguageModelSAERunnerConfig`` and ``JumpReLUTrainingSAEConfig``: learning rate 3e-4 constant, Adam β = (0.9,
0.999), no warm-up, l0_coefficient 1, threshold init 0.01, bandwidth 0.05, decoder init norm 0.1,
``apply_b_dec_to_input`` true) except ``--normalize`` (SAELens's ``normalize_activations``; its default "none").
Batches are drawn from the shards' rows in a new random order every epoch (``--seed``). The trained SAE (its
normalisation folded by ``fit()``) is written with ``save_inference_model`` to ``<out>/target_<T>/`` (``cfg.json`` +
``sae_weights.safetensors``, which ``gemma_scope.release`` reads), and ``<out>/target_<T>/train.json`` records the
wall time and the last step's L0 and MSE.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch
from sae_lens import __version__ as sae_lens_version
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer


def load_rows(acts: pathlib.Path) -> np.ndarray:
    """All rows of a float32 shard directory (``manifest.json``'s shards in order, else every ``*.npy``), [N, d].

    Raises:
      ValueError: a shard that is not float32 [n, d] (write the shards with ``--storage_dtype=float32``).
    """
    manifest = acts / "manifest.json"
    names = (sorted(json.loads(manifest.read_text())["shards"]) if manifest.is_file()
             else sorted(p.name for p in acts.glob("*.npy")))
    arrays = [np.load(acts / name, mmap_mode="r") for name in names]
    for name, a in zip(names, arrays):
        if a.dtype != np.float32 or a.ndim != 2:
            raise ValueError(f"{acts / name}: {a.dtype} {a.shape}; expected float32 [n, d] "
                             "(write the shards with --storage_dtype=float32)")
    return np.concatenate(arrays)


def batches(rows: torch.Tensor, batch: int, seed: int):
    """Endless batches of ``batch`` rows, a new permutation of all rows every epoch (a partial last batch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=gen)
        for i in range(0, len(rows) - batch + 1, batch):
            yield rows[order[i:i + batch]]


def train_one(rows: torch.Tensor, target_l0: float, args: argparse.Namespace) -> JumpReLUTrainingSAE:
    torch.manual_seed(args.seed)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=rows.shape[1], d_sae=args.width, dtype="float32", device="cpu", jumprelu_sparsity_loss_mode="quadratic",
        target_l0=target_l0, normalize_activations=args.normalize))
    lr = SAETrainerConfig.lr  # its default, 3e-4; lr_end is set by the runner config (to lr for "constant")
    cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
                           lr=lr, lr_end=lr, device="cpu", n_batches_for_norm_estimate=args.norm_batches)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(rows, args.batch, args.seed))
    return trainer.fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", required=True, type=pathlib.Path, help="float32 activation shards of one site")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--targets", required=True, help="target L0s, comma-separated")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalize", default="none", choices=("none", "expected_average_only_in"))
    parser.add_argument("--norm_batches", type=int, default=1000, help="SAELens's n_batches_for_norm_estimate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine 2 threads ran a step 1.2-6x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = torch.from_numpy(np.ascontiguousarray(load_rows(args.acts)))
    for target in (float(t) for t in args.targets.split(",")):
        out = args.out / f"target_{target:g}"
        start = time.perf_counter()
        sae = train_one(rows, target, args)
        wall = time.perf_counter() - start
        with torch.no_grad():
            x = rows[:4096]
            feats = sae.encode(x)
            l0 = float((feats > 0).sum(-1).float().mean())
        sae.save_inference_model(out)
        (out / "train.json").write_text(json.dumps({
            "target_l0": target, "wall_s": wall, "sae_lens": sae_lens_version, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "normalize_activations": args.normalize,
            "l0_first_4096_rows": l0, "steps": args.steps, "batch": args.batch, "width": args.width,
            "seed": args.seed}, indent=1))
        print(f"target {target:g}: L0 {l0:.1f} on the first 4,096 training rows, {wall:.0f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
