"""Cross-layer dictionaries at inference, as pure functions: the cross-layer transcoder (CLT) and the acausal
crosscoder, in the release/inference convention of ``autoencoder`` (raw activations, folded params, row vectors,
``f = (pre > threshold) * relu(pre)``, float32 out).

**CLT** (Ameisen et al. 2025, "Circuit Tracing", §2; Gemma Scope 2 ``clt/``): over n covered layers
``l_0 < … < l_{n−1}`` (index i is the i-th covered layer, not the model layer), layer i's encoder reads
``x_i = mlp_in.l_i`` and its latents write to every covered layer j ≥ i:

    f_i = JumpReLU(x_i @ W_enc[i] + b_enc[i])
    ŷ_j = Σ_{i ≤ j} f_i @ W_dec[i, :, j, :] + b_dec[j]  (+ x_j @ W_skip[j])       predicting y_j = mlp.l_j

Params: ``W_enc [n, d, F]``, ``b_enc [n, F]``, ``threshold [n, F]``, ``W_dec [n, F, n, d]`` (source, latent,
target, d_model: Gemma Scope 2's full-length ``w_dec`` stacked over source layers; the slots j < i are unused
and held at zero), ``b_dec [n, d]``, optional ``W_skip [n, d, d]``. The decoders are masked to j ≥ i here
anyway, so a nonzero unused slot cannot leak backwards in time.

**Crosscoder** (Lindsey et al. 2024, "Sparse Crosscoders"; Gemma Scope 2 ``crosscoder/``): one set of F latents
reads ``x_i = res.l_i`` at n layers and reconstructs all of them (acausal):

    f = JumpReLU(Σ_i x_i @ W_enc[i] + b_enc);    x̂_j = f @ W_dec[:, j, :] + b_dec[j]

Params: ``W_enc [n, d, F]``, ``b_enc [F]``, ``threshold [F]``, ``W_dec [F, n, d]``, ``b_dec [n, d]``.

Activations of the n layers travel stacked, ``[n, B, d]``. With n = 1 both reduce to ``autoencoder``'s transcoder
and SAE (without the pre-encoder bias, which releases fold into ``b_enc``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CLT_KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")
CROSSCODER_KEYS = CLT_KEYS


def _jumprelu(pre: jax.Array, threshold: jax.Array) -> jax.Array:
    return (pre > threshold) * jax.nn.relu(pre)


def kind(params: dict) -> str:
    """What a single (unstacked) dictionary's params are, from their shapes: ``"clt"`` (``W_dec`` rank 4),
    ``"crosscoder"`` (``W_dec`` rank 3) or ``"sae"`` (rank 2: an SAE or per-layer transcoder).

    Raises:
      ValueError: ``W_dec`` missing or of another rank.
    """
    rank = getattr(params.get("W_dec"), "ndim", None)
    kinds = {2: "sae", 3: "crosscoder", 4: "clt"}
    if rank not in kinds:
        raise ValueError(f"params have no W_dec of rank 2, 3 or 4 (got rank {rank}): not an SAE, CLT or crosscoder")
    return kinds[rank]


def causal_mask(n: int) -> jax.Array:
    """``[n, n]`` float32 mask, 1 where source i may write to target j (i ≤ j)."""
    return jnp.triu(jnp.ones((n, n), jnp.float32))


def clt_encode(params: dict, x: jax.Array) -> jax.Array:
    """CLT latents ``f [n, B, F]`` float32 from raw ``x [n, B, d]`` (``mlp_in`` of the covered layers)."""
    pre = jnp.einsum("nbd,ndf->nbf", x.astype(jnp.float32), params["W_enc"]) + params["b_enc"][:, None, :]
    return _jumprelu(pre, params["threshold"][:, None, :])


def clt_decode(params: dict, f: jax.Array) -> jax.Array:
    """CLT outputs ``ŷ [n, B, d]`` float32 from latents ``f [n, B, F]``: ``ŷ_j = Σ_{i ≤ j} f_i @ W_dec[i, :, j]
    + b_dec[j]`` (no skip term)."""
    w_dec = params["W_dec"] * causal_mask(f.shape[0])[:, None, :, None]
    return jnp.einsum("ibf,ifjd->jbd", f, w_dec) + params["b_dec"][:, None, :]


def clt_predict(params: dict, x: jax.Array) -> jax.Array:
    """CLT prediction of ``mlp`` at the covered layers, ``[n, B, d]`` float32, from raw ``x [n, B, d]``, plus
    ``x_j @ W_skip[j]`` when the CLT has an affine skip connection."""
    out = clt_decode(params, clt_encode(params, x))
    if "W_skip" in params:
        out = out + jnp.einsum("jbd,jde->jbe", x.astype(jnp.float32), params["W_skip"])
    return out


def crosscoder_encode(params: dict, x: jax.Array) -> jax.Array:
    """Crosscoder latents ``f [B, F]`` float32 from raw ``x [n, B, d]`` (``res`` of its layers)."""
    pre = jnp.einsum("nbd,ndf->bf", x.astype(jnp.float32), params["W_enc"]) + params["b_enc"]
    return _jumprelu(pre, params["threshold"])


def crosscoder_decode(params: dict, f: jax.Array) -> jax.Array:
    """Crosscoder reconstructions ``x̂ [n, B, d]`` float32 from latents ``f [B, F]``."""
    return jnp.einsum("bf,fnd->nbd", f, params["W_dec"]) + params["b_dec"][:, None, :]


def crosscoder_predict(params: dict, x: jax.Array) -> jax.Array:
    """``crosscoder_decode(crosscoder_encode(x))``: ``[n, B, d]`` float32 from raw ``x [n, B, d]``."""
    return crosscoder_decode(params, crosscoder_encode(params, x))
