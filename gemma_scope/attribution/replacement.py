"""The local replacement model of one prompt and its linear map (Ameisen et al. 2025, "Circuit Tracing", §2.3-2.4,
transformer-circuits.pub/2025/attribution-graphs/methods.html; circuit-tracer's ``ReplacementModel``).

Every ``mlp.ℓ`` is replaced by the transcoders' prediction plus an error node (the model's ``mlp.ℓ`` minus the
prediction), the attention patterns and the RMSNorm inverse RMS are frozen at their values on the prompt, and the
latents' activations become inputs. The map

    (token embeddings [T, d], active latents' activations [A], error vectors [n, T, d])
        -> (active latents' pre-activations [A], the top logits minus the mean logit [K])

is then affine; its vjp gives the direct effects (edges), and at the prompt's inputs its outputs are the model's.

**Transcoders** (``tc``), the cross-layer layout of ``gemma_scope.sae.crosslayer`` over every layer of the model
(n = num_layers): ``W_enc [n, d, F]``, ``b_enc [n, F]``, ``threshold [n, F]``, ``b_dec [n, d]``, optional
``W_skip [n, d, d]``, and ``W_dec`` either ``[n, F, n, d]`` (a CLT: source layer i writes to every layer j ≥ i
through ``W_dec[i, :, j]``) or ``[n, F, d]`` (a set of per-layer transcoders: the diagonal ``W_dec[i, :, i]``).

Three choices, all circuit-tracer's:

- **The affine skip** ``mlp_in.j @ W_skip[j]`` is part of the linear map, not a node: direct effects flow through it.
- **BOS** (position 0): no latent nodes and no error node there; its MLP output is a constant of the map.
- **Logit nodes** are the ``K`` most probable next tokens at the last position (at most ``max_logits``, stopping
  once their probabilities sum to ``logit_probability``), each as its logit minus the mean logit over the vocabulary
  (so the direction read is ``E_k − mean(E)`` after the frozen final norm). Ours are taken before Gemma 2's final
  softcap (Gemma 3 has none), which no freezing makes linear.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope import model
from gemma_scope.model.layers import RMSNorm
from gemma_scope.sae import crosslayer
from gemma_scope.sites import Site


def is_clt(tc: dict) -> bool:
    """True for a CLT (``W_dec [n, F, n, d]``), False for per-layer transcoders (``W_dec [n, F, d]``).

    Raises:
      ValueError: ``W_dec`` of another rank.
    """
    rank = tc["W_dec"].ndim
    if rank not in (3, 4):
        raise ValueError(f"transcoders' W_dec has rank {rank}; expected [n, F, d] (per layer) or [n, F, n, d] (CLT)")
    return rank == 4


def predict(tc: dict, x: jax.Array, f: jax.Array) -> jax.Array:
    """The transcoders' prediction of ``mlp`` ``[n, T, d]`` float32 from ``mlp_in`` ``x [n, T, d]`` and latents
    ``f [n, T, F]``: ``Σ_{i ≤ j} f_i @ W_dec[i, :, j] + b_dec[j] (+ x_j @ W_skip[j])``."""
    if is_clt(tc):
        out = crosslayer.clt_decode(tc, f)
    else:
        out = jnp.einsum("ntf,nfd->ntd", f, tc["W_dec"]) + tc["b_dec"][:, None, :]
    if "W_skip" in tc:
        out = out + jnp.einsum("ntd,nde->nte", x.astype(jnp.float32), tc["W_skip"])
    return out


def logit_nodes(last_logits: np.ndarray, max_logits: int, logit_probability: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [K], probabilities [K]) of the logit nodes: the most probable tokens, at most ``max_logits``, up to
    and including the first at which their cumulative probability reaches ``logit_probability`` (circuit-tracer's
    ``desired_logit_prob``)."""
    logits = np.asarray(last_logits, np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:max_logits]
    keep = min(len(top), int(np.searchsorted(np.cumsum(probs[top]), logit_probability)) + 1)
    return top[:keep].astype(np.int32), probs[top[:keep]].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt through the model and the transcoders: device arrays, and the host's node lists.

    tokens int32 [T] (BOS first); frozen: the pass's norm scalings and patterns (`model.forward`); embeddings
    [T, d]; mlp_in, errors, const [n, T, d] (const: ``b_dec`` at every position, the whole MLP output less the skip
    at BOS); latents [n, T, F] (zero at BOS); last_logits float32 [vocab]; active int32 [A, 3] rows
    (layer, position, latent) sorted; activations float32 [A]; logit_tokens int32 [K], logit_probs float32 [K].
    """

    tokens: jax.Array
    frozen: dict
    embeddings: jax.Array
    mlp_in: jax.Array
    errors: jax.Array
    const: jax.Array
    latents: jax.Array
    last_logits: jax.Array
    active: np.ndarray
    activations: np.ndarray
    logit_tokens: np.ndarray
    logit_probs: np.ndarray


def _mlp_sites(n: int) -> list[Site]:
    return [Site(kind, layer) for layer in range(n) for kind in ("mlp_in", "mlp")]


@functools.partial(jax.jit, static_argnums=1)
def _pass(params: dict, cfg: model.Config, tc: dict, tokens: jax.Array):
    out = model.forward(params, cfg, tokens[None], capture=_mlp_sites(cfg.num_layers), record_frozen=True)
    x = jnp.stack([out.acts[Site("mlp_in", j)][0] for j in range(cfg.num_layers)]).astype(jnp.float32)
    y = jnp.stack([out.acts[Site("mlp", j)][0] for j in range(cfg.num_layers)]).astype(jnp.float32)
    f = crosslayer.clt_encode(tc, x).at[:, 0].set(0.0)
    residue = y - predict(tc, x, f)  # the error everywhere; at BOS it joins the constant
    errors = residue.at[:, 0].set(0.0)
    const = jnp.broadcast_to(tc["b_dec"][:, None, :], y.shape).at[:, 0].add(residue[:, 0])
    embeddings = params["embedder"]["input_embedding"][tokens] * jnp.sqrt(cfg.d_model).astype(jnp.float32)
    return out.frozen, embeddings.astype(jnp.float32), x, errors, const, f, out.logits[0, -1].astype(jnp.float32)



def prepare(params: dict, cfg: model.Config, tc: dict, tokens, max_logits: int = 10,
            logit_probability: float = 0.95, targets: list[int] | None = None) -> Prompt:
    """Runs the model once on ``tokens`` (int [T], BOS first) with the transcoders beside it: see `Prompt`. The
    logit nodes are `logit_nodes`, or the token ids ``targets`` (with their probabilities) when given.

    Raises:
      ValueError: transcoders that do not cover the model's layers or d_model, or tokens that are not 1-D.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 1 or tokens.shape[0] < 2:
        raise ValueError(f"tokens must be int [T] with BOS first and T >= 2, got shape {tokens.shape}")
    n, d = tc["W_enc"].shape[:2]
    if (n, d) != (cfg.num_layers, cfg.d_model):
        raise ValueError(f"transcoders cover {n} layers of width {d}; the model has {cfg.num_layers} layers of "
                         f"d_model {cfg.d_model}")
    frozen, embeddings, x, errors, const, f, last = _pass(params, cfg, tc, tokens)
    active = np.argwhere(np.asarray(f) > 0).astype(np.int32)
    values = np.asarray(f)[tuple(active.T)].astype(np.float32)
    logit_tokens, logit_probs = logit_nodes(np.asarray(last), max_logits, logit_probability)
    if targets is not None:
        probs = np.asarray(jax.nn.softmax(last))
        logit_tokens, logit_probs = np.asarray(targets, np.int32), probs[np.asarray(targets)].astype(np.float32)
    return Prompt(tokens, frozen, embeddings, x, errors, const, f, last, active, values, logit_tokens, logit_probs)


def linear_map(params: dict, cfg: model.Config, tc: dict, prompt: Prompt):
    """The affine map of the module docstring for ``prompt``: ``fn(embeddings [T, d], activations [A],
    errors [n, T, d]) -> float32 [A + K]`` (the active latents' pre-activations in ``prompt.active`` order, then
    the logit nodes' logits minus the mean logit). At ``(prompt.embeddings, prompt.activations, prompt.errors)``
    it gives the model's values; traceable (jit / vjp it)."""
    n, clt = cfg.num_layers, is_clt(tc)
    layer, pos, idx = (jnp.asarray(c) for c in prompt.active.T)
    bounds = np.searchsorted(prompt.active[:, 0], np.arange(n + 1)).tolist()
    w_dec = tc["W_dec"][layer, idx]  # [A, n, d] (CLT) or [A, d]
    if clt:
        w_dec = w_dec * crosslayer.causal_mask(n)[prompt.active[:, 0]][:, :, None]
    enc = tc["W_enc"][layer, :, idx]  # [A, d]
    b_enc = tc["b_enc"][layer, idx]
    unembed = params["embedder"]["input_embedding"]
    logit_dirs = (unembed[prompt.logit_tokens] - unembed.mean(axis=0)).astype(jnp.float32)  # [K, d]
    frozen_final = prompt.frozen[model.frozen_key(None, "final_norm")][0]

    def fn(embeddings, activations, errors):
        seen = {}

        def keep(j):
            def read(x):
                seen[j] = x[0].astype(jnp.float32)
                return x
            return read

        def write(j):
            def replace(_):
                out = prompt.const[j] + errors[j]
                if "W_skip" in tc:
                    out = out + seen[j] @ tc["W_skip"][j]
                first, last = (0, bounds[j + 1]) if clt else (bounds[j], bounds[j + 1])
                if last > first:
                    rows = w_dec[first:last, j] if clt else w_dec[first:last]
                    out = out.at[pos[first:last]].add(activations[first:last, None] * rows)
                return out[None]
            return replace

        replace = {Site("mlp_in", j): keep(j) for j in range(n)} | {Site("mlp", j): write(j) for j in range(n)}
        final = Site("res", n - 1)
        res = model.forward(params, cfg, prompt.tokens[None], capture=[final], replace=replace,
                            embeddings=embeddings[None], frozen=prompt.frozen, logits=False).acts[final][0]
        pre = [jnp.sum(seen[j][pos[bounds[j]:bounds[j + 1]]] * enc[bounds[j]:bounds[j + 1]], axis=-1)
               for j in range(n)]
        normed = RMSNorm(cfg.norm_eps).apply({"params": params["final_norm"]}, res[-1],
                                             lambda _: jax.lax.stop_gradient(frozen_final[-1]))
        return jnp.concatenate([jnp.concatenate(pre) + b_enc, logit_dirs @ normed.astype(jnp.float32)])

    return fn


def rerun(params: dict, cfg: model.Config, tc: dict, prompt: Prompt, clamps=()) -> jax.Array:
    """The replacement model's next-token logits float32 [vocab] with latents clamped: ``clamps`` lists
    (layer, latent, value), each setting that latent to value at every position but BOS.

    The latents are recomputed from each layer's ``mlp_in`` (JumpReLU), the error nodes and the BOS constant are
    held at their values on the prompt, and the attention patterns and norm scalings stay frozen (circuit-tracer's
    interventions on the local replacement model with frozen attention). Without clamps it gives the model's
    logits.

    Raises:
      ValueError: a layer or latent out of range.
    """
    n, width = tc["W_enc"].shape[0], tc["W_enc"].shape[2]
    for layer, latent, _ in clamps:
        if not (0 <= layer < n and 0 <= latent < width):
            raise ValueError(f"clamp {layer}:{latent} is out of range: layers 0..{n - 1}, latents 0..{width - 1}")
    clt, latents, inputs = is_clt(tc), {}, {}

    def encode(j):
        def read(x):
            f = crosslayer.clt_encode({k: tc[k][j:j + 1] for k in ("W_enc", "b_enc", "threshold")}, x)
            f = f.at[0, 0].set(0.0)
            for layer, latent, value in clamps:
                f = f.at[0, 1:, latent].set(value) if layer == j else f
            latents[j], inputs[j] = f[0], x[0].astype(jnp.float32)
            return x
        return read

    def decode(j):
        def replace(x):
            out = prompt.const[j] + prompt.errors[j]
            if "W_skip" in tc:
                out = out + inputs[j] @ tc["W_skip"][j]
            if clt:
                out = out + sum(latents[i] @ tc["W_dec"][i, :, j] for i in range(j + 1))
            else:
                out = out + latents[j] @ tc["W_dec"][j]
            return out[None]
        return replace

    replace = {Site("mlp_in", j): encode(j) for j in range(n)} | {Site("mlp", j): decode(j) for j in range(n)}
    return model.forward(params, cfg, prompt.tokens[None], replace=replace, frozen=prompt.frozen).logits[0, -1]
