"""Build the corpus: `python -m gemma_scope.data.build`.

    python -m gemma_scope.data.build [--out=./corpus] [--sources=default] [--max_tokens=0]
                                     [--tokenizer=PATH] [--heldout_fraction=0.02] [--cache=DIR]

See `builder.py` for the source specs and what the build records; prints and saves (`summary.txt`) a summary.
"""

import pathlib

from absl import app, flags

from gemma_scope.data import builder, store
from gemma_scope.model.tokenizer import Tokenizer, cache_dir, embedded_tokenizer


def _load_tokenizer(path: str) -> Tokenizer:
    if not path:
        return embedded_tokenizer()
    return Tokenizer.from_gguf(path) if path.endswith(".gguf") else Tokenizer.from_file(path)


_OUT = flags.DEFINE_string("out", None, "corpus directory (default $GEMMA_SCOPE_CORPUS or ./corpus)")
_SOURCES = flags.DEFINE_list("sources", ["default"], "packaged source names, default, all, files:PATTERN, tfds:NAME")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "cap on tokens per source (whole documents); 0: no cap")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer.model or .gguf (default: Gemma 3 270M's, embedded)")
_HELDOUT = flags.DEFINE_float("heldout_fraction", store.DEFAULT_HELDOUT_FRACTION, "fraction of documents held out")
_CACHE = flags.DEFINE_string("cache", None, "where fetched archives are kept (default <gemma_scope cache>/)")


def main(argv):
    del argv
    out = pathlib.Path(_OUT.value) if _OUT.value else store.default_corpus_dir()
    cache = pathlib.Path(_CACHE.value) if _CACHE.value else cache_dir()
    manifest = builder.build_corpus(builder.resolve_sources(_SOURCES.value, cache), out,
                                    _load_tokenizer(_TOKENIZER.value), max_tokens=_MAX_TOKENS.value,
                                    heldout_fraction=_HELDOUT.value)
    print(builder.summary(manifest), end="")
    print(f"corpus written to {out}")


if __name__ == "__main__":
    app.run(main)
