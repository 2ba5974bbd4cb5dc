"""The dictionaries as pure functions: the JumpReLU SAE and transcoder (``autoencoder``) and their training loss
(``losses``). No I/O, no sharding, no config objects; ``jax.vmap`` them over a grid."""

from gemma_scope.sae.autoencoder import (
    DEFAULT_BANDWIDTH,
    DEFAULT_THRESHOLD,
    PARAM_KEYS,
    decode,
    encode,
    fold_normalisation,
    init_params,
    jumprelu,
    matmul,
    normalise_decoder,
    pre_activations_train,
    predict,
    reconstruction_and_l0,
    remove_parallel_component,
    step,
)
from gemma_scope.sae.losses import (
    DEFAULT_FREQUENCY_THRESHOLD,
    SPARSITY_LOSSES,
    loss,
    matryoshka_bounds,
    sparsity_penalty,
)
