"""A pruned attribution graph as the JSON circuit-tracer writes for its graph frontend (``create_graph_files``:
``<slug>.json`` plus ``graph-metadata.json``; the same files Neuronpedia's frontend reads).

The schema is circuit-tracer's ``frontend/graph_models.py`` (``Model``: ``metadata``, ``qParams``, ``nodes``,
``links``). Node ids: latent ``"{layer}_{latent}_{pos}"``, error ``"0_{layer}_{pos}"``, token
``"E_{token id}_{pos}"``, logit ``"{n + 1}_{token id}_{T − 1}"``; a latent's ``feature`` is the Cantor pairing of
(layer, latent). As circuit-tracer does, every latent is typed "cross layer transcoder" (the frontend's only latent
type), nodes are those kept by pruning that touch a kept edge, plus all tokens and logits, and a link is
``{"source", "target", "weight"}`` with the direct effect as weight.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np

from gemma_scope.attribution.graph import Graph
from gemma_scope.files import atomic_path

METADATA_FILE = "graph-metadata.json"


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, pos: int, kind: str, js_id: str, **extra) -> dict:
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id,
            "clerp": "", "influence": None, "activation": None, **extra}


def graph_model(graph: Graph, node_mask: np.ndarray, edge_mask: np.ndarray, cumulative: np.ndarray,
                piece: Callable[[int], str], prompt: str, slug: str, scan: str, node_threshold: float) -> dict:
    """The frontend's ``Model`` as a dict: metadata, qParams, nodes and links of the pruned graph (``prune``'s
    masks and cumulative influence; ``piece`` decodes one token id)."""
    a, errors, t, k = graph.sizes
    nodes = {}
    for i in np.flatnonzero(node_mask).tolist():
        influence = float(cumulative[i])
        if i < a:
            layer, pos, latent = graph.active[i].tolist()
            nodes[i] = _node(f"{layer}_{latent}_{pos}", _cantor(layer, latent), str(layer), pos,
                             "cross layer transcoder", f"{layer}_{latent}-0", influence=influence,
                             activation=float(graph.activations[i]))
        elif i < a + errors:
            layer, pos = divmod(i - a, t)
            nodes[i] = _node(f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error",
                             f"{layer}_{pos}-0", influence=influence)
        elif i < a + errors + t:
            pos, token = i - a - errors, int(graph.tokens[i - a - errors])
            nodes[i] = _node(f"E_{token}_{pos}", pos, "E", pos, "embedding", f"E_{token}-{pos}", influence=influence)
        else:
            j = i - a - errors - t
            token, prob, layer = int(graph.logit_tokens[j]), float(graph.logit_probs[j]), str(graph.num_layers + 1)
            nodes[i] = _node(f"{layer}_{token}_{t - 1}", token, layer, t - 1, "logit", f"L_{token}-{t - 1}",
                             token_prob=prob, is_target_logit=j == 0,
                             clerp=f'Output "{piece(token)}" (p={prob:.3f})')
    targets, sources = np.nonzero(edge_mask)
    links = [{"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": float(graph.adjacency[d, s])}
             for d, s in zip(targets.tolist(), sources.tolist()) if s in nodes and d in nodes]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [],
                "prompt_tokens": [piece(int(x)) for x in graph.tokens], "prompt": prompt,
                "node_threshold": node_threshold, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_graph_files(out_dir: str | pathlib.Path, model_dict: dict) -> pathlib.Path:
    """Writes ``<slug>.json`` and adds its metadata to ``graph-metadata.json`` (replacing a graph of the same
    slug), both atomically, as circuit-tracer's ``create_graph_files`` lays them out. Returns the graph's path.

    Raises:
      ValueError: an existing ``graph-metadata.json`` that is not circuit-tracer's ``{"graphs": [...]}``.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model_dict['metadata']['slug']}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(model_dict, indent=2))
    listing = out_dir / METADATA_FILE
    graphs = {"graphs": []}
    if listing.is_file():
        graphs = json.loads(listing.read_text())
        if not isinstance(graphs, dict) or not isinstance(graphs.get("graphs"), list):
            raise ValueError(f"{listing} is not a graph listing; expected {{\"graphs\": [...]}}")
    slug = model_dict["metadata"]["slug"]
    graphs["graphs"] = [g for g in graphs["graphs"] if g.get("slug") != slug] + [model_dict["metadata"]]
    with atomic_path(listing) as tmp:
        tmp.write_text(json.dumps(graphs, indent=2))
    return path
