"""The jitted train step of a grid of JumpReLU SAEs and transcoders, sharded on a ('data', 'model') mesh (Gemma
Scope §3, §3.3).

The step trains the stacks of a grid (``grid.Stack``: ``n_sites`` sites of equal width d times the λ values or
target L0s of a sweep, params stacked ``[n, ...]`` site-major). One activation batch per step,
``{stack: float32/bfloat16 [n_sites, B, d]}``, feeds every SAE of its stack; a transcoder stack's batch is the pair
``(x, y)`` of such arrays (``mlp_in.L`` read, ``mlp.L`` predicted), and all its transcoders have an affine skip or
none do (``Stack.skip``).

A cross-layer stack (``Stack.crosslayer``) holds one CLT or crosscoder per sweep entry, each over all the stack's
sites (``sae.crosslayer``'s layout behind the sweep axis: a CLT's ``W_dec [n, n_sites, F, n_sites, d]``), trained
with ``sae.crosslayer_train``'s loss, its decoder constraint per latent over the latent's target layers.

Sharding: the batch axis is split over ``'data'``; the latent axis M (F) of ``W_enc``, ``b_enc``, ``W_dec``,
``threshold`` (and their Adam moments) over ``'model'`` — a ``model`` axis of size 1 is pure data parallelism
(narrow SAEs), larger sizes are latent-axis tensor parallelism (wide SAEs; only small all-reduces, §3.3).

Train state (a pytree of arrays, checkpointed whole)::

    {"step": int32 [], "params": {stack: stacked params}, "opt_state": optimizer state (``optimizer.make_optimizer``),
     "last_fired": {stack: int32 [n, M]}  # step at which each latent last fired (dead-latent window); a CLT
                                          # stack's [n, n_sites, F]
     "norm_scale": {stack: float32 [n_sites, d]}  # C of each site and dimension, x = x_raw / C (passed
                                                  # through); [n_sites, 2, d] (input, output) for transcoders
     "nonfinite_step": int32 []}  # first step whose loss was NaN/Inf, -1 if none

Checkpoints record the state's format (``STATE_FORMAT``): 1, the optimizer state as a dict (before optax);
2, optax's state. Cross-layer stacks did not change the format: they are further stacks under the same keys, whose
shapes follow from the config (as a new site's do), and the state of a config without them is unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_scope import configs, sae
from gemma_scope.mesh import batch_sharding
from gemma_scope.sae import crosslayer_train, losses
from gemma_scope.training import optimizer
from gemma_scope.training.grid import Stack

STATE_FORMAT = 2  # module docstring; ``restore_state`` reads this and every older format

# The latent axis of each stacked param that has one, from the end (W_enc [..., d, M], W_dec [..., M, d] of an SAE,
# [..., F, n, d] of a CLT or crosscoder: rank 3 is an SAE stack's); it goes on 'model', every other axis (the
# leading stack axis, b_dec, W_skip [d, d]) is not split.
_LATENT_AXIS = {"W_enc": lambda ndim: -1, "b_enc": lambda ndim: -1, "threshold": lambda ndim: -1,
                "W_dec": lambda ndim: -2 if ndim == 3 else -3}


# The recipe's defaults, written once in configs.train_config (any data block: only sae and train are read).
_RECIPE = configs.train_config(configs.npy_data())


@dataclasses.dataclass(frozen=True)
class Hyperparams:
    """Training hyperparameters; the defaults are ``configs.train_config``'s (Gemma Scope §3; ``compute_dtype``
    the matmul input dtype)."""

    learning_rate: float = _RECIPE.train.learning_rate
    lr_warmup_steps: int = _RECIPE.train.lr_warmup_steps  # cosine warmup 0.1·η → η
    l0_warmup_steps: int = _RECIPE.train.l0_warmup_steps  # linear warmup 0 → λ
    adam_b1: float = _RECIPE.train.adam_b1
    adam_b2: float = _RECIPE.train.adam_b2
    adam_eps: float = _RECIPE.train.adam_eps
    bandwidth: float = _RECIPE.sae.bandwidth
    threshold_init: float = _RECIPE.sae.threshold_init
    compute_dtype: str = _RECIPE.sae.dtype
    # A latent is dead if it fired on no token in this many steps.
    dead_window_steps: int = _RECIPE.train.dead_window_steps
    # The sparsity recipe (``losses.loss``): "l0" is Gemma Scope's λ·L0, "target_l0" the quadratic pull towards each
    # SAE's target L0; the frequency penalty and the Matryoshka prefixes are off by default.
    sparsity_loss: str = _RECIPE.sae.sparsity_loss
    frequency_coefficient: float = _RECIPE.sae.frequency_coefficient
    frequency_threshold: float = _RECIPE.sae.frequency_threshold
    matryoshka_prefixes: tuple[int, ...] = _RECIPE.sae.matryoshka_prefixes


def l0_scale(step, hp: Hyperparams):
    """λ(step) / λ: linear warmup from 0 to 1 over ``l0_warmup_steps`` (Gemma Scope §3); it scales every
    sparsity coefficient (λ of either sparsity loss and the frequency penalty's). It weights the loss, not the
    update, so it lives here with the loss rather than in ``optimizer``."""
    if hp.l0_warmup_steps <= 0:
        return jnp.asarray(1.0, jnp.float32)
    return jnp.minimum(step.astype(jnp.float32) / hp.l0_warmup_steps, 1.0)


def _spec(path, leaf) -> P:
    """Partition spec of a state leaf: params and their Adam moments by key, last_fired on M, the rest replicated."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    ndim = getattr(leaf, "ndim", 0)
    if keys and keys[0] == "last_fired":
        axis = ndim - 1
    elif keys and keys[-1] in _LATENT_AXIS and ndim >= 2:
        axis = ndim + _LATENT_AXIS[keys[-1]](ndim)
    else:
        return P()
    return P(*(("model" if a == axis else None) for a in range(ndim)))


def state_shardings(state, mesh: jax.sharding.Mesh):
    """NamedShardings for a train state (or its abstract ``jax.eval_shape`` form) on ``mesh``."""
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, _spec(p, x)), state)


def _build_state(key: jax.Array, stacks: dict[str, Stack], hp: Hyperparams, norm_scale: dict,
                 b_dec: dict | None) -> dict:
    """The fresh, unsharded train state (module docstring); every SAE gets its own init key."""
    params = {}
    for k, (g, grp) in zip(jax.random.split(key, len(stacks)), sorted(stacks.items())):
        params[g] = jax.vmap(lambda kk, grp=grp: _init_one(kk, grp, hp))(jax.random.split(k, grp.n))
        if b_dec is not None:
            params[g]["b_dec"] = jnp.asarray(b_dec[g], jnp.float32)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.make_optimizer(hp).init(params),
        "last_fired": {g: jnp.zeros((grp.n, *((grp.n_sites,) if grp.crosslayer == "clt" else ()), grp.width),
                                    jnp.int32) for g, grp in stacks.items()},
        "norm_scale": {g: jnp.asarray(norm_scale[g], jnp.float32) for g in stacks},
        "nonfinite_step": jnp.full((), -1, jnp.int32),
    }


def _init_one(key: jax.Array, grp: Stack, hp: Hyperparams) -> dict:
    """One SAE, transcoder, CLT or crosscoder of stack ``grp``, freshly initialised."""
    if grp.crosslayer == "clt":
        return crosslayer_train.init_clt(key, grp.n_sites, grp.d_model, grp.width, hp.threshold_init, grp.skip)
    if grp.crosslayer == "crosscoder":
        return crosslayer_train.init_crosscoder(key, grp.n_sites, grp.d_model, grp.width, hp.threshold_init)
    return sae.init_params(key, grp.d_model, grp.width, hp.threshold_init, grp.skip)


def init_state(key: jax.Array, stacks: dict[str, Stack], hp: Hyperparams, mesh: jax.sharding.Mesh,
               norm_scale: dict[str, np.ndarray] | None = None, b_dec: dict[str, np.ndarray] | None = None) -> dict:
    """A fresh train state (module docstring) laid out on ``mesh``.

    Args:
      key: PRNG key of the initialisation (``sae.init_params`` per SAE).
      stacks: ``{stack name: Stack}`` (``grid.Grid.stacks``).
      norm_scale: ``{stack: float32 [n_sites, d]}`` normalisation constants C (``[n_sites, 2, d]``, input and
        output, for a transcoder stack; ``grid.Grid.constants``); ones if None.
      b_dec: ``{stack: float32 [n, d]}`` initial b_dec in normalised units (``grid.Grid.constants``); zero
        (``sae.init_params``) if None.
    """
    norm_scale = norm_scale or _unit_scales(stacks)
    build = lambda k: _build_state(k, stacks, hp, norm_scale, b_dec)  # noqa: E731
    shardings = state_shardings(jax.eval_shape(build, key), mesh)
    return jax.jit(build, out_shardings=shardings)(key)


def _unit_scales(stacks: dict[str, Stack]) -> dict[str, np.ndarray]:
    return {g: np.ones((grp.n_sites, 2, grp.d_model) if grp.transcoder else (grp.n_sites, grp.d_model), np.float32)
            for g, grp in stacks.items()}


def abstract_state(stacks: dict[str, Stack], hp: Hyperparams, mesh: jax.sharding.Mesh) -> dict:
    """The state's ``jax.ShapeDtypeStruct`` tree with shardings: the restore target of a checkpoint."""
    ones = _unit_scales(stacks)
    tree = jax.eval_shape(lambda k: _build_state(k, stacks, hp, ones, None), jax.random.key(0))
    shardings = state_shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_state(checkpointer, step: int, stacks: dict[str, Stack], hp: Hyperparams, mesh: jax.sharding.Mesh) -> dict:
    """The train state saved at ``step`` by ``checkpointer`` (a ``checkpoint.Checkpointer``), laid out on ``mesh``
    as ``init_state`` lays it out; a state-format-1 checkpoint's optimizer state is converted (the same numbers).

    Raises:
      ValueError: the checkpoint's state format is neither 1 nor ``STATE_FORMAT`` (the message names it).
    """
    target = abstract_state(stacks, hp, mesh)
    found = checkpointer.state_format(step)
    if found == 1:
        old = checkpointer.restore(step, dict(target, opt_state=optimizer.format_1_layout(target["opt_state"])))
        return dict(old, opt_state=optimizer.from_format_1(old["opt_state"], target["opt_state"]))
    if found != STATE_FORMAT:
        raise ValueError(f"checkpoint step {step} has train-state format {found}; this version reads formats 1 to "
                         f"{STATE_FORMAT}")
    return checkpointer.restore(step, target)


def _stack_loss(params: dict, x: jax.Array, y: jax.Array | None, sparsity_scale: jax.Array, grp: Stack,
                hp: Hyperparams):
    """Sum of the stack's SAE losses and their per-SAE aux; params ``[n, ...]``, x ``[n_sites, B, d]``, y the
    transcoders' targets like x (None for SAEs); ``sparsity_scale`` the warmup factor of every sparsity
    coefficient (``l0_scale``)."""
    if grp.crosslayer:
        return _crosslayer_loss(params, x, y, sparsity_scale, grp, hp)
    n_l = len(grp.l0_coefficients)
    by_site = jax.tree.map(lambda a: a.reshape(grp.n_sites, n_l, *a.shape[1:]), params)
    lambdas = sparsity_scale * jnp.asarray(grp.l0_coefficients, jnp.float32)
    targets = jnp.asarray(grp.target_l0s or (1.0,) * n_l, jnp.float32)

    def one(p, xs, ys, lam, target):
        return losses.loss(p, xs, lam, hp.bandwidth, jnp.dtype(hp.compute_dtype), sparsity_loss=hp.sparsity_loss,
                           target_l0=target, frequency_coefficient=sparsity_scale * hp.frequency_coefficient,
                           frequency_threshold=hp.frequency_threshold, matryoshka_prefixes=hp.matryoshka_prefixes,
                           y=ys)

    # Inner vmap: the sweep shares its site's batch; outer vmap: one batch per site.
    sae_losses, aux = jax.vmap(jax.vmap(one, in_axes=(0, None, None, 0, 0)), in_axes=(0, 0, 0, None, None))(
        by_site, x, y, lambdas, targets)
    flat = lambda a: a.reshape(grp.n, *a.shape[2:])  # noqa: E731
    return sae_losses.sum(), (flat(sae_losses), jax.tree.map(flat, aux))


def _crosslayer_loss(params: dict, x: jax.Array, y: jax.Array | None, sparsity_scale: jax.Array, grp: Stack,
                     hp: Hyperparams):
    """``_stack_loss`` of a cross-layer stack: one CLT or crosscoder per sweep entry, all reading the whole batch
    ``x`` (``y``) ``[n_sites, B, d]``."""
    lambdas = sparsity_scale * jnp.asarray(grp.l0_coefficients, jnp.float32)
    targets = jnp.asarray(grp.target_l0s or (1.0,) * grp.n, jnp.float32)
    kw = dict(sparsity_loss=hp.sparsity_loss, frequency_coefficient=sparsity_scale * hp.frequency_coefficient,
              frequency_threshold=hp.frequency_threshold)
    dtype = jnp.dtype(hp.compute_dtype)

    def one(p, lam, target):
        if grp.crosslayer == "clt":
            return crosslayer_train.clt_loss(p, x, y, lam, hp.bandwidth, dtype, target_l0=target,
                                             l0_per_layer=grp.l0_per_layer, **kw)
        return crosslayer_train.crosscoder_loss(p, x, lam, hp.bandwidth, dtype, target_l0=target, **kw)

    dict_losses, aux = jax.vmap(one)(params, lambdas, targets)
    return dict_losses.sum(), (dict_losses, aux)


def _normalised(batch, scale: jax.Array, transcoder: bool) -> tuple[jax.Array, jax.Array | None]:
    """``(x / C, None)`` for SAEs, ``(x / C_in, y / C_out)`` for transcoders; float32 ``[n_sites, B, d]``."""
    if not transcoder:
        return batch.astype(jnp.float32) / scale[:, None, :], None
    x, y = batch
    return x.astype(jnp.float32) / scale[:, 0, None, :], y.astype(jnp.float32) / scale[:, 1, None, :]


def train_step(state: dict, batch: dict[str, jax.Array], stacks: dict[str, Stack], hp: Hyperparams):
    """One Gemma Scope training step for every SAE of the grid (§3); pure, jit it (see ``make_train_step``).

    Forward, loss (``losses.loss``: Eq. 4 with λ warmup, or the sparsity terms ``hp.sparsity_loss`` etc. select),
    backward through the JumpReLU/step pseudo-derivatives, removal of the decoder gradient's parallel component,
    the optimizer (``optimizer.make_optimizer``), unit-norm decoder rows, θ clamped at ≥ 0 (JumpReLU needs θ ≥ 0;
    the release convention applies relu).

    Args:
      state: train state (module docstring).
      batch: ``{stack: [n_sites, B, d]}`` raw activations, a pair ``(x, y)`` of them for a transcoder stack
        (divided by ``state["norm_scale"]`` here; ``grid.Grid.batches``).
      stacks: ``{stack name: Stack}``.

    Returns:
      ``(new_state, metrics)``: metrics ``{stack: {"loss", "mse", "fvu", "l0", "dead_fraction": float32 [n]}}``
      (a cross-layer stack's ``mse`` and ``l0`` summed over layers, ``fvu`` their squared error over their variance,
      plus ``"fvu_layers"`` and a CLT's ``"l0_layers"`` ``[n, n_sites]``) plus ``"learning_rate"`` and
      ``"l0_scale"`` (λ now / λ) scalars of this step.
    """
    step = state["step"]
    scale = l0_scale(step, hp)
    # Unit mean squared norm inputs (§3): x = x_raw / C, C per site (a transcoder's input and target each their own).
    batch = {g: _normalised(batch[g], state["norm_scale"][g], grp.transcoder) for g, grp in stacks.items()}

    def total_loss(params):
        out = {g: _stack_loss(params[g], *batch[g], scale, grp, hp) for g, grp in stacks.items()}
        return sum(v[0] for v in out.values()), {g: v[1] for g, v in out.items()}

    grads, per_stack = jax.grad(total_loss, has_aux=True)(state["params"])
    # One unit-norm decoder per latent: an SAE's row, a cross-layer latent's rows over its target layers.
    lib = {g: crosslayer_train if grp.crosslayer else sae for g, grp in stacks.items()}
    grads = {g: dict(gr, W_dec=lib[g].remove_parallel_component(state["params"][g]["W_dec"], gr["W_dec"]))
             for g, gr in grads.items()}
    updates, opt_state = optimizer.make_optimizer(hp).update(grads, state["opt_state"])
    params = optax.apply_updates(state["params"], updates)
    params = {g: dict(p, W_dec=lib[g].normalise_decoder(p["W_dec"]), threshold=jnp.maximum(p["threshold"], 0.0))
              for g, p in params.items()}

    metrics, last_fired, finite = {}, {}, jnp.array(True)
    for g, (sae_losses, aux) in per_stack.items():
        last_fired[g] = jnp.where(aux["fired"], step, state["last_fired"][g])
        dead = (step - last_fired[g]) >= hp.dead_window_steps
        metrics[g] = {"loss": sae_losses, "mse": aux["mse"], "fvu": aux["fvu"], "l0": aux["l0"],
                      "dead_fraction": dead.reshape(dead.shape[0], -1).mean(axis=-1),
                      **{k: aux[k] for k in ("l0_layers", "fvu_layers") if k in aux}}
        finite &= jnp.isfinite(sae_losses).all()
    metrics["learning_rate"] = optimizer.learning_rate_schedule(hp)(step)
    metrics["l0_scale"] = scale
    nonfinite_step = jnp.where((state["nonfinite_step"] < 0) & ~finite, step, state["nonfinite_step"])
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state, last_fired=last_fired,
                     nonfinite_step=nonfinite_step)
    return new_state, metrics


def make_train_step(stacks: dict[str, Stack], hp: Hyperparams, mesh: jax.sharding.Mesh):
    """``jax.jit``-ed ``train_step`` with the mesh's shardings; the state argument is donated.

    Returns:
      ``step_fn(state, batch) -> (state, metrics)``; batch arrays ``[n_sites, B, d]`` with B divisible by the
      mesh's data size.
    """
    shardings = state_shardings(abstract_state(stacks, hp, mesh), mesh)
    batch = {g: batch_sharding(mesh) for g in stacks}
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        lambda s, b: train_step(s, b, stacks, hp),
        in_shardings=(shardings, batch),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )

