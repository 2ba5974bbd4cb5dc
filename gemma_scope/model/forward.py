"""A Gemma forward pass that reads and replaces activations at Gemma Scope sites (arXiv 2408.05147, §3.1).

`forward` and `token_nll` are pure functions of (params, tokens) for a static config, capture list and replacement
functions, so they can be wrapped in `jax.jit` (close over ``cfg``, ``capture`` and ``replace``). Replacement
functions may close over traced arrays (SAE params).

`forward` can also record the nonlinear scalings of the pass (each RMSNorm's inverse RMS and each attention
pattern, `layers`) and, on a second pass, hold them at recorded values under `jax.lax.stop_gradient`: with the
MLPs replaced too, the pass is then linear in its embeddings and in whatever the replacements add (the local
replacement model of Ameisen et al. 2025, "Circuit Tracing", §2.3). Neither costs the plain forward anything: the
hooks resolve when the function is traced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp

from gemma_scope.model.config import GLOBAL, LOCAL, Config
from gemma_scope.model.layers import Transformer
from gemma_scope.sites import KINDS, Site

Replacement = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class Output:
    """Result of `forward`.

    logits: [B, T, vocab_size] in the params' dtype (final softcap applied), or None when ``logits=False``.
    acts: {Site: [B, T, cfg.site_width(site.kind)]} for every captured site.
    frozen: with ``record_frozen``, the pass's nonlinear scalings by `frozen_key`: each norm's inverse RMS
      [B, T, 1] and each attention pattern [B, T, num_kv_heads, num_heads / num_kv_heads, T]; else None.
    """

    logits: jax.Array | None
    acts: dict[Site, jax.Array]
    frozen: dict[str, jax.Array] | None = None


def frozen_key(layer: int | None, name: str) -> str:
    """The key of a recorded scaling: ``"layer_3/pre_ffw_norm"``, ``"layer_3/pattern"``, or ``"final_norm"``
    (layer None)."""
    return name if layer is None else f"layer_{layer}/{name}"


def _fixer(layer, name, frozen, recorded):
    """The function a norm or attention applies to its scaling: record it and/or replace it by a frozen constant."""
    key = frozen_key(layer, name)

    def fix(value):
        if frozen is not None:
            if key not in frozen or frozen[key].shape != value.shape:
                got = frozen[key].shape if key in frozen else "nothing"
                raise ValueError(f"frozen[{key!r}] is {got}; expected an array of shape {value.shape}")
            value = jax.lax.stop_gradient(frozen[key].astype(value.dtype))
        if recorded is not None:
            recorded[key] = value
        return value

    return fix


def init_params(cfg: Config, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Random params in the `gemma` library's tree (e.g. for tiny test configs); weights ~ N(0, 0.02²), norms 0."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    masks = {LOCAL: jnp.ones((1, 1, 1), bool), GLOBAL: jnp.ones((1, 1, 1), bool)}
    hooks = [lambda kind, x: x] * cfg.num_layers
    params = Transformer(cfg).init(rng, tokens, tokens, masks, hooks)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), flax.core.unfreeze(params))


def _positions_and_masks(cfg: Config, tokens: jax.Array, attention_mask: jax.Array | None):
    """RoPE positions [B, T] and bool attention masks [B, T, T] per attention type.

    Positions count real tokens only (as the `gemma` library's ``build_positions_from_mask``), so left padding is
    harmless; a query sees earlier-or-equal real keys, LOCAL layers only those less than ``sliding_window`` back.
    """
    b, t = tokens.shape
    if attention_mask is None:
        valid = jnp.ones((b, t), bool)
    else:
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected bool {tokens.shape} like tokens")
        valid = attention_mask.astype(bool)
    positions = jnp.cumsum(valid, axis=-1)
    positions = positions - (positions >= 1)
    causal = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    near = positions[:, None, :] > positions[:, :, None] - cfg.sliding_window
    return positions, {GLOBAL: causal, LOCAL: causal & near}


def _check_sites(cfg: Config, sites: Iterable[Site], what: str) -> None:
    for site in sites:
        if not isinstance(site, Site):
            raise TypeError(f"{what} must hold gemma_scope.sites.Site objects, got {site!r}")
        if site.layer >= cfg.num_layers:
            raise ValueError(f"{what} site {site} is beyond the model's layers 0..{cfg.num_layers - 1}")


def _run_trunk(params, cfg, tokens, capture, replace, attention_mask, all_layers, embeddings=None, frozen=None,
               recorded=None):
    """Embedding (or ``embeddings``) and all blocks, or (``all_layers`` False) those up to the last
    captured/replaced site; scalings frozen and/or recorded into the dict ``recorded`` (`_fixer`).

    Returns (residual stream, captured acts)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [batch, seq_len], got shape {tokens.shape}")
    capture, replace = set(capture), dict(replace or {})
    _check_sites(cfg, capture, "capture")
    _check_sites(cfg, replace, "replace")
    num_layers = cfg.num_layers if all_layers else 1 + max((s.layer for s in capture | set(replace)), default=-1)
    acts = {}

    def hook_for(layer):
        def hook(kind, value):
            if kind not in KINDS:  # a norm's inverse RMS or an attention pattern
                return value if frozen is None and recorded is None else _fixer(layer, kind, frozen, recorded)(value)
            site = Site(kind, layer)
            if site in capture:
                acts[site] = value  # the activation as the model computed it, before its own replacement
            if site in replace:
                new = replace[site](value)
                if new.shape != value.shape:
                    raise ValueError(f"replacement for site {site} returned shape {new.shape}; expected {value.shape}")
                value = new.astype(value.dtype)
            return value

        return hook

    positions, masks = _positions_and_masks(cfg, tokens, attention_mask)
    hooks = [hook_for(layer) for layer in range(num_layers)]
    x = Transformer(cfg).apply({"params": params}, tokens, positions, masks, hooks, embeddings,
                               method=Transformer.trunk)
    return x, acts


def forward(params: dict, cfg: Config, tokens: jax.Array, *, capture: Iterable[Site] = (),
            replace: Mapping[Site, Replacement] | None = None, attention_mask: jax.Array | None = None,
            logits: bool = True, embeddings: jax.Array | None = None, record_frozen: bool = False,
            frozen: Mapping[str, jax.Array] | None = None) -> Output:
    """Runs Gemma on ``tokens`` int32 [B, T], reading and replacing site activations.

    Args:
      params: the `gemma` library's param tree (``embedder``, ``layer_{i}``, ``final_norm``).
      cfg: the architecture (static under jit).
      capture: sites whose activations to return in ``Output.acts``. A captured site that is also replaced returns
        the activation before its own replacement (but after any upstream replacement).
      replace: {site: fn}, fn maps the site's activation [B, T, width] to an array of the same shape (cast back to
        the activation's dtype); every later computation sees fn's output (an SAE splice, arXiv 2408.05147 §4).
      attention_mask: optional bool [B, T], False at padding: padding keys are never attended to and RoPE
        positions count real tokens only. Outputs at padding positions are meaningless.
      logits: False skips the final norm and unembedding, and every layer after the last captured/replaced one.
      embeddings: the residual stream entering layer 0, float [B, T, d_model], instead of the tokens' scaled
        embeddings (``tokens`` still set the shapes, positions and masks).
      record_frozen: return the pass's nonlinear scalings in ``Output.frozen``.
      frozen: {`frozen_key`: array} from a recording pass (on the same tokens, or any pass of the same shapes):
        every norm's inverse RMS and attention pattern takes that value, under `jax.lax.stop_gradient`.

    Returns:
      Output(logits [B, T, vocab_size] or None, acts {Site: [B, T, width]}, frozen or None).

    Raises:
      ValueError / TypeError: bad token or mask shapes, sites that are not `Site`s or beyond the last layer, a
      replacement returning the wrong shape, a frozen scaling missing or of the wrong shape.
    """
    recorded = {} if record_frozen else None
    x, acts = _run_trunk(params, cfg, tokens, capture, replace, attention_mask, logits, embeddings, frozen, recorded)
    out_logits = None
    if logits:
        fix = None if frozen is None and recorded is None else _fixer(None, "final_norm", frozen, recorded)
        out_logits = Transformer(cfg).apply({"params": params}, x, fix, method=Transformer.decode)
    return Output(logits=out_logits, acts=acts, frozen=recorded)


def token_nll(params: dict, cfg: Config, tokens: jax.Array, replace: Mapping[Site, Replacement] | None = None, *,
              attention_mask: jax.Array | None = None, chunk_bytes: int = 2**28) -> jax.Array:
    """Per-token next-token cross-entropy in nats: float32 [B, T-1], ``nll[b, t] = -log p(tokens[b, t+1] | tokens[b, :t+1])``.

    The unembedding and log-softmax run over chunks of positions of at most ``chunk_bytes`` of float32 logits
    each (a whole [B, T, 262144] logit array would take gigabytes). ``replace`` and ``attention_mask`` are as in
    `forward`; entries whose target is padding are computed but meaningless (mask them).
    """
    x, _ = _run_trunk(params, cfg, tokens, (), replace, attention_mask, all_layers=True)
    b, t, d = x.shape
    hidden = x[:, :-1].reshape(-1, d)
    targets = tokens[:, 1:].reshape(-1)
    n = hidden.shape[0]
    chunk = max(1, min(n, chunk_bytes // (4 * cfg.vocab_size)))
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    targets = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    model = Transformer(cfg)

    def chunk_nll(args):
        h, y = args
        logits = model.apply({"params": params}, h, method=Transformer.decode).astype(jnp.float32)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]

    nll = jax.lax.map(chunk_nll, (hidden, targets))
    return nll.reshape(-1)[:n].reshape(b, t - 1)
