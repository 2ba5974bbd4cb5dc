"""Gemma Scope: residual-stream SAEs of Gemma 2 9B-IT at layers 9, 20 and 31 (as released, widths 16k and 131k), trained together from one forward pass. The paper trained these on the instruction-tuned model; this config uses the same text corpus as the base-model runs.

    python -m gemma_scope.train --config=experiments/9b_it_res.py --config.data.model=/path/to/gemma-2-9b-it \
        [--config=experiments/9b_it_res.py:layer=all,width=65536]

``data.model`` is a local checkpoint: a Hugging Face directory (config.json + *.safetensors + tokenizer.model)
or a gemma-library/Kaggle orbax checkpoint. Build the corpus with that model's tokenizer first:
``python -m gemma_scope.data.build --out=corpus --tokenizer=/path/to/gemma-2-9b-it/tokenizer.model``.
Recipe, widths and token budgets as in arXiv 2408.05147 §3 (gemma_scope.configs).
"""

from gemma_scope import configs


def get_config(arg=None):
    """See the module docstring; ``arg``: optional ``layer=<L>|all,width=<W>``."""
    config = configs.paper_run("gemma2_9b", "res", (9, 20, 31), arg)
    config.workdir = config.workdir.replace("gemma2_9b", "gemma2_9b_it")
    return config
