"""Transcoders of the embedded Gemma 3 270M's MLPs, with and without an affine skip connection (Gemma Scope 2), on a
laptop CPU.

    python -m gemma_scope.train --config=experiments/gemma3_270m_transcoder.py

One forward pass per batch of text feeds 12 transcoders: at layers 4, 8 and 12 each reads ``mlp_in.L`` (the
pre-feed-forward RMSNorm's output) and predicts ``mlp.L`` (after the post-feed-forward norm, before the residual
add), without and with ``x @ W_skip``, each pulled towards target L0 15 and 45 (Gemma Scope 2's small and medium
buckets), so the two variants are compared at equal L0. Every other knob is the embedded SAE default's
(experiments/gemma3_270m_res.py: per-dimension normalisation of input and output, the target-L0 loss with λ 1,
b_dec from the mean (of mlp.L here), batch 256 × 1,600 steps, width 2,048, 256-token context, learning rate
5e-4). The release is
``release_gs2/transcoder_all/layer_L_width_2k_l0_{small|medium}[_affine]`` (Gemma Scope 2 layout) and the
evaluation splices each transcoder's prediction in place of ``mlp.L``.
"""

from gemma_scope import configs


def get_config():
    """The transcoder run (module docstring); every field can be overridden with ``--config.<path>=``."""
    config = configs.sibling_config(__file__, "gemma3_270m_res.py")  # the embedded default's knobs, reused
    config.workdir = "runs/gemma3_270m_transcoder"
    config.data.sites = ""
    config.transcoder.layers = "4,8,12"
    config.transcoder.skip = (False, True)
    config.sae.target_l0 = (15.0, 45.0)  # in Gemma Scope 2's L0 buckets small (10–20) and medium (30–60)
    return config
