"""The offline view of a pruned attribution graph: HTML/CSS/JS (``attribution/view/``) that opens from disk, as
the feature browser does; the graph goes in a JavaScript file (browsers do not fetch JSON from ``file://``).

Nodes are drawn by layer (rows: embeddings, layers 0..n−1, logits) and position (columns), edges by weight
(blue positive, red negative, width ∝ |weight|). Hovering a node lights its edges and lists its strongest inputs,
and, for a latent, its top contexts from ``gemma_scope.browse`` output when given.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from gemma_scope.files import atomic_path

ASSETS = pathlib.Path(__file__).parent / "view"
CONTEXTS_PER_LATENT = 3


def latent_contexts(browse_dir: str | pathlib.Path, doc: dict) -> dict[str, list[dict]]:
    """``{"<layer>_<latent>": [{"text", "act"}]}``: the top contexts of the graph's latents from a directory of
    ``gemma_scope.browse`` sites, one per layer at ``<browse_dir>/layer_<L>/`` (latents without a file are left
    out).

    Raises:
      FileNotFoundError: ``browse_dir`` is not a directory.
      ValueError: a latent file that is not the browser's ``BROWSE.showLatent({...});``.
    """
    browse_dir = pathlib.Path(browse_dir)
    if not browse_dir.is_dir():
        raise FileNotFoundError(f"--browse {browse_dir} is not a directory; expected browse sites at layer_<L>/")
    found = {}
    for node in doc["nodes"]:
        if node["feature_type"] != "cross layer transcoder":
            continue
        layer, latent = node["layer"], node["node_id"].split("_")[1]
        path = browse_dir / f"layer_{layer}" / "data" / "latents" / f"{latent}.js"
        if f"{layer}_{latent}" in found or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8").strip()
        prefix, suffix = "BROWSE.showLatent(", ");"
        if not (text.startswith(prefix) and text.endswith(suffix)):
            raise ValueError(f"{path} is not a feature-browser latent file (BROWSE.showLatent({{...}});)")
        top = json.loads(text[len(prefix):-len(suffix)])["top"][:CONTEXTS_PER_LATENT]
        found[f"{layer}_{latent}"] = [{"text": "".join(c["tokens"]), "act": c["act"]} for c in top]
    return found


def write_view(out: str | pathlib.Path, doc: dict, contexts: dict | None = None) -> pathlib.Path:
    """Writes ``index.html``, ``view.js``, ``style.css`` and ``graph-data.js`` (the graph, ``contexts``) into
    ``out``; returns the path of ``index.html``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("index.html", "view.js", "style.css"):
        shutil.copyfile(ASSETS / name, out / name)
    data = (f"window.GRAPH = {json.dumps(doc, ensure_ascii=False, separators=(',', ':'))};\n"
            f"window.LATENTS = {json.dumps(contexts or {}, ensure_ascii=False, separators=(',', ':'))};\n")
    with atomic_path(out / "graph-data.js") as tmp:
        tmp.write_text(data, encoding="utf-8")
    return out / "index.html"
