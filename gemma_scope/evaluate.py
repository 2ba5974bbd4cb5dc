"""Evaluate SAEs and transcoders as Gemma Scope does (arXiv 2408.05147 §4, App. C): L0, FVU, delta LM loss, by
position.

All metrics use folded (release-convention) params on raw activations (``gemma_scope.sae.predict``). An SAE
reconstructs the site it reads; a transcoder reads ``mlp_in.L`` and predicts ``mlp.L``, and its FVU, MSE and
splice are of that output (Gemma Scope 2). A cross-layer transcoder or crosscoder directory (Gemma Scope 2's or
circuit-tracer's, ``release.load_crosslayer``) is evaluated with ``--model`` as the whole replacement and each
layer alone (``evaluation.crosslayer``), one JSON line each.

- L0, FVU, MSE, firing frequencies: ``evaluation.reconstruction`` (on cached activations, or on the sites'
  activations of the evaluation's own forward passes).
- Delta LM loss (``evaluation.splice``): next-token cross-entropy with the reconstruction spliced in at the site
  minus the clean one, masked means over real content targets (BOS/EOS/pad excluded).

Command line::

    python -m gemma_scope.evaluate --sae=PATH/params.npz --activations=DIR            # one JSON line per SAE
    python -m gemma_scope.evaluate --sae=RELEASE_ROOT --model=gemma3_270m --site=res.6 --out=DIR
    python -m gemma_scope.evaluate --sae=RELEASE_ROOT --model=gemma3_270m --by_source --num_sequences=8 \
        --seq_len=256 [--split=train]                  # one JSON line per SAE and corpus source
"""

from __future__ import annotations

from gemma_scope import cli, release
from gemma_scope.evaluation.releases import by_source, evaluate_saes


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m gemma_scope.evaluate``: prints one JSON line of metrics per SAE; returns the records."""
    parser = cli.parser("python -m gemma_scope.evaluate", __doc__.split("\n\n")[0])
    parser.add_argument("--sae", action="append", required=True,
                        help="params.npz, SAE directory or release root; repeatable")
    parser.add_argument("--activations", help="directory of cached activation shards (*.npy [tokens, d], see gemma_scope.activations)")
    parser.add_argument("--max_tokens", type=int, help="evaluate on at most this many cached activations")
    parser.add_argument("--batch_size", type=int, help="activations per jitted batch (default: by SAE width)")
    parser.add_argument("--model", help="LM for delta LM loss: a registry name (gemma3_270m), HF dir or orbax path")
    parser.add_argument("--model_config", help="architecture name of an orbax checkpoint whose shapes are ambiguous")
    parser.add_argument("--site", help="site to splice at, e.g. res.6 (default: from the SAE's release path)")
    parser.add_argument("--corpus", help="built corpus directory (default: $GEMMA_SCOPE_CORPUS or ./corpus)")
    parser.add_argument("--packing", default="packed", choices=("packed", "document"),
                        help="held-out sequence layout (gemma_scope.data.reader)")
    parser.add_argument("--num_sequences", type=int, default=64, help="held-out sequences (paper: 2048)")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (paper: 1024)")
    parser.add_argument("--lm_batch_size", type=int, default=8, help="sequences per LM batch")
    parser.add_argument("--whole_only", action="store_true",
                        help="CLTs and crosscoders: splice only the whole dictionary, not also each layer alone")
    parser.add_argument("--out", help="directory for metrics.json, report.md and plots")
    parser.add_argument("--by_source", action="store_true",
                        help="with --model: metrics per corpus source, --num_sequences of each source's documents")
    parser.add_argument("--no_splice", action="store_true",
                        help="with --by_source: L0 and FVU only (no LM loss; one forward pass to the site per batch)")
    parser.add_argument("--split", default="heldout", choices=("heldout", "train", "ood"),
                        help="corpus split for --by_source (default heldout)")
    args = parser.parse_args(argv)
    if not (args.activations or args.model):
        parser.error("give --activations=DIR (cached activations) and/or --model=NAME (delta LM loss)")
    sae_paths = [p for spec in args.sae for p in release.find_saes(spec)]
    if args.by_source:
        if not args.model:
            parser.error("--by_source needs --model=NAME")
        return by_source(sae_paths, args.model, site=args.site, corpus=args.corpus, split=args.split,
                         num_sequences=args.num_sequences, seq_len=args.seq_len, packing=args.packing,
                         lm_batch_size=args.lm_batch_size, model_config=args.model_config,
                         splice=not args.no_splice)
    return evaluate_saes(sae_paths, model_name=args.model, model_config=args.model_config, site=args.site, corpus=args.corpus, packing=args.packing,
                         num_sequences=args.num_sequences, seq_len=args.seq_len, lm_batch_size=args.lm_batch_size,
                         activations=args.activations, max_tokens=args.max_tokens, batch_size=args.batch_size,
                         out=args.out, layers_alone=not args.whole_only)


if __name__ == "__main__":
    cli.run(main)
