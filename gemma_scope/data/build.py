"""Build the corpus: `python -m gemma_scope.data.build`.

    python -m gemma_scope.data.build [--out=./corpus] [--sources=default] [--max_tokens=0]
                                     [--tokenizer=PATH] [--heldout_fraction=0.02] [--cache=DIR]

See `builder.py` for the source specs and what the build records; prints and saves (`summary.txt`) a summary.
"""

import pathlib

from gemma_scope import cli
from gemma_scope.data import builder, store
from gemma_scope.model.tokenizer import Tokenizer, cache_dir, embedded_tokenizer


def _load_tokenizer(path: str) -> Tokenizer:
    if not path:
        return embedded_tokenizer()
    return Tokenizer.from_gguf(path) if path.endswith(".gguf") else Tokenizer.from_file(path)


def main(argv: list[str] | None = None) -> None:
    """``python -m gemma_scope.data.build``: builds the corpus and prints its summary (module docstring)."""
    parser = cli.parser("python -m gemma_scope.data.build", "Build the text corpus the SAEs train and evaluate on.")
    parser.add_argument("--out", help="corpus directory (default $GEMMA_SCOPE_CORPUS or ./corpus)")
    parser.add_argument("--sources", default="default",
                        help="comma-separated packaged source names, default, all, files:PATTERN, tfds:NAME")
    parser.add_argument("--max_tokens", type=int, default=0, help="cap on tokens per source (whole documents); 0: no cap")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model or .gguf (default: Gemma 3 270M's, embedded)")
    parser.add_argument("--heldout_fraction", type=float, default=store.DEFAULT_HELDOUT_FRACTION,
                        help="fraction of documents held out")
    parser.add_argument("--cache", help="where fetched archives are kept (default <gemma_scope cache>/)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out) if args.out else store.default_corpus_dir()
    cache = pathlib.Path(args.cache) if args.cache else cache_dir()
    sources = [s for s in args.sources.split(",") if s]
    manifest = builder.build_corpus(builder.resolve_sources(sources, cache), out, _load_tokenizer(args.tokenizer),
                                    max_tokens=args.max_tokens, heldout_fraction=args.heldout_fraction)
    print(builder.summary(manifest), end="")
    print(f"corpus written to {out}")


if __name__ == "__main__":
    cli.run(main)
