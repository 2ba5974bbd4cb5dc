"""Gemma Scope: MLP-output SAEs of Gemma 2 2B (after post_ffw_norm; released for all 26 layers at 16k and 65k)."""

from gemma_scope import configs


def get_config(arg=None):
    """A ``configs.paper_run`` (usage there); ``arg``: optional ``layer=<L>|all,width=<W>``."""
    return configs.paper_run("gemma2_2b", "mlp", (12,), arg)
