"""A crosscoder over the residual stream of the embedded Gemma 3 270M at layers 5, 9, 12 and 15 (Gemma Scope 2's
``crosscoder/`` covers four layers at about 25/50/65/85% depth; Lindsey et al. 2024), on a laptop CPU.

    python -m gemma_scope.train --config=experiments/gemma3_270m_crosscoder.py

One set of 2,048 latents reads ``res`` of the four layers (an encoder per layer, summed, with the pre-encoder bias)
and reconstructs all four (acausal); the loss is the sum over the four layers of the normalised squared error plus
the target-L0 pull (target 50: Gemma Scope 2's medium bucket), each latent's decoder over the four layers held at
unit norm (``gemma_scope/sae/crosslayer_train.py``). Every other knob is the embedded SAE default's
(experiments/gemma3_270m_res.py). Its step costs about what the default's 9 SAEs cost (4 layers' encoders and
decoders of 2,048 latents against 9 SAEs of 2,048), so training takes about as long (≈ 12 minutes).
"""

from gemma_scope import configs


def get_config():
    """The crosscoder run (module docstring); every field can be overridden with ``--config.<path>=``."""
    config = configs.sibling_config(__file__, "gemma3_270m_res.py")  # the embedded default's knobs, reused
    config.workdir = "runs/gemma3_270m_crosscoder"
    config.data.sites = ""
    config.crosscoder.layers = "5,9,12,15"
    config.crosscoder.width = 2048
    config.sae.target_l0 = (50.0,)
    return config
