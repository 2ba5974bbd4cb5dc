"""Gemma 2 / Gemma 3 in Flax with Gemma Scope sites (res, att, mlp, mlp_in) to read and replace.

    from gemma_scope import model
    lm = model.load("gemma3_270m")
    out = model.forward(lm.params, lm.config, tokens, capture=[Site("res", 6)])
    nll = model.token_nll(lm.params, lm.config, tokens)
"""

from gemma_scope.model.config import Config, config_names, get_config
from gemma_scope.model.forward import Output, forward, frozen_key, init_params, token_nll
from gemma_scope.model.load import LoadedModel, config_of, load

__all__ = ["Config", "LoadedModel", "Output", "config_names", "config_of", "forward", "frozen_key", "get_config",
           "init_params", "load", "token_nll"]
