"""Gemma Scope: residual-stream SAEs of Gemma 2 27B at layers 10, 22 and 34, width 131k (as released), trained together."""

from gemma_scope import configs


def get_config(arg=None):
    """A ``configs.paper_run`` (usage there); ``arg``: optional ``layer=<L>|all,width=<W>``."""
    return configs.paper_run("gemma2_27b", "res", (10, 22, 34), arg, width=2**17)
