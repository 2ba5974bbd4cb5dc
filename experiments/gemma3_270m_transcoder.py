"""Transcoders of the embedded Gemma 3 270M's MLPs, with and without an affine skip connection (Gemma Scope 2), on a
laptop CPU.

    python -m gemma_scope.train --config=experiments/gemma3_270m_transcoder.py

One forward pass per batch of text feeds 18 transcoders: at layers 4, 8 and 12 each reads ``mlp_in.L`` (the
pre-feed-forward RMSNorm's output) and predicts ``mlp.L`` (after the post-feed-forward norm, before the residual
add), without and with ``x @ W_skip``, each with a sweep of three λ values, so the report shows an L0–FVU and
L0–delta-LM-loss frontier per layer and variant and the two can be compared at equal L0. The knobs are the
embedded SAE default's (experiments/gemma3_270m_res.py: batch 256 × 1,600 steps, width 2,048, 256-token context,
learning rate 5e-4); λ is larger because the MLP output, unlike the residual stream, has no massive dimensions
that dominate its normalised norm. The release is ``release_gs2/transcoder_all/layer_L_width_2k_l0_<label>[_affine]``
(Gemma Scope 2 layout) and the evaluation splices each transcoder's prediction in place of ``mlp.L``.
"""

from gemma_scope import configs


def get_config():
    """The transcoder run (module docstring); every field can be overridden with ``--config.<path>=``."""
    config = configs.train_config(configs.lm_data(model="gemma3_270m", sites=""))
    config.workdir = "runs/gemma3_270m_transcoder"
    config.transcoder.layers = "4,8,12"
    config.transcoder.skip = (False, True)
    config.data.seq_len = 256
    config.data.chunk_sequences = 64
    config.data.forward_batch = 8
    config.data.passes = 2

    config.sae.width = 2048
    config.sae.l0_coefficient = (3e-4, 1e-3, 3e-3)

    config.train.steps = 1600
    config.train.batch_size = 256
    config.train.learning_rate = 5e-4
    config.train.lr_warmup_steps = 50
    config.train.l0_warmup_steps = 400
    config.train.checkpoint_every = 400
    config.train.log_every = 100
    config.train.dead_window_steps = 400
    config.train.norm_batches = 16

    config.eval.num_sequences = 16
    config.eval.seq_len = 256
    config.eval.lm_batch_size = 4
    return config
