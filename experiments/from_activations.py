"""Train a JumpReLU SAE (or a λ sweep) on activations already cached on disk as float32 ``.npy`` files [N, d].

    python -m gemma_scope.train --config=experiments/from_activations.py \
        --config.data.path=/path/to/npy_dir --config.workdir=/tmp/my_sae \
        --config.sae.width=4096 --config.sae.l0_coefficient=0.001 \
        --config.train.steps=20000 --config.train.batch_size=4096 --config.train.learning_rate=7e-5 --config.seed=0

A sweep: ``--config.sae.l0_coefficient=0.0005,0.001,0.002`` trains all three in one jitted step on one stream.
The release lands in ``<workdir>/release/<kind>/layer_<L>/width_<W>/average_l0_<K>/params.npz`` (``custom/layer_0``
unless ``--config.data.site=res.12`` names the site). Defaults follow Gemma Scope §3.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The from-activations run; every field can be overridden with ``--config.<path>=value``."""
    config = ml_collections.ConfigDict()
    config.workdir = "/tmp/gemma_scope/from_activations"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.source = "npy"
    config.data.path = ""  # directory of float32 .npy files, each [N, d]
    config.data.site = ""  # e.g. "res.12"; empty: released under custom/layer_0

    config.sae = ml_collections.ConfigDict()
    config.sae.width = 4096
    config.sae.l0_coefficient = (1e-3,)  # λ; several values train a sweep in one step
    config.sae.bandwidth = 0.001  # ε of the pseudo-derivatives
    config.sae.threshold_init = 0.001
    config.sae.dtype = "float32"  # matmul input dtype: "float32" or "bfloat16" (accumulation always float32)

    config.train = ml_collections.ConfigDict()
    config.train.steps = 20_000
    config.train.batch_size = 4096
    config.train.learning_rate = 7e-5
    config.train.lr_warmup_steps = 1_000
    config.train.l0_warmup_steps = 10_000
    config.train.adam_b1 = 0.0
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.checkpoint_every = 1_000
    config.train.keep_checkpoints = 3
    config.train.log_every = 100
    config.train.dead_window_steps = 1_000
    config.train.norm_batches = 8  # batches used to estimate the normalisation constant C
    config.train.eval_batches = 4  # batches after training that measure each SAE's average L0 for the release

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices the model axis leaves
    config.mesh.model = "auto"  # latent-axis (tensor) parallel size; "auto": 1 up to width 2**14, more beyond
    config.mesh.distributed = False  # call jax.distributed.initialize() (multi-host TPU VM slices)
    return config
