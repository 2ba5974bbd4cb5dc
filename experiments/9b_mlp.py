"""Gemma Scope: MLP-output SAEs of Gemma 2 9B (released for all 42 layers at 16k and 131k)."""

from gemma_scope import configs


def get_config(arg=None):
    """A ``configs.paper_run`` (usage there); ``arg``: optional ``layer=<L>|all,width=<W>``."""
    return configs.paper_run("gemma2_9b", "mlp", (20,), arg)
