"""The Gemma 2 / Gemma 3 text decoder as Flax linen modules, with a hook at every Gemma Scope site.

Module and parameter names are exactly those of Google's `gemma` library (``embedder/input_embedding``,
``layer_{i}/attn/q_einsum/w``, ``layer_{i}/mlp/gating_einsum``, ``final_norm/scale``, …), so checkpoints in that
layout load unchanged. The block is the one of the Gemma 2 report (arXiv 2408.00118, §2) and Gemma 3 report
(arXiv 2503.19786, §2): RMSNorm with (1 + scale), pre/post attention and pre/post feed-forward norms, GQA with RoPE,
optional QK-norm, attention-logit softcap, GeGLU MLP, tied embeddings scaled by sqrt(d_model).

Each block calls ``hook(kind, value)`` at its four sites (`gemma_scope.sites`): "att" with the per-head attention
outputs concatenated over heads ``[B, T, num_heads * head_dim]`` before W_O, "mlp_in" with the MLP's input (after
pre_ffw_norm), "mlp" after post_ffw_norm, and "res" with the block output; whatever the hook returns flows
downstream. It calls the same hook at the block's nonlinear scalings, so that a caller can freeze them (the local
replacement model of attribution graphs, Ameisen et al. 2025 "Circuit Tracing" §2.3): "pattern" with the attention
probabilities ``[B, T, num_kv_heads, num_heads / num_kv_heads, T]`` and, under each norm's name
("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"), its inverse RMS ``[B, T, 1]``.
The QK-norms are not hooked: they only reach the output through the pattern.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_scope.model.config import LOCAL, Config

Hook = Callable[[str, jax.Array], jax.Array]

_MASKED = -2.3819763e38  # logit of a masked key; finite so that fully masked (padding) rows stay NaN-free
_init = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * (1 + scale)`` over the last axis; param ``scale`` [d], zero-initialised.

    ``fix``, if given, maps the inverse RMS ``1 / sqrt(mean(x²) + eps)`` ``[..., 1]`` to the one used (e.g. a frozen
    constant)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, fix: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * (inv if fix is None else fix(inv)) * (1 + scale)


class Einsum(nn.Module):
    """A weight ``w`` of the given shape applied with `jnp.einsum`."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, equation: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(equation, x, self.param("w", _init, self.shape))


class Embedder(nn.Module):
    """Tied embedding ``input_embedding`` [vocab_size, d_model]: encode scales by sqrt(d_model), decode is x @ Eᵀ."""

    vocab_size: int
    d_model: int

    def setup(self):
        self.input_embedding = self.param("input_embedding", _init, (self.vocab_size, self.d_model))

    def encode(self, tokens: jax.Array) -> jax.Array:
        x = self.input_embedding[tokens]
        return x * jnp.sqrt(self.d_model).astype(x.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        return x @ self.input_embedding.T


def apply_rope(x: jax.Array, positions: jax.Array, base: float, scale: float = 1.0) -> jax.Array:
    """Rotary embedding, split-half convention (RoFormer, arXiv 2104.09864, Eq. 34; as in the `gemma` library).

    x: [B, T, N, H]; positions: int [B, T]; rotation angle of pair (i, i + H/2) is position / base^(2i/H) / scale.
    """
    half = x.shape[-1] // 2
    timescale = base ** (2 * jnp.arange(half) / x.shape[-1])
    angle = (positions[..., None] / timescale / scale)[..., None, :]  # [B, T, 1, H/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention; `heads` returns the per-head outputs, `project` applies W_O (``attn_vec_einsum``)."""

    config: Config
    attn_type: str

    def setup(self):
        c = self.config
        if c.use_qkv_einsum:
            self.qkv_einsum = Einsum((3, c.num_heads, c.d_model, c.head_dim))
        else:
            self.q_einsum = Einsum((c.num_heads, c.d_model, c.head_dim))
            self.kv_einsum = Einsum((2, c.num_kv_heads, c.d_model, c.head_dim))
        if c.use_qk_norm:
            self._query_norm = RMSNorm(c.norm_eps)
            self._key_norm = RMSNorm(c.norm_eps)
        self.attn_vec_einsum = Einsum((c.num_heads, c.head_dim, c.d_model))

    def heads(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
              fix: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """x [B, T, d_model], positions int [B, T], mask bool [B, T, S] (query t may see key s) -> [B, T, N, H].

        ``fix``, if given, maps the attention probabilities ``[B, T, K, N / K, S]`` to the ones used."""
        c = self.config
        if c.use_qkv_einsum:
            q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            q = self.q_einsum("BTD,NDH->BTNH", x)
            k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        if c.use_qk_norm:
            q, k = self._query_norm(q), self._key_norm(k)
        local = self.attn_type == LOCAL
        base = c.local_rope_base if local else c.global_rope_base
        scale = 1.0 if local else c.global_rope_scale
        q = apply_rope(q, positions, base, scale) * c.query_scale
        k = apply_rope(k, positions, base, scale)
        b, t, n, h = q.shape
        q = q.reshape(b, t, c.num_kv_heads, n // c.num_kv_heads, h)
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
        if c.attn_logit_softcap is not None:
            logits = c.attn_logit_softcap * jnp.tanh(logits / c.attn_logit_softcap)
        logits = jnp.where(mask[:, :, None, None, :], logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        probs = probs if fix is None else fix(probs)
        return jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)

    def project(self, heads: jax.Array) -> jax.Array:
        """[B, T, N, H] -> [B, T, d_model]: the output projection W_O."""
        return self.attn_vec_einsum("BTNH,NHD->BTD", heads)


class FeedForward(nn.Module):
    """GeGLU MLP: ``(gelu(x W_gate) * (x W_up)) W_down`` with params ``gating_einsum`` [2, …] and ``linear``."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if c.transpose_gating_einsum:
            gating = jnp.einsum("BTD,CFD->BTCF", x, self.param("gating_einsum", _init, (2, c.hidden_dim, c.d_model)))
        else:
            gating = jnp.einsum("BTD,CDF->BTCF", x, self.param("gating_einsum", _init, (2, c.d_model, c.hidden_dim)))
        hidden = nn.gelu(gating[..., 0, :]) * gating[..., 1, :]  # tanh-approximated GELU, as in Gemma
        return hidden @ self.param("linear", _init, (c.hidden_dim, c.d_model))


class Block(nn.Module):
    """One decoder layer; calls ``hook`` at its "att", "mlp_in", "mlp" and "res" sites (module docstring)."""

    config: Config
    attn_type: str

    def setup(self):
        eps = self.config.norm_eps
        self.pre_attention_norm = RMSNorm(eps)
        self.attn = Attention(self.config, self.attn_type)
        self.post_attention_norm = RMSNorm(eps)
        self.pre_ffw_norm = RMSNorm(eps)
        self.mlp = FeedForward(self.config)
        self.post_ffw_norm = RMSNorm(eps)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, hook: Hook) -> jax.Array:
        fix = lambda name: functools.partial(hook, name)  # noqa: E731
        heads = self.attn.heads(self.pre_attention_norm(x, fix("pre_attention_norm")), positions, mask, fix("pattern"))
        b, t, n, h = heads.shape
        att = hook("att", heads.reshape(b, t, n * h)).reshape(b, t, n, h)
        x = x + self.post_attention_norm(self.attn.project(att), fix("post_attention_norm"))
        mlp_in = hook("mlp_in", self.pre_ffw_norm(x, fix("pre_ffw_norm")))
        mlp = hook("mlp", self.post_ffw_norm(self.mlp(mlp_in), fix("post_ffw_norm")))
        return hook("res", x + mlp)


class Transformer(nn.Module):
    """The decoder: `trunk` runs embedding and the first layers, `decode` the final norm and tied unembedding."""

    config: Config

    def setup(self):
        c = self.config
        self.embedder = Embedder(c.vocab_size, c.d_model)
        self.blocks = [Block(c, kind, name=f"layer_{i}") for i, kind in enumerate(c.attention_types)]
        self.final_norm = RMSNorm(c.norm_eps)

    def trunk(self, tokens: jax.Array, positions: jax.Array, masks: dict[str, jax.Array],
              hooks: list[Hook], embeddings: jax.Array | None = None) -> jax.Array:
        """tokens int [B, T] -> residual stream [B, T, d_model] after ``len(hooks)`` layers.

        masks: bool [B, T, T] per attention type (LOCAL / GLOBAL); hooks: one per layer to run; embeddings: the
        residual stream entering layer 0 [B, T, d_model], if not the tokens' scaled embeddings.
        """
        x = self.embedder.encode(tokens) if embeddings is None else embeddings
        for block, hook in zip(self.blocks, hooks):
            x = block(x, positions, masks[block.attn_type], hook)
        return x

    def decode(self, x: jax.Array, fix: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """Residual stream [..., d_model] after the last layer -> logits [..., vocab_size] (final softcap applied).

        ``fix`` maps the final norm's inverse RMS (as in `RMSNorm`)."""
        logits = self.embedder.decode(self.final_norm(x, fix))
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def __call__(self, tokens, positions, masks, hooks):
        """Full forward (used by `init`): logits [B, T, vocab_size]."""
        return self.decode(self.trunk(tokens, positions, masks, hooks))
