"""Gemma Scope: residual-stream SAEs of Gemma 2 27B at layers 10, 22 and 34, width 131k (as released), trained together from one forward pass.

    python -m gemma_scope.train --config=experiments/27b_res.py --config.data.model=/path/to/gemma-2-27b \
        [--config=experiments/27b_res.py:layer=all,width=65536]

``data.model`` is a local checkpoint: a Hugging Face directory (config.json + *.safetensors + tokenizer.model)
or a gemma-library/Kaggle orbax checkpoint. Build the corpus with that model's tokenizer first:
``python -m gemma_scope.data.build --out=corpus --tokenizer=/path/to/gemma-2-27b/tokenizer.model``.
Recipe, widths and token budgets as in arXiv 2408.05147 §3 (gemma_scope.configs).
"""

from gemma_scope import configs


def get_config(arg=None):
    """See the module docstring; ``arg``: optional ``layer=<L>|all,width=<W>``."""
    config = configs.paper_run("gemma2_27b", "res", (10, 22, 34), arg)
    if "width=" not in (arg or ""):
        config.sae.width = 2**17
        config.train.steps = configs.paper_tokens(2**17) // configs.PAPER_BATCH_SIZE
        config.workdir = "/tmp/gemma_scope/gemma2_27b_res_w131072"
    return config
