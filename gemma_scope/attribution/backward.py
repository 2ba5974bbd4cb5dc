"""Rows of the attribution graph: one backward sweep of the local replacement model per batch of targets, layer by
layer, through only the layers below the batch's deepest target (Ameisen et al. 2025, "Circuit Tracing", §2.4;
circuit-tracer's ``compute_batch``, which injects the targets' encoder or logit directions as gradients the same way).

With the patterns and norm scalings frozen and the MLPs replaced, each block ``ℓ`` is a linear map
``x_ℓ -> (x_{ℓ+1}, mlp_in.ℓ)`` plus what the MLP slot adds (the affine skip ``mlp_in.ℓ @ W_skip[ℓ]``, the latents'
decoder rows, the error, constants), and a map has one vjp for every cotangent. For a batch of B targets a sweep
carries the cotangent of the residual stream ``[B, T, d]`` down from the deepest target. At block ℓ, with ``g``
the cotangent of the block's output (= of anything written to ``mlp.ℓ``), it takes the rows of the sources
written there: an error node (ℓ, t) gets ``g[t] · error[ℓ, t]``, an active latent (i, t, k) with i ≤ ℓ gets
``a · W_dec[i, k, ℓ] · g[t]`` (per-layer transcoders: i = ℓ only; the latents grouped in (layer, position)
cells padded to the fullest, so that this is one batched matmul). Then it adds the encoder direction
``W_enc[ℓ, :, k]`` at position t of each target (ℓ, t, k) to the cotangent of ``mlp_in.ℓ`` and applies the
block's vjp (``model.layers.Block`` with the frozen scalings; ``jax.vjp`` at zero: the map is linear, so the
point does not matter). A logit target starts at the top as ``(E_v − mean E) · inv_final · (1 + scale)`` at the
last position; a token t gets ``g_embed[t] · embedding[t]`` at the bottom. The loop over blocks is a
``lax.fori_loop`` whose length is the batch's depth, so one compiled function serves every batch of one shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope import model
from gemma_scope.attribution.replacement import Prompt, is_clt
from gemma_scope.model.layers import Block

_SCALINGS = ("pre_attention_norm", "pattern", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")


@dataclasses.dataclass(frozen=True)
class Targets:
    """The graph's targets as the sweep reads them: layer int32 [A + K] (``n`` for a logit), position int32
    [A + K], direction float32 [A + K, d] (the cotangent injected at that layer's ``mlp_in``, or at the top)."""

    layer: np.ndarray
    position: np.ndarray
    direction: jax.Array


def targets(params: dict, cfg: model.Config, tc: dict, prompt: Prompt) -> Targets:
    """The active latents' encoder directions, then the logit nodes' directions through the frozen final norm."""
    n, t = cfg.num_layers, prompt.tokens.shape[0]
    layer, pos, idx = prompt.active.T
    unembed = params["embedder"]["input_embedding"]
    logit_dirs = (unembed[prompt.logit_tokens] - unembed.mean(axis=0)).astype(jnp.float32)
    final = prompt.frozen[model.frozen_key(None, "final_norm")][0, -1].astype(jnp.float32)
    logit_dirs = logit_dirs * final * (1 + params["final_norm"]["scale"].astype(jnp.float32))
    k = len(prompt.logit_tokens)
    direction = jnp.concatenate([tc["W_enc"][jnp.asarray(layer), :, jnp.asarray(idx)], logit_dirs])
    return Targets(np.concatenate([layer, np.full(k, n)]).astype(np.int32),
                   np.concatenate([pos, np.full(k, t - 1)]).astype(np.int32), direction)


def cells(tc: dict, prompt: Prompt, n: int) -> tuple[jax.Array, np.ndarray]:
    """The active latents' decoder rows times their activations in (layer, position) cells padded to the fullest:
    float32 ``[n, T, M, d]`` (per-layer) or ``[n, T, M, n, d]`` (CLT, causal), and each latent's flat index into
    ``[n·T·M]``."""
    t = prompt.tokens.shape[0]
    layer, pos, idx = prompt.active.T
    cell = layer * t + pos
    first = np.searchsorted(cell, np.arange(n * t))
    rank = np.arange(len(cell)) - first[cell]
    m = int(rank.max()) + 1 if len(cell) else 1
    table = np.zeros((n * t, m), np.int32)
    value = np.zeros((n * t, m), np.float32)
    table[cell, rank], value[cell, rank] = idx, prompt.activations
    rows = tc["W_dec"][np.repeat(np.arange(n), t)[:, None], table]  # [n·T, M, d] or [n·T, M, n, d]
    if is_clt(tc):
        causal = np.triu(np.ones((n, n), np.float32))[np.repeat(np.arange(n), t)]  # [n·T, n]
        rows = rows * causal[:, None, :, None]
    value = value.reshape(value.shape + (1,) * (rows.ndim - 2))
    return (rows * value).reshape(n, t, m, *rows.shape[2:]), (cell * m + rank).astype(np.int32)


def held(params: dict, cfg: model.Config, tc: dict, prompt: Prompt) -> dict:
    """The device arrays a sweep reads: the blocks' params and frozen scalings stacked over layers, ``W_skip``,
    the latents' cells and flat indices, the errors and embeddings."""
    n = cfg.num_layers
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    out = {"layers": jax.tree.map(stack, *[params[f"layer_{j}"] for j in range(n)]),
           "frozen": {name: jnp.stack([prompt.frozen[model.frozen_key(j, name)] for j in range(n)])
                      for name in _SCALINGS},
           "errors": prompt.errors, "embeddings": prompt.embeddings}
    out["cells"], index = cells(tc, prompt, n)
    out["index"] = jnp.asarray(index)
    if "W_skip" in tc:
        out["W_skip"] = tc["W_skip"]
    return out


@functools.partial(jax.jit, static_argnums=0)
def rows(cfg: model.Config, arrays: dict, layer: jax.Array, position: jax.Array, direction: jax.Array) -> jax.Array:
    """Rows float32 ``[B, A + n·T + T]`` (sources: latents, errors, tokens) of B targets (`Targets` entries; a
    padding target has layer −1 and gives a zero row)."""
    n = cfg.num_layers
    t, d = arrays["embeddings"].shape
    b = layer.shape[0]
    block = Block(cfg, cfg.attention_types[0])  # the attention type only sets RoPE, dead under frozen patterns
    positions, mask = jnp.zeros((1, t), jnp.int32), jnp.ones((1, t, t), bool)
    depth = jnp.minimum(jnp.max(layer) + 1, n)  # a target at layer j reads mlp_in.j inside block j
    at = (jnp.arange(t)[None, :] == position[:, None])[:, :, None] * direction[:, None, :]  # [B, T, d]

    def inject(j):
        return jnp.where((layer == j)[:, None, None], at, 0.0)

    def step(i, carry):
        g, latent, by_error = carry  # g: the cotangent of block j's output, i.e. of everything written to mlp.j
        j = depth - 1 - i
        frozen = {name: value[j] for name, value in arrays["frozen"].items()}
        skip = arrays["W_skip"][j] if "W_skip" in arrays else None

        def block_map(x):
            seen = {}

            def hook(kind, value):
                if kind in frozen:
                    return frozen[kind].astype(value.dtype)
                if kind == "mlp_in":
                    seen["x"] = value
                if kind == "mlp":  # what the MLP slot adds linearly in x: the skip
                    return jnp.zeros_like(value) if skip is None else (seen["x"] @ skip).astype(value.dtype)
                return value

            out = block.apply({"params": jax.tree.map(lambda p: p[j], arrays["layers"])}, x[None], positions, mask,
                              hook)
            return out[0].astype(jnp.float32), seen["x"][0].astype(jnp.float32)

        if clt:  # the latents of every layer i <= j write to mlp.j
            latent = latent + jnp.einsum("btd,itmd->bitm", g, jax.lax.dynamic_index_in_dim(grid, j, 3, False))
        else:
            latent = jax.lax.dynamic_update_index_in_dim(latent, jnp.einsum("btd,tmd->btm", g, grid[j]), j, 1)
        by_error = jax.lax.dynamic_update_index_in_dim(by_error, jnp.einsum("btd,td->bt", g, arrays["errors"][j]), j, 1)
        _, vjp = jax.vjp(block_map, jnp.zeros((t, d), jnp.float32))
        (below,) = jax.vmap(vjp)((g, inject(j)))
        return below, latent, by_error

    grid = arrays["cells"]
    clt = grid.ndim == 5
    start = (inject(n), jnp.zeros((b, n, t, grid.shape[2]), jnp.float32), jnp.zeros((b, n, t), jnp.float32))
    g_embed, latent, by_error = jax.lax.fori_loop(0, depth, step, start)
    by_token = jnp.einsum("btd,td->bt", g_embed, arrays["embeddings"])
    return jnp.concatenate([latent.reshape(b, -1)[:, arrays["index"]], by_error.reshape(b, n * t), by_token], axis=1)
