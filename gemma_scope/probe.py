"""k-sparse probing of SAEs on sae-probes' binary datasets (SAEBench's sparse probing, sae-probes' protocol),
against the same probes on the raw activations of the SAE's site.

    python -m gemma_scope.probe --sae=DIR --model=gemma3_270m [--datasets=NAME,...|all] [--k=1,2,5,16] [--out=DIR]

The datasets come from the installed ``sae-probes`` package (``pip install --no-deps sae-probes==0.4.2``, plus
``zstandard`` and ``scikit-learn``: ``pip install -e '.[probe]'``); nothing is downloaded. Each prompt's
last-token activation at the SAE's site comes from one forward pass per batch; for each k, a logistic regression
on the k SAE latents (or raw dimensions) with the largest normalised class-mean difference on the train split is
scored on the test split (``evaluation.probing``). Prints one JSON line per SAE with the means over datasets, and
the per-dataset accuracies on stderr; ``--out`` writes ``probing.csv``, ``probing.md`` and ``probing.png``.
"""

from __future__ import annotations

from gemma_scope import cli, release
from gemma_scope.evaluation import probe_datasets, probing
from gemma_scope.evaluation.probe_runs import probe_saes


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--k={text}: expected comma-separated numbers of features, e.g. 1,2,5,16") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k={text}: expected numbers of features >= 1, e.g. 1,2,5,16")
    return ks


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m gemma_scope.probe``: prints one JSON line per SAE; returns the records (``probe_saes``)."""
    parser = cli.parser("python -m gemma_scope.probe", __doc__.split("\n\n")[0])
    parser.add_argument("--sae", action="append", required=True,
                        help="params.npz, SAE directory or release root; repeatable")
    parser.add_argument("--model", default="gemma3_270m", help="registry name (gemma3_270m), HF dir or orbax path")
    parser.add_argument("--model_config", help="architecture name of an orbax checkpoint whose shapes are ambiguous")
    parser.add_argument("--site", help="site the SAEs read, e.g. res.8 (default: from each SAE's release)")
    parser.add_argument("--datasets", help="comma-separated sae-probes datasets (e.g. 5_hist_fig_ismale) or 'all' "
                        f"(default: {len(probe_datasets.DEFAULT_DATASETS)} short-prompt datasets)")
    parser.add_argument("--k", default=",".join(map(str, probing.DEFAULT_KS)), help="numbers of features to probe")
    parser.add_argument("--max_seq_len", type=int, default=probe_datasets.MAX_SEQ_LEN,
                        help="prompts are truncated on the left to this many tokens (sae-probes: 1024)")
    parser.add_argument("--batch_tokens", type=int, default=1024, help="padded tokens per forward batch")
    parser.add_argument("--out", help="directory for probing.csv, probing.md and probing.png")
    args = parser.parse_args(argv)
    for name in ("max_seq_len", "batch_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    ks = _ks(args.k)
    sae_paths = [p for spec in args.sae for p in release.find_saes(spec)]
    return probe_saes(sae_paths, model_name=args.model, model_config=args.model_config, site=args.site,
                      datasets=args.datasets, ks=ks, max_seq_len=args.max_seq_len,
                      batch_tokens=args.batch_tokens, out=args.out)


if __name__ == "__main__":
    cli.run(main)
