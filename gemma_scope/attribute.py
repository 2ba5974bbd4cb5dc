"""Attribution graph of a prompt through transcoders, pruned, written as circuit-tracer's JSON and an offline view.

    python -m gemma_scope.attribute --transcoders=DIR --model=gemma3_270m --prompt=TEXT --out=DIR
        [--target=TOKEN] [--node_threshold=0.8 --edge_threshold=0.98] [--max_logits=10 --logit_probability=0.95]
        [--max_feature_nodes=7500 --batch_size=64] [--browse=DIR] [--intervene=LAYER:LATENT:VALUE[,...]]

``DIR`` holds one transcoder per layer of the model (``mlp_in.L -> mlp.L``, any layout ``gemma_scope.release``
reads, e.g. our Gemma Scope 2 ``transcoder_all/``). The graph is the one of Ameisen et al. 2025 ("Circuit
Tracing") on the local replacement model (``gemma_scope.attribution``). ``--out`` gets ``<slug>.json`` and
``graph-metadata.json`` (circuit-tracer's frontend and Neuronpedia read them) and ``index.html`` (opens from disk).
``--intervene`` reruns the prompt in the replacement model with those latents clamped at every position but BOS
and prints the top next tokens before and after.
"""

from __future__ import annotations

import collections
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope import cli, model, release
from gemma_scope.attribution import graph as graphs
from gemma_scope.attribution import graph_json, replacement, view
from gemma_scope.sites import Site


def load_transcoders(path: str | pathlib.Path, num_layers: int) -> dict[str, jax.Array]:
    """Per-layer transcoders under ``path`` stacked into `replacement`'s layout (``W_dec [n, F, d]``; ``W_skip``
    zero for layers without one when any has one), or the one CLT directory ``path`` names or holds (Gemma Scope
    2's or circuit-tracer's layout; ``W_dec [n, F, n, d]``).

    Raises:
      FileNotFoundError: nothing SAE-like under path. ValueError: an SAE that is not a transcoder, a layer with
      several transcoders or none, or widths that differ between layers; a crosscoder, several CLTs, a CLT mixed
      with transcoders or one that does not cover every layer; bad CLT files (``release.load_crosslayer``).
    """
    found = release.find_saes(path)
    multi = [p for p in found if p.is_dir()]
    if multi:
        if len(found) > 1:
            raise ValueError(f"{path} holds {len(found)} dictionaries ({', '.join(map(str, found))}); attribution "
                             "takes one CLT or one transcoder per layer")
        params, info = release.load_crosslayer(multi[0], n_layers=num_layers)
        if info["kind"] != "clt":
            raise ValueError(f"{multi[0]} is a {info['kind']}; attribution takes transcoders or a CLT")
        missing = sorted(set(range(num_layers)) - set(info["layers"]))
        if missing:
            raise ValueError(f"the CLT {multi[0]} has no encoder for layer(s) {', '.join(map(str, missing))}; "
                             f"attribution needs every layer 0..{num_layers - 1}")
        return {key: jnp.asarray(value, jnp.float32) for key, value in params.items()}
    by_layer = collections.defaultdict(list)
    for file in found:
        info = release.sae_info(file)
        if info["site"] is None or info["site"] == info["site_out"] or not info["site"].startswith("mlp_in."):
            raise ValueError(f"{file} is not a transcoder (it reads {info['site']}, predicts {info['site_out']}); "
                             f"expected mlp_in.L -> mlp.L")
        by_layer[Site.parse(info["site"]).layer].append(file)
    missing = [layer for layer in range(num_layers) if layer not in by_layer]
    if missing:
        raise ValueError(f"no transcoder for layer(s) {', '.join(map(str, missing))} under {path}; attribution needs "
                         f"one for every layer 0..{num_layers - 1}")
    several = {layer: files for layer, files in by_layer.items() if len(files) > 1}
    if several:
        layer, files = min(several.items())
        raise ValueError(f"layer {layer} has {len(files)} transcoders under {path} ({', '.join(map(str, files))}); "
                         f"pass a directory with one per layer")
    loaded = [release.load_params(by_layer[layer][0]) for layer in range(num_layers)]
    widths = {p["W_enc"].shape[1] for p in loaded}
    if len(widths) > 1:
        raise ValueError(f"transcoders under {path} have different widths {sorted(widths)}; expected one width")
    keys = ["W_enc", "b_enc", "threshold", "W_dec", "b_dec"]
    tc = {key: np.stack([p[key] for p in loaded]) for key in keys}
    if any("W_skip" in p for p in loaded):
        d = tc["W_enc"].shape[1]
        tc["W_skip"] = np.stack([p.get("W_skip", np.zeros((d, d), np.float32)) for p in loaded])
    return {key: jnp.asarray(value, jnp.float32) for key, value in tc.items()}


def parse_clamps(text: str) -> list[tuple[int, int, float]]:
    """``"LAYER:LATENT:VALUE,..."`` -> [(layer, latent, value)]. Raises ValueError naming the bad entry."""
    clamps = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.split(":")
        try:
            layer, latent, value = int(parts[0]), int(parts[1]), float(parts[2])
            assert len(parts) == 3
        except (ValueError, IndexError, AssertionError):
            raise ValueError(f"--intervene entry {entry!r} is not LAYER:LATENT:VALUE (e.g. 8:123:0)") from None
        clamps.append((layer, latent, value))
    return clamps


def top_tokens(logits, piece, k: int = 5) -> str:
    """``'Paris' 0.41, ...``: the k most probable next tokens."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
    return ", ".join(f"{piece(int(i))!r} {probs[i]:.3f}" for i in np.argsort(-probs)[:k])


def main(argv: list[str] | None = None) -> dict:
    """``python -m gemma_scope.attribute``: writes the graph and prints a summary; returns it as a dict."""
    parser = cli.parser("python -m gemma_scope.attribute", __doc__.split("\n\n")[0])
    parser.add_argument("--transcoders", required=True, help="directory with one transcoder per layer")
    parser.add_argument("--prompt", required=True, help="text to attribute (BOS is prepended)")
    parser.add_argument("--out", required=True, help="directory for the graph JSON and the view")
    parser.add_argument("--model", default="gemma3_270m", help="registry name (gemma3_270m), HF dir or orbax path")
    parser.add_argument("--target", help="attribute this next token's logit (one token) instead of the top ones")
    parser.add_argument("--node_threshold", type=float, default=0.8, help="share of influence the kept nodes hold")
    parser.add_argument("--edge_threshold", type=float, default=0.98, help="share of influence the kept edges hold")
    parser.add_argument("--max_logits", type=int, default=10, help="at most this many logit nodes")
    parser.add_argument("--logit_probability", type=float, default=0.95, help="logit nodes until this probability")
    parser.add_argument("--batch_size", type=int, default=64, help="targets per backward pass")
    parser.add_argument("--max_feature_nodes", type=int, default=7500,
                        help="attribute at most this many latents, by influence on the logits (circuit-tracer's "
                             "CLI default 7500); 0 or fewer: every active latent")
    parser.add_argument("--slug", default="graph", help="the graph's name in circuit-tracer's files")
    parser.add_argument("--browse", help="gemma_scope.browse output per layer (DIR/layer_L/) for latents' contexts")
    parser.add_argument("--intervene", help="LAYER:LATENT:VALUE[,...]: clamp latents and print the top tokens")
    args = parser.parse_args(argv)
    for name in ("node_threshold", "edge_threshold", "logit_probability"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if args.max_logits < 1 or args.batch_size < 1:
        parser.error(f"--max_logits and --batch_size must be >= 1 (got {args.max_logits}, {args.batch_size})")
    clamps = parse_clamps(args.intervene) if args.intervene else []
    start = time.perf_counter()
    lm = model.load(args.model)
    tc = load_transcoders(args.transcoders, lm.config.num_layers)
    tok = lm.tokenizer
    tokens = [tok.bos_id] + tok.encode(args.prompt)
    targets = None
    if args.target is not None:
        targets = tok.encode(args.target)
        if len(targets) != 1:
            raise ValueError(f"--target {args.target!r} is {len(targets)} tokens; expected exactly one")
    prompt = replacement.prepare(lm.params, lm.config, tc, tokens, args.max_logits, args.logit_probability, targets)
    limit = args.max_feature_nodes if args.max_feature_nodes > 0 else None
    graph = graphs.attribute(lm.params, lm.config, tc, prompt, args.batch_size, limit, progress=True)
    node_mask, edge_mask, cumulative = graphs.prune(graph, args.node_threshold, args.edge_threshold)
    replacement_score, completeness = graphs.scores(graph)
    piece = lambda i: tok.decode([i])  # noqa: E731
    scan = f"{lm.config.name}-{pathlib.Path(args.transcoders).name}"
    doc = graph_json.graph_model(graph, node_mask, edge_mask, cumulative, piece, args.prompt, args.slug, scan,
                                 args.node_threshold)
    path = graph_json.write_graph_files(args.out, doc)
    view.write_view(args.out, doc, view.latent_contexts(args.browse, doc) if args.browse else None)
    summary = {"graph": str(path), "view": str(pathlib.Path(args.out) / "index.html"), "tokens": len(tokens),
               "active_latents": graph.num_active, "latents_attributed": len(graph.active),
               "nodes_kept": len(doc["nodes"]), "edges_kept": len(doc["links"]),
               "replacement_score": round(replacement_score, 4), "completeness_score": round(completeness, 4),
               "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary))
    if clamps:
        before = replacement.rerun(lm.params, lm.config, tc, prompt)
        after = replacement.rerun(lm.params, lm.config, tc, prompt, clamps)
        print(f"top next tokens, replacement model:  {top_tokens(before, piece)}")
        print(f"with {args.intervene}:  {top_tokens(after, piece)}")
        summary["intervention"] = {"before": np.asarray(before), "after": np.asarray(after)}
    return summary


if __name__ == "__main__":
    cli.run(main)
