"""The JumpReLU sparse autoencoder of Gemma Scope as pure functions (arXiv 2408.05147 §2, arXiv 2407.14435).

Params are a dict of float32 arrays ``{"W_enc": [d, M], "b_enc": [M], "W_dec": [M, d], "b_dec": [d],
"threshold": [M]}`` (d = d_model of the site, M = width). A grid of SAEs is the same dict with a leading
axis ``[n, ...]``; use ``jax.vmap`` over these functions.

Two conventions, both row-vector (``x @ W_enc``):

- training (``encode_train`` / ``loss``): the encoder sees ``x - b_dec`` (pre-encoder bias, §3) and ``x`` is the
  normalised activation ``x_raw / C`` with ``E||x||^2 = 1``;
- inference / release (``encode`` / ``decode``): ``pre = x @ W_enc + b_enc; f = (pre > threshold) * relu(pre);
  x_hat = f @ W_dec + b_dec`` on raw activations, after ``fold_normalisation``.

The threshold is raw θ (not log θ: log θ barely moves under Adam, SAELens PR #718) and always float32 (bf16 stalls
it, SAELens PR #728). Matmul inputs may be bfloat16 (``compute_dtype``); accumulation is always float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PARAM_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
DEFAULT_BANDWIDTH = 0.001  # ε of the rectangle kernel; assumes unit mean squared norm inputs (JumpReLU paper §4).
DEFAULT_THRESHOLD = 0.001  # initial θ (Gemma Scope §3).


def _rectangle(u: jax.Array) -> jax.Array:
    """The kernel ``K(u) = 1[-1/2 < u < 1/2]`` of the straight-through estimators (JumpReLU paper Eq. 11)."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast cotangent back to the operand's ``shape`` (e.g. the threshold's ``[M]`` from ``[B, M]``)."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    size_one = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    return g.sum(axis=size_one, keepdims=True) if size_one else g


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, threshold: jax.Array, bandwidth: float = DEFAULT_BANDWIDTH) -> jax.Array:
    """``JumpReLU_θ(z) = z · H(z − θ)`` (Gemma Scope Eq. 3), elementwise, threshold broadcast over leading axes.

    Pseudo-derivatives (JumpReLU paper Eq. 11, rectangle kernel K, bandwidth ε):
    ``∂/∂z = H(z − θ)``, ``∂/∂θ = −(θ/ε) · K((z − θ)/ε)``.

    Args:
      z: float32 pre-activations ``[..., M]``.
      threshold: float32 ``[M]``.
      bandwidth: ε > 0 (static).
    """
    return z * (z > threshold).astype(z.dtype)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    z, threshold = res
    dz = g * (z > threshold).astype(g.dtype)
    dtheta = -(threshold / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return dz, _sum_to_shape(dtheta, threshold.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z: jax.Array, threshold: jax.Array, bandwidth: float = DEFAULT_BANDWIDTH) -> jax.Array:
    """Heaviside step ``H(z − θ)`` as float (the L0 term's counter, Gemma Scope Eq. 4).

    Pseudo-derivatives (JumpReLU paper Eq. 12): ``∂/∂z = 0`` (the L0 term trains θ only),
    ``∂/∂θ = −(1/ε) · K((z − θ)/ε)``.

    Args:
      z: float32 pre-activations ``[..., M]``.
      threshold: float32 ``[M]``.
      bandwidth: ε > 0 (static).
    """
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step(z, threshold, bandwidth), (z, threshold)


def _step_bwd(bandwidth, res, g):
    z, threshold = res
    dtheta = -(1.0 / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return jnp.zeros_like(z), _sum_to_shape(dtheta, threshold.shape)


step.defvjp(_step_fwd, _step_bwd)


def init_params(key: jax.Array, d_model: int, width: int, threshold: float = DEFAULT_THRESHOLD) -> dict[str, jax.Array]:
    """Gemma Scope initialisation (§3): W_dec He-uniform with unit-norm rows, W_enc = W_decᵀ, θ constant, zero biases.

    Args:
      key: PRNG key.
      d_model: input width d.
      width: number of latents M.
      threshold: initial θ (0.001 in the paper).

    Returns:
      float32 params (module docstring).

    Raises:
      ValueError: non-positive sizes or threshold.
    """
    if d_model <= 0 or width <= 0:
        raise ValueError(f"SAE sizes must be positive, got d_model={d_model}, width={width}")
    if not threshold > 0:
        raise ValueError(f"initial threshold must be > 0, got {threshold}")
    w_dec = jax.nn.initializers.he_uniform(in_axis=0, out_axis=1)(key, (width, d_model), jnp.float32)
    w_dec = normalise_decoder(w_dec)
    return {
        "W_enc": w_dec.T,
        "b_enc": jnp.zeros((width,), jnp.float32),
        "W_dec": w_dec,
        "b_dec": jnp.zeros((d_model,), jnp.float32),
        "threshold": jnp.full((width,), threshold, jnp.float32),
    }


def _matmul(a: jax.Array, b: jax.Array, compute_dtype) -> jax.Array:
    """``a @ b`` with inputs cast to ``compute_dtype`` and float32 accumulation/output."""
    return jnp.matmul(a.astype(compute_dtype), b.astype(compute_dtype), preferred_element_type=jnp.float32)


def pre_activations_train(params: dict, x: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
    """Training pre-activations ``(x − b_dec) @ W_enc + b_enc`` (pre-encoder bias, §3), float32 ``[B, M]``.

    Computed as ``x @ W_enc − b_dec @ W_enc + b_enc``: the gradient of ``b_dec`` then needs only a
    vector–matrix product instead of a second ``[B, M] × [M, d]`` matmul in the backward pass.

    Args:
      params: single-SAE params.
      x: normalised activations ``[B, d]``.
      compute_dtype: matmul input dtype (float32 or bfloat16).
    """
    return _matmul(x, params["W_enc"], compute_dtype) - params["b_dec"] @ params["W_enc"] + params["b_enc"]


def decode(params: dict, f: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
    """Reconstruction ``x̂ = f @ W_dec + b_dec`` (Gemma Scope Eq. 2), float32 ``[B, d]`` from latents ``[B, M]``."""
    return _matmul(f, params["W_dec"], compute_dtype) + params["b_dec"]


def encode(params: dict, x: jax.Array) -> jax.Array:
    """Release/inference encoder: ``pre = x @ W_enc + b_enc; f = (pre > threshold) * relu(pre)``.

    Args:
      params: folded params (``fold_normalisation``), float32.
      x: raw activations ``[B, d]``.

    Returns:
      float32 latents ``[B, M]``.
    """
    pre = x.astype(jnp.float32) @ params["W_enc"] + params["b_enc"]
    return (pre > params["threshold"]) * jax.nn.relu(pre)


def loss(
    params: dict,
    x: jax.Array,
    l0_coefficient: jax.Array | float,
    bandwidth: float = DEFAULT_BANDWIDTH,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Gemma Scope loss (Eq. 4): ``mean_batch ||x − x̂||² + λ · mean_batch Σ_i H(z_i − θ_i)``.

    The L0 term is taken on the pre-activations z through ``step`` (trains θ only); the reconstruction goes
    through ``jumprelu``.

    Args:
      params: single-SAE params (training convention).
      x: normalised activations ``[B, d]`` (float32 or bfloat16).
      l0_coefficient: λ ≥ 0, scalar (may be traced).
      bandwidth: ε (static).
      compute_dtype: matmul input dtype.

    Returns:
      ``(loss, aux)``: scalar float32 loss; aux float32 scalars ``mse`` (mean squared error summed over d),
      ``fvu`` (squared error / squared distance to the batch mean), ``l0`` (mean active latents), and
      ``fired`` bool ``[M]`` (latent active on some token of the batch).
    """
    z = pre_activations_train(params, x, compute_dtype)
    f = jumprelu(z, params["threshold"], bandwidth)
    x_hat = decode(params, f, compute_dtype)
    x = x.astype(jnp.float32)
    sq_err = jnp.sum((x - x_hat) ** 2, axis=-1)
    mse = jnp.mean(sq_err)
    l0 = jnp.mean(jnp.sum(step(z, params["threshold"], bandwidth), axis=-1))
    total = mse + l0_coefficient * l0
    variance = jnp.mean(jnp.sum((x - x.mean(axis=0)) ** 2, axis=-1))
    aux = {"mse": mse, "fvu": mse / variance, "l0": l0, "fired": jnp.any(f != 0, axis=0)}
    return total, aux


def remove_parallel_component(w_dec: jax.Array, grad: jax.Array) -> jax.Array:
    """Removes from each decoder row's gradient its component along the (unit-norm) row (Gemma Scope §3).

    ``g_i ← g_i − (g_i · w_i) w_i`` for rows ``w_i`` of ``W_dec [M, d]``; shapes ``[..., M, d]``.
    """
    return grad - jnp.sum(grad * w_dec, axis=-1, keepdims=True) * w_dec


def normalise_decoder(w_dec: jax.Array) -> jax.Array:
    """Rescales each row of ``W_dec [..., M, d]`` to unit L2 norm (Gemma Scope §3)."""
    return w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)


def fold_normalisation(params: dict, scale: float | jax.Array) -> dict:
    """Exports trained params to the release convention on raw activations (Gemma Scope §3, release format).

    Training sees ``x = x_raw / C`` and ``x − b_dec``. Folded: ``b_enc' = C·(b_enc − b_dec @ W_enc)``,
    ``θ' = C·θ``, ``b_dec' = C·b_dec``, W_enc and W_dec unchanged; then ``encode(folded, x_raw) = C · f`` and
    ``decode(folded, ·)`` gives ``C · x̂`` of the trained SAE on ``x_raw / C``.

    Args:
      params: single-SAE trained params, float32.
      scale: the normalisation constant C > 0 (scalar).

    Returns:
      float32 params in the release convention.
    """
    scale = jnp.asarray(scale, jnp.float32)
    return {
        "W_enc": params["W_enc"],
        "b_enc": scale * (params["b_enc"] - params["b_dec"] @ params["W_enc"]),
        "W_dec": params["W_dec"],
        "b_dec": scale * params["b_dec"],
        "threshold": scale * params["threshold"],
    }
