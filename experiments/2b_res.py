"""Gemma Scope: residual-stream SAEs of Gemma 2 2B (released for all 26 layers, widths 16k and 65k; 1M at layers 5, 12, 19)."""

from gemma_scope import configs


def get_config(arg=None):
    """A ``configs.paper_run`` (usage there); ``arg``: optional ``layer=<L>|all,width=<W>``."""
    return configs.paper_run("gemma2_2b", "res", (12,), arg)
