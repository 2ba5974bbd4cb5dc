"""Corpus build + sequence reader on a small local fixture: determinism, split, BOS/masks, resume, sharding."""

import json

import numpy as np
import pytest

from gemma_scope.data import SequenceReader, TextFiles, build_corpus, is_heldout, read_manifest

BOS, EOS, PAD = 2, 1, 0


class ByteTokenizer:
    """Token id = UTF-8 byte + 3, so content ids never collide with pad/eos/bos and decoding is exact."""

    vocab_size, bos_id, eos_id, pad_id = 259, BOS, EOS, PAD
    model_proto = b"bytes+3"

    def encode_batch(self, texts):
        return [[b + 3 for b in t.encode()] for t in texts]

    @staticmethod
    def decode(ids):
        return bytes(int(i) - 3 for i in ids).decode()


def _docs():
    """60 documents of varied length (10..~700 tokens), each text unique ("<k>|...")."""
    rng = np.random.default_rng(0)
    return {f"doc{k:02d}": f"<{k}>|" + "".join(rng.choice(list("abcdefgh \n"), size=int(rng.integers(5, 700))))
            for k in range(60)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = _docs()
    (root / "text").mkdir()
    for name, text in list(docs.items())[:40]:
        (root / "text" / f"{name}.txt").write_text(text)
    with open(root / "more.jsonl", "w") as f:
        for name, text in list(docs.items())[40:]:
            f.write(json.dumps({"id": name, "text": text}) + "\n")
    sources = [TextFiles([str(root / "text" / "*.txt")], name="plain"),
               TextFiles([str(root / "more.jsonl")], name="jsonl")]
    build_corpus(sources, root / "corpus", ByteTokenizer(), heldout_fraction=0.2, log=lambda *_: None)
    return root / "corpus", docs, sources


def _content(tokens, mask):
    return ByteTokenizer.decode(tokens[mask])


def test_build_is_deterministic_and_records_counts(corpus, tmp_path):
    path, docs, sources = corpus
    build_corpus(sources, tmp_path / "again", ByteTokenizer(), heldout_fraction=0.2, log=lambda *_: None)
    first, again = read_manifest(path), read_manifest(tmp_path / "again")
    assert first["tokens_sha256"] == again["tokens_sha256"]
    for name in ("plain", "jsonl"):
        assert first["sources"][name]["tokens_sha256"] == again["sources"][name]["tokens_sha256"]
        assert np.array_equal(np.load(path / name / "tokens.npy"), np.load(tmp_path / "again" / name / "tokens.npy"))
    assert first["sources"]["plain"]["docs"] == 40 and first["sources"]["jsonl"]["docs"] == 20
    assert sum(e["tokens"] for e in first["sources"].values()) == sum(len(t.encode()) for t in docs.values())


def _split_of_docs(path):
    """{k: "train" | "heldout"} for fixture document k, from the built corpus's own files."""
    split = {}
    for source in ("plain", "jsonl"):
        ids = json.loads((path / source / "doc_ids.json").read_text())
        for doc_id, held in zip(ids, np.load(path / source / "heldout.npy")):
            split[int(doc_id[3:5])] = "heldout" if held else "train"
    return split


def test_heldout_split_is_the_hash_and_disjoint_from_train(corpus):
    path, docs, _ = corpus
    assert json.loads((path / "plain" / "doc_ids.json").read_text())[:2] == ["doc00.txt", "doc01.txt"]
    for source in ("plain", "jsonl"):
        ids = json.loads((path / source / "doc_ids.json").read_text())
        assert np.load(path / source / "heldout.npy").tolist() == [is_heldout(source, d, 0.2) for d in ids]
    split = _split_of_docs(path)
    assert 3 <= list(split.values()).count("heldout") <= 25
    for name in ("train", "heldout"):
        reader = SequenceReader(path, split=name, seq_len=64, packing="document")
        text = "".join(_content(*reader.sequence(i)) for i in range(reader.sequences_per_epoch))
        assert {k for k in range(60) if f"<{k}>|" in text} == {k for k, s in split.items() if s == name}


@pytest.mark.parametrize("packing", ["packed", "document"])
def test_sequences_start_with_bos_and_mask_marks_content(corpus, packing):
    reader = SequenceReader(corpus[0], seq_len=48, packing=packing, seed=3)
    batch = reader.batch(0, batch_size=reader.sequences_per_epoch)  # the whole first epoch
    tokens, mask = batch["tokens"], batch["mask"]
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape
    assert (tokens[:, 0] == BOS).all()
    assert np.array_equal(mask, tokens >= 3)  # content ids are >= 3 here; BOS/EOS/pad are not content
    assert ((tokens == PAD).any() if packing == "document" else not (tokens == PAD).any())
    if packing == "document":  # a row never mixes documents: at most one EOS, followed only by pad
        for row in tokens:
            (eos,) = np.flatnonzero(row == EOS)[:1] if (row == EOS).any() else (len(row),)
            assert (row[eos + 1 :] == PAD).all()


def test_packed_epoch_is_every_train_document_once(corpus):
    path, docs, _ = corpus
    reader = SequenceReader(path, seq_len=40, seed=1)
    _, _, rows = reader._epoch(0)
    stream = np.empty((reader.sequences_per_epoch, 39), np.int32)
    for i, r in enumerate(rows):  # undo the row shuffle to recover the epoch's document stream
        stream[r] = reader.sequence(i)[0][1:]
    stream = stream.ravel()
    pieces = [ByteTokenizer.decode(p[p != EOS]) for p in np.split(stream, np.flatnonzero(stream == EOS) + 1)]
    # Every piece but the last is one whole document followed by EOS; the last is the head of the final
    # document, whose tail did not fill a whole row.
    last = next(t for t in docs.values() if t.startswith(pieces[-1]) and t not in pieces[:-1])
    train = [docs[f"doc{k:02d}"] for k, s in _split_of_docs(path).items() if s == "train"]
    assert sorted(pieces[:-1] + [last]) == sorted(train)
    assert len(train) == reader.num_documents


def test_restart_at_saved_batch_is_exact_continuation(corpus):
    path = corpus[0]
    reader = SequenceReader(path, seq_len=256, seed=7)
    first = [reader.batch(b, batch_size=5) for b in range(40)]  # spans several epochs
    assert 5 * 40 > 2 * reader.sequences_per_epoch
    restarted = SequenceReader(path, seq_len=256, seed=7)
    resumed = [restarted.batch(b, batch_size=5) for b in range(23, 40)]
    for a, b in zip(first[23:], resumed, strict=True):
        assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["mask"], b["mask"])
    other_seed = SequenceReader(path, seq_len=256, seed=8).batch(0, 5)
    assert not np.array_equal(first[0]["tokens"], other_seed["tokens"])


def test_processes_read_disjoint_sequences(corpus):
    path = corpus[0]
    readers = [SequenceReader(path, seq_len=32, process_index=p, process_count=3) for p in range(3)]
    single = SequenceReader(path, seq_len=32)
    for b in range(2):
        for p, reader in enumerate(readers):
            expected = [single.sequence((b * 3 + p) * 4 + j)[0] for j in range(4)]
            assert np.array_equal(reader.batch(b, 4)["tokens"], np.stack(expected))
    # One epoch of sequences covers each stream row once.
    rows = [tuple(single.sequence(i)[0]) for i in range(single.sequences_per_epoch)]
    assert len(set(rows)) == len(rows)


def test_reader_errors(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="gemma_scope.data.build"):
        SequenceReader(tmp_path / "nothing")
    with pytest.raises(ValueError, match="split"):
        SequenceReader(corpus[0], split="validation")
    with pytest.raises(ValueError, match="packing"):
        SequenceReader(corpus[0], packing="ragged")
    with pytest.raises(ValueError, match=r"sources \['wiki'\]"):
        SequenceReader(corpus[0], sources=["wiki"])

    class OtherTokenizer(ByteTokenizer):
        vocab_size = 262144

    with pytest.raises(ValueError, match="--tokenizer"):
        SequenceReader(corpus[0], tokenizer=OtherTokenizer())


def test_build_refuses_to_overwrite_a_non_corpus_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a corpus"):
        build_corpus([TextFiles([str(tmp_path / "keep.txt")])], tmp_path, ByteTokenizer())
    assert (tmp_path / "keep.txt").read_text() == "precious"
