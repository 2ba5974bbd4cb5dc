"""circuit-tracer's own pruning, scores and graph JSON on one of our graphs, for tests/test_attribution.py; run with
a Python that has circuit-tracer (and torch) installed:

    python tests/_circuit_tracer_graph.py GRAPH.npz OUR_JSON OUT_JSON

GRAPH.npz holds our `Graph`'s arrays and the pruning thresholds; it writes circuit-tracer's node and edge masks,
cumulative influence, (replacement, completeness) scores and its frontend ``Model`` (with the token pieces
``t<id>``), and checks that its pydantic ``Model`` reads OUR_JSON.
"""

import json
import sys
import types

import numpy as np
import torch
from circuit_tracer.attribution.targets import LogitTarget
from circuit_tracer.frontend import graph_models
from circuit_tracer.frontend.utils import add_graph_metadata  # noqa: F401  (the module the writer uses)
from circuit_tracer.graph import compute_graph_scores, prune_graph
from circuit_tracer.utils.create_graph_files import build_model, create_nodes, create_used_nodes_and_edges

data = np.load(sys.argv[1])
tokens = torch.tensor(data["tokens"])
graph = types.SimpleNamespace(
    input_string="p", input_tokens=tokens, n_pos=len(tokens), adjacency_matrix=torch.tensor(data["adjacency"]),
    active_features=torch.tensor(data["active"]), selected_features=torch.arange(len(data["active"])),
    activation_values=torch.tensor(data["activations"]), logit_probabilities=torch.tensor(data["logit_probs"]),
    logit_targets=[LogitTarget(f"t{int(i)}", int(i)) for i in data["logit_tokens"]],
    cfg=types.SimpleNamespace(n_layers=int(data["num_layers"])))
node_threshold, edge_threshold = float(data["node_threshold"]), float(data["edge_threshold"])
node_mask, edge_mask, cumulative = prune_graph(graph, node_threshold, edge_threshold)
replacement, completeness = compute_graph_scores(graph)
tokenizer = types.SimpleNamespace(decode=lambda t: f"t{int(t)}")
nodes = create_nodes(graph, node_mask, tokenizer, cumulative)
used_nodes, used_edges = create_used_nodes_and_edges(graph, nodes, edge_mask)
model = build_model(graph, used_nodes, used_edges, "graph", "scan", node_threshold, tokenizer)
with open(sys.argv[2]) as f:
    ours = graph_models.Model.model_validate_json(f.read())
json.dump({"node_mask": node_mask.tolist(), "edge_mask": np.flatnonzero(edge_mask.numpy()).tolist(),
           "cumulative": cumulative.tolist(), "scores": [replacement, completeness],
           "model": json.loads(model.model_dump_json()), "ours_nodes": len(ours.nodes)}, open(sys.argv[3], "w"))
