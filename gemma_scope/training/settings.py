"""A config (layout: ``configs.train_config``) read for the trainer: checked field by field (``validate_config``),
its sweep resolved (``lambdas_of``, ``sweep_of``: λ defaults to ``configs.DEFAULT_L0_COEFFICIENT`` of the sparsity
loss when not given), the step's ``Hyperparams`` (``hyperparams``) and the recipe recorded with each released SAE
(``recipe_metadata``). ``configs`` stays a leaf; the choice lists checked here belong to ``sae.losses`` and
``training.normalisation``."""

from __future__ import annotations

import math

from gemma_scope import configs
from gemma_scope.sae import losses
from gemma_scope.training import normalisation, step


def _numbers(value) -> tuple:
    """A number or a tuple/list of them as a tuple (a number is a one-value sweep)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _check_sparsity_loss(config) -> None:
    if config.sae.sparsity_loss not in losses.SPARSITY_LOSSES:
        raise ValueError(f"sae.sparsity_loss must be one of {losses.SPARSITY_LOSSES}, got {config.sae.sparsity_loss!r}")


def lambdas_of(config) -> tuple[float, ...]:
    """``config.sae.l0_coefficient`` as a tuple of λ ≥ 0 (a float is a one-value sweep); when it is None (not
    given), the one default λ of ``config.sae.sparsity_loss`` (``configs.DEFAULT_L0_COEFFICIENT``).

    Raises:
      ValueError: empty, non-numeric or negative; or not given with an unknown sparsity loss.
    """
    value = config.sae.l0_coefficient
    if value is None:
        _check_sparsity_loss(config)
        return (configs.DEFAULT_L0_COEFFICIENT[config.sae.sparsity_loss],)
    values = _numbers(value)
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"sae.l0_coefficient must be a number >= 0 or a non-empty tuple of them, got {value!r}")
    return tuple(float(v) for v in values)


def sweep_of(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each site's sweep as ``(λ per SAE, target L0 per SAE)``; the targets are empty unless
    ``sae.sparsity_loss == "target_l0"``, where ``sae.target_l0`` (a number or a tuple) is the sweep and λ is one
    value for all targets or one per target.

    Raises:
      ValueError: bad λ, targets not > 0, or as many λ as neither 1 nor the targets.
    """
    lambdas = lambdas_of(config)
    if config.sae.sparsity_loss != "target_l0":
        return lambdas, ()
    value = config.sae.target_l0
    targets = _numbers(value)
    if not targets or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in targets):
        raise ValueError(f"sae.target_l0 must be a number > 0 or a non-empty tuple of them, got {value!r}")
    if len(lambdas) not in (1, len(targets)):
        raise ValueError(f"sae.l0_coefficient must be one value or one per target L0 ({len(targets)}), got {lambdas}")
    return (lambdas * len(targets) if len(lambdas) == 1 else lambdas), tuple(float(v) for v in targets)


def validate_config(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Checks the fields the trainer reads (layout: ``configs.train_config``); returns the sweep (``sweep_of``), so
    a run parses it once.

    Raises:
      ValueError: naming the field, its value and what is expected.
    """
    _check_sparsity_loss(config)
    if config.sae.b_dec_init not in normalisation.B_DEC_INITS:
        raise ValueError(f"sae.b_dec_init must be one of {normalisation.B_DEC_INITS}, got {config.sae.b_dec_init!r}")
    if config.sae.normalisation not in normalisation.NORMALISATIONS:
        raise ValueError(f"sae.normalisation must be one of {normalisation.NORMALISATIONS}, got {config.sae.normalisation!r}")
    if not (config.sae.frequency_coefficient >= 0 and 0 < config.sae.frequency_threshold <= 1):
        raise ValueError(f"sae.frequency_coefficient must be >= 0 and sae.frequency_threshold in (0, 1], got "
                         f"{config.sae.frequency_coefficient}, {config.sae.frequency_threshold}")
    sweep = sweep_of(config)
    positive = {"sae.width": config.sae.width, "train.steps": config.train.steps,
                "train.batch_size": config.train.batch_size, "train.log_every": config.train.log_every,
                "train.norm_batches": config.train.norm_batches, "train.eval_batches": config.train.eval_batches,
                "train.dead_window_steps": config.train.dead_window_steps}
    for name, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {config.seed!r}")
    for name in ("learning_rate", "adam_eps"):
        value = config.train[name]
        if not value > 0:
            raise ValueError(f"train.{name} must be > 0, got {value!r}")
    for name in ("lr_warmup_steps", "l0_warmup_steps"):
        if config.train[name] < 0:
            raise ValueError(f"train.{name} must be >= 0, got {config.train[name]!r}")
    if not (0 <= config.train.adam_b1 < 1 and 0 <= config.train.adam_b2 < 1):
        raise ValueError(f"train.adam_b1/adam_b2 must lie in [0, 1), got {config.train.adam_b1}, {config.train.adam_b2}")
    if not (config.sae.bandwidth > 0 and config.sae.threshold_init > 0):
        raise ValueError(f"sae.bandwidth and sae.threshold_init must be > 0, got {config.sae.bandwidth}, "
                         f"{config.sae.threshold_init}")
    if config.sae.dtype not in configs.DTYPES:
        raise ValueError(f"sae.dtype must be one of {configs.DTYPES}, got {config.sae.dtype!r}")
    losses.matryoshka_bounds(tuple(config.sae.matryoshka_prefixes), config.sae.width)
    skips = tuple(config.transcoder.skip) if isinstance(config.transcoder.skip, (tuple, list)) else None
    if not skips or not all(isinstance(v, bool) for v in skips) or len(set(skips)) != len(skips):
        raise ValueError(f"transcoder.skip must be (False,), (True,) or (False, True), got {config.transcoder.skip!r}")
    if config.transcoder.layers.strip() and config.data.source != "model":
        raise ValueError(f"transcoder.layers={config.transcoder.layers!r} needs data.source='model' (a transcoder "
                         f"reads mlp_in.L and mlp.L of one LM pass), got data.source={config.data.source!r}")
    _check_crosslayer(config)
    if not config.workdir:
        raise ValueError("workdir must name an output directory")
    return sweep


CLT_L0 = ("per_layer", "total")  # clt.l0: sae.target_l0 is each layer's L0 target, or the sum's


def _check_crosslayer(config) -> None:
    """The ``clt`` and ``crosscoder`` blocks (``configs.train_config``); layer specs are checked against the model
    when the grid is built (``sites.parse_sites``)."""
    skips = tuple(config.clt.skip) if isinstance(config.clt.skip, (tuple, list)) else None
    if not skips or not all(isinstance(v, bool) for v in skips) or len(set(skips)) != len(skips):
        raise ValueError(f"clt.skip must be (False,), (True,) or (False, True), got {config.clt.skip!r}")
    if config.clt.l0 not in CLT_L0:
        raise ValueError(f"clt.l0 must be one of {CLT_L0}, got {config.clt.l0!r}")
    for block in ("clt", "crosscoder"):
        layers, width = config[block].layers, config[block].width
        if not isinstance(layers, str):
            raise ValueError(f"{block}.layers must be a layer spec string such as '*', '0-17' or '5,9,12', got "
                             f"{layers!r}")
        if width is not None and (not isinstance(width, int) or width <= 0):
            raise ValueError(f"{block}.width must be a positive integer (latents{' per layer' * (block == 'clt')}) "
                             f"or None (sae.width), got {width!r}")
        if layers.strip() and config.data.source != "model":
            raise ValueError(f"{block}.layers={layers!r} needs data.source='model' (it reads several layers of one "
                             f"LM pass), got data.source={config.data.source!r}")
        if layers.strip() and tuple(config.sae.matryoshka_prefixes):
            raise ValueError(f"{block}.layers={layers!r} cannot train with sae.matryoshka_prefixes="
                             f"{tuple(config.sae.matryoshka_prefixes)} (no Matryoshka loss for cross-layer "
                             "dictionaries); set sae.matryoshka_prefixes=()")


def hyperparams(config) -> step.Hyperparams:
    """The step's hyperparameters from the config."""
    t = config.train
    return step.Hyperparams(
        learning_rate=t.learning_rate, lr_warmup_steps=t.lr_warmup_steps, l0_warmup_steps=t.l0_warmup_steps,
        adam_b1=t.adam_b1, adam_b2=t.adam_b2, adam_eps=t.adam_eps, bandwidth=config.sae.bandwidth,
        threshold_init=config.sae.threshold_init, compute_dtype=config.sae.dtype,
        dead_window_steps=t.dead_window_steps, sparsity_loss=config.sae.sparsity_loss,
        frequency_coefficient=config.sae.frequency_coefficient, frequency_threshold=config.sae.frequency_threshold,
        matryoshka_prefixes=tuple(config.sae.matryoshka_prefixes))


def recipe_metadata(config) -> dict:
    """The training recipe of a config as JSON-ready release metadata (per-SAE λ and target L0 come on top)."""
    return {"normalisation": config.sae.normalisation, "b_dec_init": config.sae.b_dec_init,
            "sparsity_loss": config.sae.sparsity_loss,
            "frequency_coefficient": float(config.sae.frequency_coefficient),
            "frequency_threshold": float(config.sae.frequency_threshold),
            "matryoshka_prefixes": [int(m) for m in config.sae.matryoshka_prefixes]}
