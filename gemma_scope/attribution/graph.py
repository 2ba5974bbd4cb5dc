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
from gemma_scope.attribution import backward
from gemma_scope.attribution.replacement import Prompt, linear_map


@dataclasses.dataclass
class Graph:
    """An attribution graph (module docstring). tokens int [T]; active int [A, 3]; activations float32 [A];
    logit_tokens int [K]; logit_probs float32 [K]; adjacency float32 [N, N], N = A + n·T + T + K; values and bias
    float32 [A + K] (targets' values and the map's value at zero inputs); num_layers n; num_active: the
    prompt's active latents, of which ``active`` holds those attributed (all of them unless ``max_feature_nodes``)."""

    tokens: np.ndarray
    active: np.ndarray
    activations: np.ndarray
    logit_tokens: np.ndarray
    logit_probs: np.ndarray
    adjacency: np.ndarray
    values: np.ndarray
    bias: np.ndarray
    num_layers: int
    num_active: int | None = None

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """(latents A, error nodes n·T, tokens T, logits K)."""
        t = len(self.tokens)
        return len(self.active), self.num_layers * t, t, len(self.logit_tokens)


def attribute(params: dict, cfg: model.Config, tc: dict, prompt: Prompt, batch_size: int = 64,
              max_feature_nodes: int | None = None, update_interval: int = 16, progress: bool = False) -> Graph:
    """The unpruned graph of ``prompt``, rows from `backward.rows` in jitted batches of ``batch_size`` targets (the
    last padded), in circuit-tracer's order (its ``attribute``): the logit nodes' rows first, then the latents'.

    With ``max_feature_nodes`` (M) below the number of active latents A, only M latents get rows: the unvisited
    ones in decreasing partial influence on the logits, i.e. the influence of the row-normalised |adjacency|
    over the rows computed so far, re-ranked every ``update_interval`` batches (default 16 × 64 rows:
    circuit-tracer's CLI re-ranks every 4 batches of 256). The graph then holds those M latents alone (their rows
    and columns; the unvisited latents' edges into them are dropped, as in circuit-tracer), so its completeness
    and pruning see a smaller graph. With M ≥ A (or None) every latent gets
    its row and the graph is the full one. Deviation: we sum the influence in one pass over the rows in
    decreasing target layer (the graph is layered) instead of circuit-tracer's power iteration; the same sum in
    another float32 order. Within each ranked queue the rows run sorted by layer, so that each batch's sweep is
    only as deep as its deepest target; which latents a queue holds is circuit-tracer's choice for the same queue
    length (``update_interval × batch_size`` rows), up to ties that the float order can break differently.

    Raises:
      ValueError: ``batch_size`` or ``update_interval`` < 1, or ``max_feature_nodes`` < 0.
    """
    if batch_size < 1 or update_interval < 1:
        raise ValueError(f"batch_size and update_interval must be >= 1, got {batch_size}, {update_interval}")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ValueError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}")
    a, k, t, n = len(prompt.active), len(prompt.logit_tokens), prompt.tokens.shape[0], cfg.num_layers
    limit = a if max_feature_nodes is None else min(max_feature_nodes, a)
    wanted, arrays = backward.targets(params, cfg, tc, prompt), backward.held(params, cfg, tc, prompt)
    sources = a + n * t + t
    table = np.zeros((limit + k, sources), np.float32)  # rows in the order computed
    row_target, row_sum = np.zeros(limit + k, np.int64), np.zeros(limit + k, np.float32)
    filled = 0
    bar = tqdm.tqdm(total=limit + k, desc="attribution", unit="row", disable=not progress)

    def run(ids):
        nonlocal filled
        chunks, outs = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)], []
        for chunk in chunks:  # dispatched ahead: the host copies one batch's rows while the next computes
            pad = np.full(batch_size - len(chunk), 0)
            layer = np.concatenate([wanted.layer[chunk], pad - 1])  # layer -1: a zero row
            position = np.concatenate([wanted.position[chunk], pad])
            outs.append(backward.rows(cfg, arrays, jnp.asarray(layer), jnp.asarray(position),
                                      wanted.direction[jnp.asarray(np.concatenate([chunk, pad]))]))
        for chunk, out in zip(chunks, outs):
            table[filled:filled + len(chunk)] = np.asarray(out)[:len(chunk)]
            row_target[filled:filled + len(chunk)] = chunk
            row_sum[filled:filled + len(chunk)] = np.abs(table[filled:filled + len(chunk)]).sum(axis=1)
            filled += len(chunk)
            bar.update(len(chunk))

    run(a + np.arange(k))
    visited = np.zeros(a, bool)
    while visited.sum() < limit:
        if limit == a:
            pending = np.arange(a)
        else:
            influence = _partial_influence(table[:filled], row_target[:filled], row_sum[:filled], wanted.layer,
                                           prompt.logit_probs, a)
            rank = np.argsort(-influence[:a], kind="stable")
            pending = rank[~visited[rank]][:min(update_interval * batch_size, limit - int(visited.sum()))]
            pending = pending[np.argsort(wanted.layer[pending], kind="stable")]
        run(pending)
        visited[pending] = True
    bar.close()
    selected = np.flatnonzero(visited)
    row_of = np.zeros(a + k, np.int64)
    row_of[row_target] = np.arange(limit + k)
    columns = np.concatenate([selected, np.arange(a, sources)])
    size = limit + n * t + t + k
    adjacency = np.zeros((size, size), np.float32)
    for start, rows in ((0, row_of[selected]), (size - k, row_of[a:])):
        for i in range(0, len(rows), 1024):  # in chunks: a bounded temporary beside the two big arrays
            chunk = table[rows[i:i + 1024]]
            adjacency[start + i:start + i + len(chunk), :-k] = chunk if limit == a else chunk[:, columns]
    inputs = (prompt.embeddings, jnp.asarray(prompt.activations), prompt.errors)
    # the model, the transcoders and the prompt's arrays enter as arguments, not as constants of the jit
    mapped = jax.jit(lambda held, *x: linear_map(held[0], cfg, held[1], dataclasses.replace(prompt, **held[2]))(*x))
    held = (params, tc, {"frozen": prompt.frozen, "const": prompt.const, "tokens": prompt.tokens})
    keep = np.concatenate([selected, a + np.arange(k)])
    values = np.asarray(mapped(held, *inputs))[keep]
    bias = np.asarray(mapped(held, *(jnp.zeros_like(x) for x in inputs)))[keep]
    return Graph(np.asarray(prompt.tokens), prompt.active[selected], prompt.activations[selected],
                 prompt.logit_tokens, prompt.logit_probs, adjacency, values, bias, n, a)


def _partial_influence(rows: np.ndarray, row_target: np.ndarray, row_sum: np.ndarray, target_layer: np.ndarray,
                       logit_probs: np.ndarray, a: int) -> np.ndarray:
    """circuit-tracer's ``compute_partial_influences`` over the rows computed so far: each source's ``w (Â + Â² +
    …)`` for the row-normalised |rows| Â and the logit probabilities w, summed in one pass from the top layer down
    (a target at layer j reads only sources below j, so its own influence is complete when its layer is reached).
    """
    influence = np.zeros(rows.shape[1], np.float64)
    layer = target_layer[row_target]
    for j in np.unique(layer)[::-1]:
        group = np.flatnonzero(layer == j)
        weight = np.concatenate([influence[:a], logit_probs])[row_target[group]]  # targets: latents, then logits
        influence += (weight / np.maximum(row_sum[group], 1e-8)).astype(np.float32) @ np.abs(rows[group])
    return influence


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
    """The smallest score among the largest ones that together hold ``fraction`` of the total (scores >= 0). Only
    the nonzero scores are sorted: the zeros close the order and add nothing to the cumulative sum, so the result
    is circuit-tracer's ``find_threshold`` over them all."""
    flat = scores.ravel()
    ordered = np.sort(flat[flat > 0])[::-1]
    cumulative = np.cumsum(ordered, dtype=np.float64) / max(float(ordered.sum(dtype=np.float64)), 1e-30)
    index = int(np.searchsorted(cumulative, fraction))
    if index >= len(ordered):  # past the nonzero scores: the last score overall, a zero if there is one
        return 0.0 if len(ordered) < flat.size or not len(ordered) else float(ordered[-1])
    return float(ordered[index])


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
