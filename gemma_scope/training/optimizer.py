"""The train step's optimizer: Adam on Gemma Scope's learning-rate schedule, as an optax transformation (§3).

Gemma Scope trains with Adam, β1 = 0, β2 = 0.999, ε = 1e-8, and a cosine warmup of the learning rate from 0.1·η
to η. The decoder-gradient projection before the update, and the decoder renormalisation and θ ≥ 0 clamp after
it, are the step's (``step.train_step``), not the optimizer's.

Checkpoints written before the optimizer was optax's (state format 1, ``step.STATE_FORMAT``) hold the same
numbers in a dict, ``{"count": int32 [], "nu": second moments[, "mu": first moments]}``; ``format_1_layout`` and
``from_format_1`` restore them.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def learning_rate_schedule(hp) -> optax.Schedule:
    """η(t) for ``hp`` (a ``step.Hyperparams``): cosine warmup from 0.1·η to η over ``lr_warmup_steps`` updates,
    then η (Gemma Scope §3); t counts the updates already applied (0 at the first step). float32 []."""

    def schedule(count):
        frac = jnp.minimum(count / max(hp.lr_warmup_steps, 1), 1.0)
        return hp.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 - jnp.cos(jnp.pi * frac)))

    return schedule if hp.lr_warmup_steps > 0 else (lambda count: jnp.asarray(hp.learning_rate, jnp.float32))


def make_optimizer(hp) -> optax.GradientTransformation:
    """Adam (Kingma & Ba 2015, Alg. 1) on ``learning_rate_schedule(hp)`` with ``hp.adam_b1``, ``adam_b2``,
    ``adam_eps``; updates are to be added to the params (``optax.apply_updates``).

    ``m ← β1·m + (1 − β1)·g``, ``v ← β2·v + (1 − β2)·g²`` from ``m = v = 0``, update
    ``−η(t)·m̂ / (√v̂ + ε)`` with ``m̂ = m / (1 − β1^(t+1))``, ``v̂ = v / (1 − β2^(t+1))``, t the updates applied
    before this one. With Gemma Scope's β1 = 0, ``m̂ = g``: ``optax.scale_by_rms`` with bias correction and ε
    outside the root is that Adam without storing a first moment; otherwise ``optax.scale_by_adam``.

    State: ``(moments, optax.ScaleByScheduleState(count))`` with ``moments`` an
    ``optax.ScaleByRmsWithCountState(count, nu)`` (β1 = 0) or ``optax.ScaleByAdamState(count, mu, nu)``; ``nu``
    and ``mu`` have the params' tree, shapes and dtypes, both counts are int32 [] and equal the updates applied.
    """
    if hp.adam_b1 == 0:
        moments = optax.scale_by_rms(decay=hp.adam_b2, eps=hp.adam_eps, eps_in_sqrt=False, bias_correction=True)
    else:
        moments = optax.scale_by_adam(b1=hp.adam_b1, b2=hp.adam_b2, eps=hp.adam_eps)
    return optax.chain(moments, optax.scale_by_learning_rate(learning_rate_schedule(hp)))


def format_1_layout(opt_state):
    """``{"count": int32 [], "nu": second moments[, "mu": first moments]}`` of ``opt_state`` (a ``make_optimizer``
    state, or its ``jax.ShapeDtypeStruct`` tree): the dict the hand-written Adam kept, state format 1, and so the
    restore target of an old checkpoint's optimizer state."""
    return opt_state[0]._asdict()  # the hand-written Adam named its fields as optax does


def from_format_1(old: dict, opt_state):
    """The ``make_optimizer`` state holding ``old``'s numbers (a state-format-1 optimizer state restored onto
    ``format_1_layout(opt_state)``); ``opt_state`` gives the structure (arrays or ``jax.ShapeDtypeStruct``)."""
    moments, schedule = opt_state
    # Two arrays: the step donates its state, and one buffer cannot be donated twice.
    return moments._replace(**old), schedule._replace(count=jnp.copy(old["count"]))
