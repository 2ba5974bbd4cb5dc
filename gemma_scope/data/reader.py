"""Fixed-length token sequences from a built corpus: shuffled, sharded, resumable by batch number.

    reader = SequenceReader("corpus", split="train", seq_len=1024, seed=0,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = reader.batch(step, batch_size=8)
    batch["tokens"]  # int32 [8, 1024]; column 0 is BOS
    batch["mask"]    # bool  [8, 1024]; True exactly at document tokens (False at BOS, EOS, pad)

Every sequence starts with BOS. Two layouts (`packing`):
  "packed"   (default) documents, each followed by EOS, are concatenated into one stream that is cut into
             rows of seq_len - 1 tokens, each row prefixed with BOS. A row can start mid-document, as in
             Gemma pretraining and SAE training peers (SAELens packs the same way, one BOS per context);
             no padding, so no compute is wasted.
  "document" every document starts a new row: BOS + up to seq_len - 1 document tokens (+ EOS after the last
             piece of the document) + pad. Documents longer than a row continue in further rows, each
             again led by BOS. Use it when position-in-document matters (e.g. per-position metrics).

Order: in epoch e the documents are permuted (seed, e), laid out as above, and the rows of that layout are
permuted again (seed, e), so a batch mixes documents and sources. Global sequence i lives in epoch
i // sequences_per_epoch; the reader runs through epochs without end. Batch b of process p holds global
sequences (b * process_count + p) * batch_size + [0, batch_size): processes read disjoint sequences, and
batch b is a pure function of (corpus, split, seq_len, packing, seed, process_count, b). The resumable
position is the batch number: a run that stopped after batch b - 1 continues with `batch(b, batch_size)`,
without reading or skipping anything.
"""

from __future__ import annotations

import os

import numpy as np

from gemma_scope.data import store

PACKINGS = ("packed", "document")


class SequenceReader:
    """Sequences of `seq_len` tokens from the documents of `split` ("train", "heldout" or "ood") of a built
    corpus (default `store.default_corpus_dir()`), optionally only from `sources` (names).

    tokenizer: if given, checked against the tokenizer the corpus was built with (ValueError on mismatch).
    Raises FileNotFoundError if the corpus is missing, ValueError on bad arguments or an empty split.
    """

    def __init__(self, corpus: str | os.PathLike | None = None, *, split: str = "train", seq_len: int = 1024,
                 packing: str = "packed", seed: int = 0, process_index: int = 0, process_count: int = 1,
                 sources: list[str] | None = None, tokenizer=None):
        corpus = corpus if corpus is not None else store.default_corpus_dir()
        manifest = store.read_manifest(corpus)
        if packing not in PACKINGS:
            raise ValueError(f"packing {packing!r}; expected one of {PACKINGS}")
        if seq_len < 2:
            raise ValueError(f"seq_len {seq_len}; expected >= 2 (BOS + at least one token)")
        if not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise ValueError(f"seed {seed!r}; expected an integer >= 0")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
        known = list(manifest["sources"])
        unknown = sorted(set(sources or []) - set(known))
        if unknown:
            raise ValueError(f"sources {unknown} are not in corpus {corpus}; it has {known}")
        special = manifest["tokenizer"]
        built_with = (special["vocab_size"], special["bos_id"])
        if tokenizer is not None and (tokenizer.vocab_size, tokenizer.bos_id) != built_with:
            raise ValueError(
                f"corpus {corpus} was tokenised with (vocab size, bos) = {built_with}, the model's tokenizer has "
                f"{(tokenizer.vocab_size, tokenizer.bos_id)}; rebuild the corpus with "
                "--tokenizer=<the model's tokenizer.model>"
            )
        self.bos_id, self.eos_id, self.pad_id = special["bos_id"], special["eos_id"], special["pad_id"]
        self.seq_len, self.packing, self.seed = seq_len, packing, seed
        self.process_index, self.process_count = process_index, process_count
        self.split = split

        self._tokens, starts, lengths = [], [], []
        for name in sources or known:
            src = store.load_source(corpus, name, manifest["sources"][name]["role"])
            docs = src.split_docs(split)
            self._tokens.append(src.tokens)
            starts.append(src.offsets[docs])
            lengths.append(np.diff(src.offsets)[docs])
        self._doc_source = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(starts)])
        self._doc_start = np.concatenate(starts).astype(np.int64)
        self._doc_len = np.concatenate(lengths).astype(np.int64)
        row = seq_len - 1
        with_eos = self._doc_len + 1
        self._slot = with_eos if packing == "packed" else -(-with_eos // row) * row  # room a doc takes in the stream
        self.sequences_per_epoch = int(self._slot.sum()) // row
        if self.sequences_per_epoch == 0:
            raise ValueError(
                f"split {split!r} of {corpus} (sources {sources or known}) has no full sequence of {seq_len} tokens"
            )
        self._cached_epoch = (None, None)

    @property
    def num_documents(self) -> int:
        return len(self._doc_len)

    def _epoch(self, epoch: int):
        """Document order, cumulative slot ends in that order, and row order of `epoch` (last one cached)."""
        if self._cached_epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_documents)
            rows = rng.permutation(self.sequences_per_epoch)
            self._cached_epoch = (epoch, (order, np.cumsum(self._slot[order]), rows))
        return self._cached_epoch[1]

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sequence `i` (any epoch): tokens int32 [seq_len], mask bool [seq_len]."""
        epoch, i = divmod(int(i), self.sequences_per_epoch)
        order, ends, rows = self._epoch(epoch)
        row = self.seq_len - 1
        lo = int(rows[i]) * row
        hi = lo + row
        tokens = np.full(self.seq_len, self.pad_id, np.int32)
        mask = np.zeros(self.seq_len, bool)
        tokens[0] = self.bos_id
        k = int(np.searchsorted(ends, lo, side="right"))  # first document whose slot ends after lo
        while k < len(order) and ends[k] - self._slot[order[k]] < hi:
            d = order[k]
            slot_start = int(ends[k] - self._slot[d])
            a, b = max(lo, slot_start) - slot_start, min(hi, int(ends[k])) - slot_start  # [a, b) within the slot
            n = int(self._doc_len[d])
            out = 1 + slot_start + a - lo
            if a < n:  # document tokens
                m = min(b, n) - a
                start = int(self._doc_start[d]) + a
                tokens[out : out + m] = self._tokens[self._doc_source[d]][start : start + m]
                mask[out : out + m] = True
            if a <= n < b:  # the EOS after the document
                tokens[out + n - a] = self.eos_id
            k += 1
        return tokens, mask

    def sequences(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Global sequences `start` .. `start + count - 1` (any epoch), stacked: {"tokens": int32 [count, seq_len],
        "mask": bool [count, seq_len]}."""
        rows = [self.sequence(start + j) for j in range(count)]
        return {"tokens": np.stack([t for t, _ in rows]), "mask": np.stack([m for _, m in rows])}

    def batch(self, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """This process's batch number `index`: {"tokens": int32 [batch_size, seq_len], "mask": bool [...]}."""
        return self.sequences((index * self.process_count + self.process_index) * batch_size, batch_size)
