"""Train a JumpReLU SAE (or a λ sweep) on activations already cached on disk as float32 ``.npy`` files [N, d].

    python -m gemma_scope.train --config=experiments/from_activations.py \
        --config.data.path=/path/to/npy_dir --config.workdir=/tmp/my_sae \
        --config.sae.width=4096 --config.sae.l0_coefficient=0.001 \
        --config.train.steps=20000 --config.train.batch_size=4096 --config.train.learning_rate=7e-5 --config.seed=0

A sweep: ``--config.sae.l0_coefficient=0.0005,0.001,0.002`` trains all three in one jitted step on one stream.
Target L0s instead of λ: ``--config.sae.sparsity_loss=target_l0 --config.sae.target_l0=50,100`` (λ then defaults to
1, ``configs.DEFAULT_L0_COEFFICIENT``).
The release lands in ``<workdir>/release/<kind>/layer_<L>/width_<W>/average_l0_<K>/params.npz`` (``custom/layer_0``
unless ``--config.data.site=res.12`` names the site). Defaults follow Gemma Scope §3.
"""

import ml_collections

from gemma_scope import configs


def get_config() -> ml_collections.ConfigDict:
    """The from-activations run; every field can be overridden with ``--config.<path>=value``."""
    config = configs.train_config(configs.npy_data())  # --config.data.path=DIR, --config.data.site=res.12
    config.workdir = "/tmp/gemma_scope/from_activations"
    config.sae.width = 4096
    config.train.steps = 20_000
    return config
