"""SAELens's JumpReLU train step and torch's dense matmul peak; runs in the optional SAELens venv.

Run as ``.venv-saelens/bin/python -m benchmarks.saelens_step --out FILE`` from the repository root (the
harness ``benchmarks.run`` does). The timed call is ``SAETrainer.step(batch)`` of sae_lens 6.x on a
``JumpReLUTrainingSAE`` (DeepMind "step" L0 loss): activation scaler, forward, MSE + L0 loss, backward through
the straight-through estimators, dead-latent statistics, grad-norm clipping, Adam, LR and λ schedulers.
SAELens 6 does not renormalise decoder rows during training (decoder_init_norm only sets the initial norm),
so no decoder projection is timed on this side. bf16 runs use the trainer's own ``autocast`` (bf16 matmul
inputs, float32 parameters, threshold kept float32).
"""

from __future__ import annotations

import platform

import torch
from sae_lens import __version__ as sae_lens_version
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from benchmarks.common import (
    DTYPES,
    sae_step_flops_per_token,
    sae_step_rows,
    step_worker_args,
    throughput,
    time_calls,
    write_json,
)

MATMUL_N = 3072  # square matmul size for the dense peak


def _batches(d_model: int, batch: int, count: int = 2) -> list[torch.Tensor]:
    """Random non-zero activations, N(0, 1) float32 [batch, d]; the same distribution as our side's."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, d_model, generator=gen) for _ in range(count)]


def trainer_for(d_model: int, width: int, batch: int, dtype: str) -> SAETrainer:
    """A SAELens trainer of one JumpReLU SAE (float32 params) with autocast iff ``dtype == "bfloat16"``."""
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_model, d_sae=width, dtype="float32", device="cpu",
                                                        l0_coefficient=1e-3))
    cfg = SAETrainerConfig(total_training_samples=10**9 * batch, train_batch_size_samples=batch, lr=7e-5, lr_end=7e-5,
                           adam_beta1=0.0, device="cpu", autocast=dtype == "bfloat16")
    return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))


def bench_step(d_model: int, width: int, batch: int, dtype: str, warmup: int, steps: int) -> dict:
    """Time ``trainer.step`` at one shape and dtype; seconds/step, tokens/s, GFLOP/s (12·d·width per token)."""
    trainer = trainer_for(d_model, width, batch, dtype)
    batches = _batches(d_model, batch)
    counter = iter(range(10**9))

    def call():
        out = trainer.step(batches[next(counter) % len(batches)])
        trainer.n_training_steps += 1  # fit() advances it after each step
        return out.loss.item()  # torch on CPU is synchronous; .item() also checks the step ran

    stats = time_calls(call, warmup, steps)
    return throughput(stats, batch, batch * sae_step_flops_per_token(d_model, width))


def bench_matmul(dtype: str, warmup: int, steps: int) -> dict:
    """GFLOP/s of a square ``MATMUL_N`` torch matmul (bf16 goes through oneDNN with float32 accumulation)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, generator=gen).to(getattr(torch, dtype))
    b = torch.randn(MATMUL_N, MATMUL_N, generator=gen).to(getattr(torch, dtype))
    stats = time_calls(lambda: torch.mm(a, b), warmup, steps)
    return throughput(stats, 0, 2 * MATMUL_N**3)


def main() -> None:
    parser = step_worker_args(__doc__.splitlines()[0])
    parser.add_argument("--no-matmul", action="store_true", help="skip the matmul peak")
    args = parser.parse_args()
    versions = {"torch": torch.__version__, "sae_lens": sae_lens_version, "python": platform.python_version()}
    result = {"versions": versions, "torch_threads": torch.get_num_threads(), "matmul": {}}
    if not args.no_matmul:
        for dtype in DTYPES:
            result["matmul"][f"torch_{dtype}"] = dict(bench_matmul(dtype, args.warmup, args.steps), shape=[MATMUL_N] * 3)
    result["sae_step"] = sae_step_rows(args, bench_step)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
