"""Attribution graphs: nodes, edges from the replacement model's vjp, pruning by influence, and the scores
(Ameisen et al. 2025, "Circuit Tracing", §2.4 and appendix "Graph pruning"; circuit-tracer's ``graph.py``, whose
node order, pruning and scores these follow).

Nodes, in circuit-tracer's order: the A active latents (``active`` rows (layer, position, latent)), the n·T error
nodes (layer-major), the T token embeddings, the K logit nodes. ``adjacency[t, s]`` is the direct effect of source
s on target t: for a latent target, on its pre-activation; for a logit, on the logit minus the mean logit. A
source's effect is its value times the derivative (latent activation, error vector or embedding · gradient); only
latent and logit rows are nonzero. Since the replacement map is affine, a target's row sums to its value less
its ``bias`` (the map at zero inputs: ``b_enc``, the transcoders' ``b_dec`` and BOS's MLP output through the
frozen model).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gemma_scope import model
from gemma_scope.attribution.replacement import Prompt, linear_map


@dataclasses.dataclass
class Graph:
    """An attribution graph (module docstring). tokens int [T]; active int [A, 3]; activations float32 [A];
    logit_tokens int [K]; logit_probs float32 [K]; adjacency float32 [N, N], N = A + n·T + T + K; values and bias
    float32 [A + K] (targets' values and the map's value at zero inputs); num_layers n."""

    tokens: np.ndarray
    active: np.ndarray
    activations: np.ndarray
    logit_tokens: np.ndarray
    logit_probs: np.ndarray
    adjacency: np.ndarray
    values: np.ndarray
    bias: np.ndarray
    num_layers: int

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """(latents A, error nodes n·T, tokens T, logits K)."""
        t = len(self.tokens)
        return len(self.active), self.num_layers * t, t, len(self.logit_tokens)


def attribute(params: dict, cfg: model.Config, tc: dict, prompt: Prompt, batch_size: int = 64,
              progress: bool = False) -> Graph:
    """The unpruned graph of ``prompt``: one jitted vjp of the replacement map per batch of ``batch_size`` targets
    (the last batch padded), on the device; the rows come to the host once.

    Raises:
      ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inputs = (prompt.embeddings, jnp.asarray(prompt.activations), prompt.errors)
    # the model, the transcoders and the prompt's device arrays enter as arguments, not as constants of the jit
    held = (params, tc, prompt.frozen, prompt.const, prompt.tokens)

    def map_of(params, tc, frozen, const, tokens):
        return linear_map(params, cfg, tc, dataclasses.replace(prompt, frozen=frozen, const=const, tokens=tokens))

    @jax.jit
    def rows(held, targets, embeddings, activations, errors):
        out, vjp = jax.vjp(map_of(*held), embeddings, activations, errors)
        g_emb, g_act, g_err = jax.vmap(vjp)(jax.nn.one_hot(targets, out.shape[0], dtype=out.dtype))
        by_error = jnp.sum(g_err * errors, axis=-1).reshape(len(targets), -1)
        return jnp.concatenate([g_act * activations, by_error, jnp.sum(g_emb * embeddings, axis=-1)], axis=1)

    evaluate = jax.jit(lambda held, *x: map_of(*held)(*x))
    values = evaluate(held, *inputs)
    bias = evaluate(held, *(jnp.zeros_like(x) for x in inputs))
    n_targets = values.shape[0]
    order = np.arange(-(-n_targets // batch_size) * batch_size)
    order[n_targets:] = -1  # padding: a zero cotangent, dropped below
    batches = [rows(held, jnp.asarray(order[i:i + batch_size]), *inputs)
               for i in tqdm.trange(0, len(order), batch_size, desc="attribution", unit="batch", disable=not progress)]
    target_rows = np.concatenate([np.asarray(b) for b in batches])[:n_targets]
    a, k = len(prompt.active), len(prompt.logit_tokens)
    adjacency = np.zeros((target_rows.shape[1] + k,) * 2, np.float32)
    adjacency[:a] = np.pad(target_rows[:a], ((0, 0), (0, k)))
    adjacency[-k:] = np.pad(target_rows[a:], ((0, 0), (0, k)))
    return Graph(np.asarray(prompt.tokens), prompt.active, prompt.activations, prompt.logit_tokens,
                 prompt.logit_probs, adjacency, np.asarray(values), np.asarray(bias), cfg.num_layers)


def _normalized(matrix: np.ndarray) -> np.ndarray:
    """|A| with each row scaled to sum to 1 (rows of zeros stay zero)."""
    absolute = np.abs(matrix)
    return absolute / np.maximum(absolute.sum(axis=1, keepdims=True), 1e-10)


def _influence(normalized: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``w (A + A² + …)`` for the row-normalized |adjacency| A (nilpotent: the graph is acyclic)."""
    current = weights @ normalized
    total = current.copy()
    for _ in range(normalized.shape[0]):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise ValueError("the adjacency matrix has a cycle; an attribution graph is acyclic")


def _logit_weights(graph: Graph) -> np.ndarray:
    weights = np.zeros(graph.adjacency.shape[0], np.float32)
    weights[-len(graph.logit_tokens):] = graph.logit_probs
    return weights


def _threshold(scores: np.ndarray, fraction: float) -> float:
    """The smallest score among the largest ones that together hold ``fraction`` of the total."""
    ordered = np.sort(scores.ravel())[::-1]
    cumulative = np.cumsum(ordered, dtype=np.float64) / max(float(ordered.sum(dtype=np.float64)), 1e-30)
    return float(ordered[min(int(np.searchsorted(cumulative, fraction)), len(ordered) - 1)])


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98):
    """Keeps the nodes, then the edges, that carry the given fractions of the influence on the logits
    (circuit-tracer's ``prune_graph`` semantics).

    Node influence is ``p (Â + Â² + …)`` for the logit probabilities p and the row-normalized |adjacency| Â; the
    nodes whose influence is at least the smallest of the most influential ones holding ``node_threshold`` of the
    total are kept, and every token and logit. On the adjacency restricted to them, an edge's score is its
    normalized weight times its target's influence (plus p); edges are kept likewise by ``edge_threshold``. Then
    latents and errors without a kept outgoing edge, and latents without a kept incoming one, are dropped, until
    nothing changes.

    Returns:
      (node_mask bool [N], edge_mask bool [N, N] (target, source), cumulative float32 [N]: each node's cumulative
      share of influence in decreasing order, the rank score circuit-tracer's JSON calls ``influence``).

    Raises:
      ValueError: a threshold outside [0, 1].
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    a, errors, t, k = graph.sizes
    weights = _logit_weights(graph)
    influence = _influence(_normalized(graph.adjacency), weights)
    node_mask = influence >= _threshold(influence, node_threshold)
    node_mask[a + errors:] = True
    pruned = graph.adjacency * node_mask[:, None] * node_mask[None, :]
    normalized = _normalized(pruned)
    scores = normalized * (_influence(normalized, weights) + weights)[:, None]
    edge_mask = scores >= _threshold(scores, edge_threshold)
    sources = a + errors
    while True:
        before = node_mask.copy()
        node_mask[:sources] &= edge_mask[:, :sources].any(axis=0)
        node_mask[:a] &= edge_mask[:a].any(axis=1)
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        if (node_mask == before).all():
            break
    order = np.argsort(-influence, kind="stable")
    cumulative = np.empty_like(influence)
    cumulative[order] = np.cumsum(influence[order]) / max(float(influence.sum()), 1e-30)
    return node_mask, edge_mask, cumulative


def scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score), circuit-tracer's ``compute_graph_scores``.

    Replacement: of the influence on the logits that starts at tokens or error nodes, the tokens' share (1 when
    every path from the input runs through latents). Completeness: the non-error share of each node's normalized
    inputs, averaged with weights (influence + logit probability); 1 when no node reads an error node.
    """
    a, errors, t, k = graph.sizes
    weights = _logit_weights(graph)
    normalized = _normalized(graph.adjacency)
    influence = _influence(normalized, weights)
    token, error = influence[a + errors:a + errors + t].sum(), influence[a:a + errors].sum()
    replacement = token / max(token + error, 1e-30)
    output = influence + weights
    completeness = ((1 - normalized[:, a:a + errors].sum(axis=1)) * output).sum() / output.sum()
    return float(replacement), float(completeness)
