"""Gemma Scope: residual-stream SAEs of Gemma 2 9B-IT at layers 9, 20 and 31 (widths 16k and 131k as released), on the base runs' text corpus (the paper used the IT model's data)."""

from gemma_scope import configs


def get_config(arg=None):
    """A ``configs.paper_run`` (usage there); ``arg``: optional ``layer=<L>|all,width=<W>``."""
    config = configs.paper_run("gemma2_9b", "res", (9, 20, 31), arg)
    config.workdir = config.workdir.replace("gemma2_9b", "gemma2_9b_it")
    return config
