"""Gemma Scope: attention-output SAEs of Gemma 2 9B (4096 wide; released for all 42 layers at 16k and 131k).

    python -m gemma_scope.train --config=experiments/9b_att.py --config.data.model=/path/to/gemma-2-9b \
        [--config=experiments/9b_att.py:layer=all,width=65536]

``data.model`` is a local checkpoint: a Hugging Face directory (config.json + *.safetensors + tokenizer.model)
or a gemma-library/Kaggle orbax checkpoint. Build the corpus with that model's tokenizer first:
``python -m gemma_scope.data.build --out=corpus --tokenizer=/path/to/gemma-2-9b/tokenizer.model``.
Recipe, widths and token budgets as in arXiv 2408.05147 §3 (gemma_scope.configs).
"""

from gemma_scope import configs


def get_config(arg=None):
    """See the module docstring; ``arg``: optional ``layer=<L>|all,width=<W>``."""
    config = configs.paper_run("gemma2_9b", "att", (20,), arg)
    return config
