"""Training the cross-layer dictionaries of ``crosslayer`` (the CLT and the crosscoder): init, loss, the decoder
constraint and the fold to raw space, as pure functions on one dictionary's params (``jax.vmap`` them over a sweep).

**Training convention.** As for transcoders (``autoencoder``): the CLT reads ``x_i = mlp_in.l_i / C_in[i]`` and
predicts ``y_j = mlp.l_j / C_out[j]``, with one constant per site or per dimension of each site
(``training.normalisation``); it has no pre-encoder bias (b_dec lives in y's space). The crosscoder reads and
reconstructs ``x_i = res.l_i / C[i]`` and, as an SAE, its encoder sees ``x_i − b_dec[i]`` (Gemma Scope §3's
pre-encoder bias, over the concatenated layers). ``fold_clt`` / ``fold_crosscoder`` give ``crosslayer``'s raw,
release params.

**Loss.** The reconstruction is the SUM over output layers of the per-layer normalised squared error,
``Σ_j mean_B ||y_j − ŷ_j||²`` (each layer weighs alike after its own normalisation; Ameisen et al. 2025 also sum
over layers). The sparsity terms are ``losses.sparsity_penalty``'s (λ·L0, the target-L0 pull, the frequency
penalty) with the same straight-through estimators (``autoencoder.jumprelu`` / ``autoencoder.step``, JumpReLU paper
Eq. 11–12): for a CLT either per source layer (``l0_per_layer=True``: Σ_i penalty(L0_i), each layer pulled to the
target) or on the total L0 = Σ_i L0_i (one pull towards a total target; λ·L0 is the same either way). Gradients are
plain autodiff through those estimators (no hand-written backward pass as the plain SAE's).

**Decoder norms.** A latent that writes to many layers has ONE decoder vector, its decoder rows concatenated over
the layers it writes to (a CLT latent of layer i: ``W_dec[i, k, j, :]`` for j ≥ i; a crosscoder latent: all n),
held at unit L2 norm, the gradient's component along it removed before Adam (``normalise_decoder``,
``remove_parallel_component``): Gemma Scope §3's unit-norm rows, generalised. Why the concatenation and not unit
norm per target layer: the latent's one symmetry is ``f → c·f, W_dec → W_dec / c`` (one c per latent, not per
target), and the unit norm removes exactly that, pinning the scale of f that θ and the bandwidth ε are measured
in; a norm per target layer would also fix the ratio of how strongly a latent writes to each layer, which the CLT
has to learn (most latents write mostly to a few layers). Anthropic's CLT penalty weights each latent by the same
concatenated norm (Ameisen et al. 2025, methods).

**Init** (our choice, Gemma Scope §3 generalised): each latent's concatenated decoder He-uniform then unit norm
(CLT slots j < i zero), the encoder of layer i the transpose of the same-layer decoder block rescaled to unit
columns (a crosscoder: the transpose of its concatenated decoder, so ``W_enc = W_decᵀ`` on the concatenated
layers as for an SAE), θ constant, zero biases, zero ``W_skip``.

**Cost per token** of one CLT over n layers, F latents per layer, d_model d, against the n per-layer transcoders
it generalises (same F each): the encoders cost 2·n·d·F FLOPs in both; the decoders 2·d·F·n(n+1)/2 (triangular:
``_clt_decode`` computes only slots j ≥ i) against 2·n·d·F, so the forward pass costs (n + 3)/4 times the
transcoders' (5.25× at n = 18) and the backward pass about twice the forward in both. Memory: the params are
``crosslayer``'s layout, whose ``W_dec [n, F, n, d]`` stores the unused slots j < i as zeros (the shared
contract), so the decoder holds n²·F·d floats against n·F·d (18× at n = 18; a packed triangle would need
(n + 1)/2 = 9.5×) and Adam's second moment as much again; activations per token are the transcoders'
(n·F latents). Measured (benchmarks/RESULTS.md, n = 18, d = 640, F = 128, batch 256, CPU): XLA counts 5.4× the
transcoders' FLOPs, the step takes 9.5× their CPU time (this autodiff backward runs at about half the FLOP rate of
their hand-written one) and the state is 9.3× theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_scope.sae import autoencoder as sae
from gemma_scope.sae import crosslayer, losses

# Where a dictionary's latent axis lies: a CLT's W_dec [n, F, n, d], a crosscoder's [F, n, d] (after any stack
# axes): the last two axes (target layer, d) are one latent's decoder.


def _flat(w_dec: jax.Array) -> jax.Array:
    return w_dec.reshape(*w_dec.shape[:-2], -1)


def normalise_decoder(w_dec: jax.Array) -> jax.Array:
    """Each latent's decoder, concatenated over its target layers (the last two axes ``[n, d]`` of a CLT's
    ``[..., F, n, d]`` or a crosscoder's ``[..., F, n, d]``), rescaled to unit L2 norm (module docstring). A CLT's
    zero slots j < i stay zero."""
    return sae.normalise_decoder(_flat(w_dec)).reshape(w_dec.shape)


def remove_parallel_component(w_dec: jax.Array, grad: jax.Array) -> jax.Array:
    """Removes from each latent's decoder gradient its component along the unit-norm concatenated decoder
    (``autoencoder.remove_parallel_component`` over the last two axes flattened)."""
    return sae.remove_parallel_component(_flat(w_dec), _flat(grad)).reshape(grad.shape)


def _unit_decoder(key: jax.Array, width: int, n_out: int, d: int, mask: jax.Array | None = None) -> jax.Array:
    """He-uniform ``[width, n_out, d]`` (masked), each latent's concatenated decoder of unit norm."""
    w = jax.nn.initializers.he_uniform(in_axis=0, out_axis=1)(key, (width, n_out * d), jnp.float32)
    w = w.reshape(width, n_out, d)
    return normalise_decoder(w if mask is None else w * mask[:, None])


def init_clt(key: jax.Array, n: int, d_model: int, width: int, threshold: float = sae.DEFAULT_THRESHOLD,
             skip: bool = False) -> dict[str, jax.Array]:
    """A fresh CLT over n layers, F = ``width`` latents each, in ``crosslayer``'s layout (module docstring: Init).

    Raises:
      ValueError: non-positive sizes or threshold.
    """
    if min(n, d_model, width) <= 0 or not threshold > 0:
        raise ValueError(f"CLT sizes and threshold must be positive, got n={n}, d_model={d_model}, width={width}, "
                         f"threshold={threshold}")
    mask = crosslayer.causal_mask(n)
    w_dec = jnp.stack([_unit_decoder(k, width, n, d_model, mask[i]) for i, k in enumerate(jax.random.split(key, n))])
    own = jnp.stack([w_dec[i, :, i, :] for i in range(n)])  # [n, F, d], the same-layer blocks
    params = {
        "W_enc": jnp.swapaxes(sae.normalise_decoder(own), 1, 2),
        "b_enc": jnp.zeros((n, width), jnp.float32),
        "threshold": jnp.full((n, width), threshold, jnp.float32),
        "W_dec": w_dec,
        "b_dec": jnp.zeros((n, d_model), jnp.float32),
    }
    return params | ({"W_skip": jnp.zeros((n, d_model, d_model), jnp.float32)} if skip else {})


def init_crosscoder(key: jax.Array, n: int, d_model: int, width: int,
                    threshold: float = sae.DEFAULT_THRESHOLD) -> dict[str, jax.Array]:
    """A fresh crosscoder over n layers with F = ``width`` latents, in ``crosslayer``'s layout (module docstring).

    Raises:
      ValueError: non-positive sizes or threshold.
    """
    if min(n, d_model, width) <= 0 or not threshold > 0:
        raise ValueError(f"crosscoder sizes and threshold must be positive, got n={n}, d_model={d_model}, "
                         f"width={width}, threshold={threshold}")
    w_dec = _unit_decoder(key, width, n, d_model)
    return {"W_enc": jnp.transpose(w_dec, (1, 2, 0)), "b_enc": jnp.zeros((width,), jnp.float32),
            "threshold": jnp.full((width,), threshold, jnp.float32), "W_dec": w_dec,
            "b_dec": jnp.zeros((n, d_model), jnp.float32)}


def _clt_decode(params: dict, f: jax.Array, compute_dtype) -> jax.Array:
    """``ŷ [n, B, d]``: ``Σ_{i ≤ j} f_i @ W_dec[i, :, j] + b_dec[j]``, one matmul per source layer over its slots
    j ≥ i only (the triangle's FLOPs, not the square's)."""
    n, batch = f.shape[:2]
    w_dec = params["W_dec"]
    d = w_dec.shape[-1]
    out = [params["b_dec"][j] for j in range(n)]
    for i in range(n):
        part = sae.matmul(f[i], w_dec[i, :, i:, :].reshape(w_dec.shape[1], -1), compute_dtype)
        part = part.reshape(batch, n - i, d)
        for j in range(i, n):
            out[j] = out[j] + part[:, j - i]
    return jnp.stack(out)


def _mse_and_variance(y: jax.Array, y_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per layer ``mean_B ||y_j − ŷ_j||²`` and ``mean_B ||y_j − mean_B y_j||²``, float32 ``[n]``."""
    y = y.astype(jnp.float32)
    mse = jnp.mean(jnp.sum((y - y_hat) ** 2, axis=-1), axis=-1)
    variance = jnp.mean(jnp.sum((y - y.mean(axis=1, keepdims=True)) ** 2, axis=-1), axis=-1)
    return mse, variance


def clt_loss(params: dict, x: jax.Array, y: jax.Array, l0_coefficient: jax.Array | float,
             bandwidth: float = sae.DEFAULT_BANDWIDTH, compute_dtype=jnp.float32, *, sparsity_loss: str = "l0",
             target_l0: jax.Array | float = 1.0, l0_per_layer: bool = True,
             frequency_coefficient: jax.Array | float = 0.0,
             frequency_threshold: float = losses.DEFAULT_FREQUENCY_THRESHOLD) -> tuple[jax.Array, dict]:
    """The CLT training loss (module docstring) ``Σ_j mean_B ||y_j − ŷ_j||² + sparsity``.

    Args:
      params: one CLT (``crosslayer``'s layout, training convention).
      x: normalised ``mlp_in`` of the n layers ``[n, B, d]``; y: normalised ``mlp`` ``[n, B, d]``.
      l0_coefficient: λ ≥ 0 (may be traced); bandwidth ε (static); compute_dtype the matmul input dtype.
      sparsity_loss, target_l0, frequency_coefficient, frequency_threshold: ``losses.sparsity_penalty``'s.
      l0_per_layer: the penalty on each source layer's L0 (``target_l0`` per layer) or on their sum (``target_l0``
        the total).

    Returns:
      ``(loss, aux)``: aux float32 ``mse`` (Σ_j), ``fvu`` (Σ_j squared error / Σ_j variance), ``l0`` (total, Σ_i
      L0_i), ``l0_layers [n]``, ``fvu_layers [n]`` (each layer's) and bool ``fired [n, F]``.

    Raises:
      ValueError: an unknown ``sparsity_loss``.
    """
    threshold = params["threshold"]
    z = jnp.einsum("nbd,ndf->nbf", x.astype(compute_dtype), params["W_enc"].astype(compute_dtype),
                   preferred_element_type=jnp.float32) + params["b_enc"][:, None, :]
    f = jax.vmap(sae.jumprelu, in_axes=(0, 0, None))(z, threshold, bandwidth)
    frequencies = jnp.mean(jax.vmap(sae.step, in_axes=(0, 0, None))(z, threshold, bandwidth), axis=1)  # [n, F]
    y_hat = _clt_decode(params, f, compute_dtype)
    if "W_skip" in params:
        y_hat = y_hat + jnp.einsum("nbd,nde->nbe", x.astype(compute_dtype), params["W_skip"].astype(compute_dtype),
                                   preferred_element_type=jnp.float32)
    mse, variance = _mse_and_variance(y, y_hat)
    terms = dict(l0_coefficient=l0_coefficient, sparsity_loss=sparsity_loss, target_l0=target_l0,
                 frequency_coefficient=frequency_coefficient, frequency_threshold=frequency_threshold)
    if l0_per_layer:
        penalty, l0_layers = jax.vmap(lambda p: losses.sparsity_penalty(p, **terms))(frequencies)
        penalty = penalty.sum()
    else:
        penalty, _ = losses.sparsity_penalty(frequencies.reshape(-1), **terms)
        l0_layers = frequencies.sum(axis=-1)
    aux = {"mse": mse.sum(), "fvu": mse.sum() / variance.sum(), "l0": l0_layers.sum(), "l0_layers": l0_layers,
           "fvu_layers": mse / variance, "fired": frequencies > 0}
    return mse.sum() + penalty, aux


def crosscoder_loss(params: dict, x: jax.Array, l0_coefficient: jax.Array | float,
                    bandwidth: float = sae.DEFAULT_BANDWIDTH, compute_dtype=jnp.float32, *, sparsity_loss: str = "l0",
                    target_l0: jax.Array | float = 1.0, frequency_coefficient: jax.Array | float = 0.0,
                    frequency_threshold: float = losses.DEFAULT_FREQUENCY_THRESHOLD) -> tuple[jax.Array, dict]:
    """The crosscoder training loss ``Σ_j mean_B ||x_j − x̂_j||² + sparsity(L0)`` with the pre-encoder bias:
    ``z = Σ_i (x_i − b_dec[i]) @ W_enc[i] + b_enc`` (module docstring).

    Args: one crosscoder's ``params``; normalised ``x [n, B, d]``; the rest as ``clt_loss``.

    Returns:
      ``(loss, aux)`` as ``clt_loss``'s, with ``l0_layers`` left out (one L0) and ``fired [F]``.
    """
    w_enc = params["W_enc"]
    z = (jnp.einsum("nbd,ndf->bf", x.astype(compute_dtype), w_enc.astype(compute_dtype),
                    preferred_element_type=jnp.float32)
         + params["b_enc"] - jnp.einsum("nd,ndf->f", params["b_dec"], w_enc))
    f = sae.jumprelu(z, params["threshold"], bandwidth)
    frequencies = jnp.mean(sae.step(z, params["threshold"], bandwidth), axis=0)
    w_dec = params["W_dec"]
    x_hat = sae.matmul(f, w_dec.reshape(w_dec.shape[0], -1), compute_dtype).reshape(-1, *w_dec.shape[1:])
    x_hat = jnp.swapaxes(x_hat, 0, 1) + params["b_dec"][:, None, :]
    mse, variance = _mse_and_variance(x, x_hat)
    penalty, l0 = losses.sparsity_penalty(frequencies, l0_coefficient, sparsity_loss, target_l0,
                                          frequency_coefficient, frequency_threshold)
    aux = {"mse": mse.sum(), "fvu": mse.sum() / variance.sum(), "l0": l0, "fvu_layers": mse / variance,
           "fired": frequencies > 0}
    return mse.sum() + penalty, aux


def _fold(params: dict, c_in: jax.Array, c_out: jax.Array, b_enc: jax.Array, latent_norms: jax.Array) -> dict:
    """The shared part of both folds (``fold_clt``); ``latent_norms`` r, shaped as ``b_enc``."""
    return {"W_enc": params["W_enc"] / c_in[..., None] * latent_norms[..., None, :],
            "b_enc": latent_norms * b_enc, "threshold": latent_norms * params["threshold"],
            "b_dec": c_out * params["b_dec"]}


def fold_clt(params: dict, scale_in: jax.Array, scale_out: jax.Array) -> dict:
    """A trained CLT in ``crosslayer``'s raw, release convention, as ``autoencoder.fold_normalisation`` folds a
    transcoder: with ``r_{i,k}`` = the norm of latent (i, k)'s raw decoder ``(W_dec[i, k, j] ⊙ C_out[j])_{j ≥ i}``
    concatenated, the release's latents are ``r ⊙ f`` and its concatenated decoders keep unit norm:
    ``W_enc'[i] = diag(1/C_in[i]) W_enc[i] diag(r_i)``, ``b_enc' = r ⊙ b_enc``, ``θ' = r ⊙ θ``,
    ``W_dec'[i, k, j] = W_dec[i, k, j] ⊙ C_out[j] / r_{i,k}``, ``b_dec'[j] = C_out[j] ⊙ b_dec[j]``,
    ``W_skip'[j] = diag(1/C_in[j]) W_skip[j] diag(C_out[j])``; so ``crosslayer.clt_predict(folded, x_raw) =
    C_out ⊙ ŷ``.

    Args:
      params: one trained CLT (float32, training convention).
      scale_in, scale_out: C of each layer's input and output, float32 ``[n, d]`` (or ``[n, 1]``).
    """
    c_in, c_out = jnp.asarray(scale_in, jnp.float32), jnp.asarray(scale_out, jnp.float32)
    raw = params["W_dec"] * c_out[None, None] * crosslayer.causal_mask(c_out.shape[0])[:, None, :, None]
    r = jnp.linalg.norm(_flat(raw), axis=-1)  # [n, F]
    folded = _fold(params, c_in, c_out, params["b_enc"], r) | {"W_dec": raw / r[..., None, None]}
    if "W_skip" in params:
        folded["W_skip"] = params["W_skip"] / c_in[..., None] * c_out[:, None, :]
    return folded


def fold_crosscoder(params: dict, scale: jax.Array) -> dict:
    """A trained crosscoder in ``crosslayer``'s raw, release convention (``fold_clt``'s rescaling with r_k the norm
    of latent k's raw concatenated decoder; the pre-encoder bias goes into ``b_enc' = r ⊙ (b_enc − Σ_i b_dec[i] @
    W_enc[i])``); ``crosslayer.crosscoder_predict(folded, x_raw) = C ⊙ x̂``.

    Args:
      params: one trained crosscoder (float32, training convention).
      scale: C of each layer, float32 ``[n, d]`` (or ``[n, 1]``).
    """
    c = jnp.asarray(scale, jnp.float32)
    raw = params["W_dec"] * c[None]
    r = jnp.linalg.norm(_flat(raw), axis=-1)  # [F]
    b_enc = params["b_enc"] - jnp.einsum("nd,ndf->f", params["b_dec"], params["W_enc"])
    return _fold(params, c, c, b_enc, r) | {"W_dec": raw / r[:, None, None]}
