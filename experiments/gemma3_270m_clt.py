"""A cross-layer transcoder (CLT) over all 18 layers of the embedded Gemma 3 270M, on a laptop CPU (Gemma Scope 2's
``clt/``; Ameisen et al. 2025).

    python -m gemma_scope.train --config=experiments/gemma3_270m_clt.py

Layer L's F latents read ``mlp_in.L`` (the pre-feed-forward RMSNorm's output) and write to ``mlp.L'`` of every layer
L' ≥ L (after the post-feed-forward norm). One LM pass per batch feeds it; the loss is the sum over the 18 output
layers of the normalised squared error plus the target-L0 pull on each layer's L0 (``clt.l0 = "per_layer"``,
target 16 per layer: Gemma Scope 2's small bucket), each latent's decoder over its target layers held at unit norm
(``gemma_scope/sae/crosslayer_train.py``). Every other knob is the embedded SAE default's
(experiments/gemma3_270m_res.py: per-dimension normalisation of each layer's input and output, λ 1, b_dec from the
mean of mlp.L, batch 256, 256-token context, learning rate 5e-4).

F = 128 latents per layer (2,304 in all) is chosen for time: a CLT step costs
(n + 3)/4 = 5.25× the FLOPs of the per-layer transcoders at n = 18 (benchmarks/RESULTS.md, "Cross-layer
transcoder step"). Measured on the project's 2-core Xeon (2026-12-02, README "CLT against per-layer transcoders"):
a grid of this CLT, its affine twin and 36 per-layer transcoders, LM pass included, took 1.4 s per step wall with
the cores nearly to itself and ≈ 3 s while another training shared them, with tcmalloc preloaded
(``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4``); under glibc malloc 40% of its CPU time was
kernel time (page faults) and a step took ≈ 9 s at load 3–7. This CLT alone costs less than that grid, so 600 steps
take at most ≈ 15 minutes on two idle cores with tcmalloc (not timed alone), plus ≈ 2 minutes of start-up; the
trainer then evaluates the replacement model (every mlp.L replaced at once) on 32 × 256 held-out tokens
(3 passes per batch of 4 sequences, ≈ 6.6 s each measured on shared cores: about 3 minutes). The trainer held
≈ 10 GB of memory for that grid.
``python -m gemma_scope.evaluate --sae=runs/gemma3_270m_clt/release_gs2/clt/<variant> --model=gemma3_270m`` adds
each layer replaced alone (2 × 18 more passes per batch).
The release is ``release_gs2/clt/width_2304_l0_<bucket>/`` (a 6-step run on the real model, under load: 4.5 minutes,
release written, L0 ≈ 60 per layer before the L0 warmup has acted).
``--config.clt.skip=False,True`` adds the affine variant; ``--config.sae.target_l0=16,48`` a sweep.
"""

from gemma_scope import configs


def get_config():
    """The CLT run (module docstring); every field can be overridden with ``--config.<path>=``."""
    config = configs.sibling_config(__file__, "gemma3_270m_res.py")  # the embedded default's knobs, reused
    config.workdir = "runs/gemma3_270m_clt"
    config.data.sites = ""
    config.clt.layers = "*"
    config.clt.width = 128
    config.clt.skip = (False,)
    config.clt.l0 = "per_layer"
    config.sae.target_l0 = (16.0,)  # per layer: Gemma Scope 2's small bucket (10–20)
    config.train.steps = 600
    config.train.checkpoint_every = 200
    config.train.l0_warmup_steps = 200
    config.train.dead_window_steps = 200
    config.eval.num_sequences = 32
    return config
