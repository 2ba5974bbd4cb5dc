"""The JumpReLU sparse autoencoder of Gemma Scope, and its transcoder, as pure functions (arXiv 2408.05147 §2,
arXiv 2407.14435; transcoders: arXiv 2406.11944, Gemma Scope 2).

Params are a dict of float32 arrays ``{"W_enc": [d, M], "b_enc": [M], "W_dec": [M, d], "b_dec": [d],
"threshold": [M]}`` (d = d_model of the site, M = width). A grid of SAEs is the same dict with a leading
axis ``[n, ...]``; use ``jax.vmap`` over these functions.

A transcoder has the same params (plus ``W_skip [d, d]``, the affine skip connection, when it has one) but reads
one activation x (``mlp_in``) and predicts another, y (``mlp``): ``ŷ = JumpReLU(x @ W_enc + b_enc) @ W_dec + b_dec
(+ x @ W_skip)``. It has no pre-encoder bias (b_dec lives in y's space, not x's): wherever an SAE subtracts b_dec
from its input, a transcoder does not.

Two conventions, both row-vector (``x @ W_enc``):

- training (``pre_activations_train`` / ``reconstruction_and_l0``; the loss is ``losses.loss``): the encoder
  sees ``x - b_dec`` (pre-encoder bias, §3) and ``x`` is the normalised activation ``x_raw / C`` with
  ``E||x||^2 = 1``;
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


def init_params(key: jax.Array, d_model: int, width: int, threshold: float = DEFAULT_THRESHOLD,
                skip: bool = False) -> dict[str, jax.Array]:
    """Gemma Scope initialisation (§3): W_dec He-uniform with unit-norm rows, W_enc = W_decᵀ, θ constant, zero biases.

    Args:
      key: PRNG key.
      d_model: input width d.
      width: number of latents M.
      threshold: initial θ (0.001 in the paper).
      skip: add a transcoder's affine skip ``W_skip [d, d]``, zero (training starts from the plain transcoder).

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
        **({"W_skip": jnp.zeros((d_model, d_model), jnp.float32)} if skip else {}),
    }


def matmul(a: jax.Array, b: jax.Array, compute_dtype) -> jax.Array:
    """``a @ b`` with inputs cast to ``compute_dtype`` and float32 accumulation/output."""
    return jnp.matmul(a.astype(compute_dtype), b.astype(compute_dtype), preferred_element_type=jnp.float32)


def pre_activations_train(params: dict, x: jax.Array, compute_dtype=jnp.float32, transcoder: bool = False) -> jax.Array:
    """Training pre-activations ``(x − b_dec) @ W_enc + b_enc`` (pre-encoder bias, §3), float32 ``[B, M]``;
    a transcoder's are ``x @ W_enc + b_enc``.

    Computed as ``x @ W_enc − b_dec @ W_enc + b_enc``: the gradient of ``b_dec`` then needs only a
    vector–matrix product instead of a second ``[B, M] × [M, d]`` matmul in the backward pass.

    Args:
      params: single-SAE params.
      x: normalised activations ``[B, d]``.
      compute_dtype: matmul input dtype (float32 or bfloat16).
      transcoder: no pre-encoder bias.
    """
    return matmul(x, params["W_enc"], compute_dtype) + _encoder_bias(params, transcoder)


def _encoder_bias(params: dict, transcoder: bool) -> jax.Array:
    """``b_enc − b_dec @ W_enc`` (the pre-encoder bias folded into the encoder's, §3); ``b_enc`` for a transcoder."""
    return params["b_enc"] if transcoder else params["b_enc"] - params["b_dec"] @ params["W_enc"]


def decode(params: dict, f: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
    """Reconstruction ``x̂ = f @ W_dec + b_dec`` (Gemma Scope Eq. 2), float32 ``[B, d]`` from latents ``[B, M]``."""
    return matmul(f, params["W_dec"], compute_dtype) + params["b_dec"]


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


def predict(params: dict, x: jax.Array) -> jax.Array:
    """Release/inference output on raw input ``x [B, d_in]``: ``decode(encode(x))``, plus ``x @ W_skip`` for a
    transcoder with an affine skip connection (Gemma Scope 2); float32 ``[B, d_out]``."""
    out = decode(params, encode(params, x))
    return out + x.astype(jnp.float32) @ params["W_skip"] if "W_skip" in params else out


def _transposed(a: jax.Array, compute_dtype) -> jax.Array:
    """``a.T`` in ``compute_dtype`` as a row-major copy, to be a matmul's left operand.

    XLA's CPU backend lays a bare transpose out column-major, and its YNNPACK dot takes no column-major left
    operand: it would upcast both operands of a bfloat16 matmul to float32 and run it in float32, with a float32
    copy of the large one (or fail: "Unsupported element type for DotThunk"). Two reversals hide the transpose from
    that early check and cancel later, leaving one row-major copy (only ever of a small operand: ``x`` or the
    reconstruction gradient).
    """
    a_t = jnp.swapaxes(a.astype(compute_dtype), -1, -2)
    return jnp.flip(jnp.flip(a_t, -1), -1)


def _dot(a: jax.Array, b: jax.Array, b_contracting: int, compute_dtype) -> jax.Array:
    """``a [m, k]`` times ``b [k, n]`` (``b_contracting=0``) or ``b [n, k]`` (``1``), float32 ``[m, n]``.

    Inputs in ``compute_dtype``, float32 accumulation. ``a`` always contracts its last (row-major) axis, the one
    layout XLA's CPU backend runs at full speed; never transpose the result either (XLA would fold the
    transpose back into the operands).
    """
    dims = (((a.ndim - 1,), (b_contracting,)), ((), ()))
    return jax.lax.dot_general(a.astype(compute_dtype), b.astype(compute_dtype), dims,
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def reconstruction_and_l0(params: dict, x: jax.Array, y: jax.Array, bandwidth: float, compute_dtype,
                           transcoder: bool):
    """The reconstruction term of ``losses.loss`` and the latents' firing frequencies, with a hand-written
    backward pass: float32 ``(mse, frequencies [M])``, ``mse`` = ``mean_B ||y − ŷ||²`` (summed over d).

    Args: single-SAE or transcoder ``params`` (training convention); normalised input ``x [B, d_in]``; target
    ``y [B, d_out]`` in x's dtype (``x`` for an SAE); ``bandwidth`` ε, ``compute_dtype`` and ``transcoder`` (no
    pre-encoder bias) static.

    ``frequencies [M]`` = ``mean_B H(z − θ)``, each latent's firing frequency on the batch through the ``step``
    pseudo-derivative (so L0 = Σ frequencies, and per-latent penalties such as the frequency penalty get their
    gradient here at no extra cost: the cotangent ``[M]`` rides the same kernel pass as a scalar one would).

    Every ``[B, M]`` array stays batch-major and every large matmul contracts a row-major axis of its left
    operand; only ``x``, the reconstruction gradient and the ``[d, M]`` decoder gradient are ever transposed: the
    layout XLA's CPU backend runs fastest (benchmarks/README.md compares it with latent-major ``[M, B]``).
    """
    return _reconstruction_and_l0_fwd(params, x, y, bandwidth, compute_dtype, transcoder)[0]


def _reconstruction_and_l0_fwd(params, x, y, bandwidth, compute_dtype, transcoder):
    w_enc = params["W_enc"]
    # (x − b_dec) W_enc + b_enc = x W_enc + bias (§3); a transcoder's bias is b_enc.
    z = _dot(x, w_enc, 0, compute_dtype) + _encoder_bias(params, transcoder)  # [B, M]
    active = z > params["threshold"]
    f = jnp.where(active, z, 0.0)  # jumprelu(z)
    y_hat = _dot(f, params["W_dec"], 0, compute_dtype) + params["b_dec"]
    if "W_skip" in params:
        y_hat = y_hat + _dot(x, params["W_skip"], 0, compute_dtype)
    err = y_hat - y.astype(jnp.float32)  # ŷ − y [B, d]
    mse = jnp.mean(jnp.sum(err**2, axis=1))
    counts = jnp.sum(active, axis=0, dtype=jnp.int32)  # tokens on which each latent fired
    # The barrier keeps XLA from merging this sum with the caller's Σ over latents into one slow whole-array
    # reduction.
    frequencies = jax.lax.optimization_barrier(counts).astype(jnp.float32) / x.shape[0]  # mean_B step(z) [M]
    return (mse, frequencies), (params, x, z, f.astype(compute_dtype), err)


def _reconstruction_and_l0_bwd(bandwidth, compute_dtype, transcoder, res, cotangents):
    """With ``g = ∂/∂ŷ = 2·g_mse·(ŷ − y)/B``: ``∂W_dec = fᵀ g``, ``∂f = g W_decᵀ``, ``∂z = H(z − θ)·∂f`` and
    ``∂θ = Σ_B K((z − θ)/ε)·(−(θ/ε)·∂f − (1/ε)·g_freq/B)`` (the ``jumprelu`` and ``step`` pseudo-derivatives,
    JumpReLU paper Eq. 11–12, summed in one pass), ``∂W_enc = (x − b_dec)ᵀ ∂z``, ``∂b_enc = Σ_B ∂z``,
    ``∂b_dec = Σ_B g − W_enc ∂b_enc`` (a transcoder: ``∂W_enc = xᵀ ∂z``, ``∂b_dec = Σ_B g``), ``∂W_skip = xᵀ g``.

    One fused pass for ∂θ also keeps XLA from offloading two products to YNNPACK, which holds each ``[B, M]``
    intermediate of a fusion in memory of its own (≈ 2 GiB more at d=640, M=16384, B=4096).
    """
    params, x, z, f, err = res
    g_mse, g_freq = cotangents  # g_freq [M]: one cotangent per latent's frequency
    batch = x.shape[0]
    threshold = params["threshold"]
    g = (2.0 / batch) * g_mse * err  # [B, d]
    d_f = _dot(g, params["W_dec"], 1, compute_dtype)  # [B, M]
    d_z = jnp.where(z > threshold, d_f, 0.0)
    kernel = _rectangle((z - threshold) / bandwidth)
    d_theta = jnp.sum(kernel * (threshold * d_f + g_freq / batch), axis=0) * (-1.0 / bandwidth)
    # ∂b_enc = Σ_B ∂z rides the ∂W_enc matmul as a row of ones under xᵀ: one pass over ∂z instead of two.
    x_ones = jnp.concatenate([x, jnp.ones((batch, 1), x.dtype)], axis=1)
    enc_grads = _dot(_transposed(x_ones, compute_dtype), d_z, 0, compute_dtype)  # [d + 1, M]
    d_b_enc = enc_grads[-1]
    # (fᵀ g)ᵀ [d, M]. The barrier keeps XLA from folding the transpose below into this matmul as a column-major
    # f, which YNNPACK does not take and XLA's fallback dot cannot run in bfloat16.
    w_dec_grad_t = jax.lax.optimization_barrier(_dot(_transposed(g, compute_dtype), f, 0, compute_dtype))
    grads = {
        "W_enc": enc_grads[:-1] if transcoder else enc_grads[:-1] - jnp.outer(params["b_dec"], d_b_enc),
        "b_enc": d_b_enc,
        "W_dec": w_dec_grad_t.T,
        "b_dec": jnp.sum(g, axis=0) if transcoder else jnp.sum(g, axis=0) - params["W_enc"] @ d_b_enc,
        "threshold": d_theta,
    }
    # ∂x and ∂y (dropped by XLA when only params are differentiated, as in training); an SAE's y is its x, and
    # JAX adds the two.
    d_x = _dot(d_z, params["W_enc"], 1, jnp.float32)
    if "W_skip" in params:
        grads["W_skip"] = _dot(_transposed(x, compute_dtype), g, 0, compute_dtype)
        d_x = d_x + _dot(g, params["W_skip"], 1, jnp.float32)
    return grads, d_x.astype(x.dtype), (-g).astype(x.dtype)  # y has x's dtype (``losses.loss``)


reconstruction_and_l0.defvjp(_reconstruction_and_l0_fwd, _reconstruction_and_l0_bwd)


def remove_parallel_component(w_dec: jax.Array, grad: jax.Array) -> jax.Array:
    """Removes from each decoder row's gradient its component along the (unit-norm) row (Gemma Scope §3).

    ``g_i ← g_i − (g_i · w_i) w_i`` for rows ``w_i`` of ``W_dec [M, d]``; shapes ``[..., M, d]``.
    """
    return grad - jnp.sum(grad * w_dec, axis=-1, keepdims=True) * w_dec


def normalise_decoder(w_dec: jax.Array) -> jax.Array:
    """Rescales each row of ``W_dec [..., M, d]`` to unit L2 norm (Gemma Scope §3)."""
    return w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)


def fold_normalisation(params: dict, scale: float | jax.Array, scale_out: float | jax.Array | None = None) -> dict:
    """Exports trained params to the release convention on raw activations (Gemma Scope §3, release format).

    Training sees ``x = x_raw / C`` (elementwise; C a scalar or one constant per dimension, ``[d]``) and, for an
    SAE, ``x − b_dec``; a transcoder reads ``x_raw / C_in`` and predicts ``y_raw / C_out``. The release's latents
    are ``r ⊙ f`` with ``r_i = ||W_dec[i] ⊙ C_out||`` (C_out = C for an SAE), so its decoder rows keep unit norm:

    - ``W_enc' = diag(1/C_in) · W_enc · diag(r)``, ``θ' = r ⊙ θ``,
    - ``b_enc' = r ⊙ (b_enc − b_dec @ W_enc)`` for an SAE, ``r ⊙ b_enc`` for a transcoder,
    - ``W_dec' = diag(1/r) · W_dec · diag(C_out)``, ``b_dec' = C_out ⊙ b_dec``,
    - ``W_skip' = diag(1/C_in) · W_skip · diag(C_out)`` (affine transcoder),

    so that ``predict(folded, x_raw) = C_out ⊙ x̂`` of the trained model. With scalar constants this is Gemma
    Scope's fold (r = C_out: W_dec unchanged, W_enc scaled by C_out/C_in).

    Args:
      params: single-SAE or transcoder trained params, float32, decoder rows of unit norm.
      scale: the input's normalisation constant(s) C > 0: a scalar or float32 ``[d_in]``.
      scale_out: a transcoder's output constant(s) (scalar or ``[d_out]``); None for an SAE.

    Returns:
      float32 params in the release convention.
    """
    c_in = jnp.asarray(scale, jnp.float32)
    c_out = c_in if scale_out is None else jnp.asarray(scale_out, jnp.float32)
    r = jnp.linalg.norm(params["W_dec"] * c_out, axis=-1)
    b_enc = params["b_enc"] if scale_out is not None else params["b_enc"] - params["b_dec"] @ params["W_enc"]
    folded = {
        "W_enc": params["W_enc"] / jnp.reshape(c_in, (-1, 1)) * r,
        "b_enc": r * b_enc,
        "W_dec": params["W_dec"] * c_out / r[:, None],
        "b_dec": c_out * params["b_dec"],
        "threshold": r * params["threshold"],
    }
    if "W_skip" in params:
        folded["W_skip"] = params["W_skip"] / jnp.reshape(c_in, (-1, 1)) * c_out
    return folded
