"""Cross-layer transcoders of Gemma 2 2B over all 26 layers, at Gemma Scope 2's CLT scale (its Gemma 3 1B CLTs:
"262k" = 10,080 latents per layer × 26 layers), with and without the affine skip connection. Not run here.

    python -m gemma_scope.data.build --out=corpus --tokenizer=/path/to/gemma-2-2b/tokenizer.model
    python -m gemma_scope.train --config=experiments/2b_clt.py --config.data.model=/path/to/gemma-2-2b

Layer L's latents read ``mlp_in.L`` and write to ``mlp.L'`` for every L' ≥ L; both variants train in one step from
one LM pass, each pulled to a target L0 of 45 per layer (Gemma Scope 2's medium bucket; ``clt.l0 = "per_layer"``).
Recipe as the embedded runs (per-dimension normalisation, target-L0 loss, b_dec from the mean) with Gemma Scope's
optimiser settings (learning rate 7e-5, 1,000 warmup steps, batch 4,096) and its token budget for wide
dictionaries, 8 B tokens (``configs.paper_tokens``).

Size (``gemma_scope/sae/crosslayer_train.py``): one CLT's ``W_dec [26, 10080, 26, 2304]`` is 15.7 G floats (63 GB in
float32; half of it the zero slots of the shared layout) and Adam's second moment as much again, so the two CLTs
hold ≈ 255 GB of state: ``mesh.model = "auto"`` splits the latents over 16 devices (262k / 16,384), e.g. a v5p-32
or 16 H100s. Per token the step costs ≈ 3 · 2 · 2304 · 10080 · (26 + 351) ≈ 5.3e10 FLOPs per CLT, 7.3× the 26
per-layer transcoders of the same width.
"""

from gemma_scope import configs

WIDTH_PER_LAYER = 10_080  # Gemma Scope 2's "262k" CLT of Gemma 3 1B: 10,080 × 26


def get_config():
    """See the module docstring."""
    config = configs.train_config(configs.lm_data(model="", sites=""))
    config.data.model_config = "gemma2_2b"
    config.workdir = "/tmp/gemma_scope/gemma2_2b_clt"
    config.clt.layers = "*"
    config.clt.width = WIDTH_PER_LAYER
    config.clt.skip = (False, True)
    config.clt.l0 = "per_layer"
    config.sae.normalisation = "per_dimension"
    config.sae.sparsity_loss = "target_l0"
    config.sae.target_l0 = (45.0,)
    config.sae.b_dec_init = "mean"
    config.train.steps = configs.paper_tokens(WIDTH_PER_LAYER * 26) // configs.PAPER_BATCH_SIZE
    return config
