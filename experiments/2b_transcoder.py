"""MLP transcoders of Gemma 2 2B with and without an affine skip connection (Gemma Scope 2's recipe on Gemma Scope's
model; Gemma Scope released skip-less transcoders of 2B at width 16k on every layer).

    python -m gemma_scope.train --config=experiments/2b_transcoder.py --config.data.model=/path/to/gemma-2-2b \
        [--config=experiments/2b_transcoder.py:layer=all,width=65536]

Each transcoder reads ``mlp_in.L`` (the pre-feed-forward RMSNorm's output) and predicts ``mlp.L`` (after the
post-feed-forward norm); both variants and the λ sweep train in one step from one LM pass. ``data.model`` is a
local checkpoint (Hugging Face directory or orbax checkpoint); build the corpus with its tokenizer first. Widths,
token budgets and λ sweep as the paper's SAE runs (gemma_scope.configs.paper_run); the release is in the Gemma
Scope 2 layout under ``<workdir>/release_gs2/transcoder_all``.
"""

from gemma_scope import configs


def get_config(arg=None):
    """See the module docstring; ``arg``: optional ``layer=<L>|all,width=<W>``."""
    config = configs.paper_run("gemma2_2b", "mlp_in", (12,), arg)
    config.transcoder.layers = config.data.sites.replace("mlp_in.", "")
    config.transcoder.skip = (False, True)
    config.data.sites = ""
    config.workdir = config.workdir.replace("_mlp_in_", "_transcoder_")
    return config
