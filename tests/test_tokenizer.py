"""Tokenizer: rebuilding SentencePiece from GGUF metadata, loading tokenizer.model files, Gemma 3 parity."""

import gguf
import pytest

from gemma_scope.model.tokenizer import Tokenizer, embedded_tokenizer

_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_BYTES = [f"<0x{b:02X}>" for b in range(256)]
_NORMAL = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "abc"]


def _write_tiny_gguf(path):
    """A GGUF carrying a tiny Gemma-style vocabulary exported the way llama.cpp exports Gemma's.

    llama.cpp marks <unk> and the chat pieces CONTROL and stores user-defined whitespace pieces with plain
    spaces: exactly the three things Tokenizer.from_gguf must undo.
    """
    pieces = _SPECIALS + ["  "] + _BYTES + _NORMAL
    types = [3] * len(_SPECIALS) + [4] + [6] * 256 + [1] * len(_NORMAL)
    scores = [-1000.0] * (len(pieces) - len(_NORMAL)) + [-float(i) for i in range(len(_NORMAL))]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pieces


def test_from_gguf_applies_the_three_fixes(tmp_path):
    pieces = _write_tiny_gguf(tmp_path / "tiny.gguf")
    tok = Tokenizer.from_gguf(tmp_path / "tiny.gguf")
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, len(pieces))
    space2 = pieces.index("  ")
    assert tok.id_to_piece(space2) == "▁▁"                                  # fix: spaces -> ▁
    assert tok.encode("  ab") == [space2, pieces.index("ab")]
    assert tok.encode("<start_of_turn>a<end_of_turn>") == [4, pieces.index("a"), 5]  # fix: user-defined
    # Out-of-vocabulary characters go through byte fallback (needs a real UNKNOWN piece: fix 1).
    assert tok.encode("é") == [len(_SPECIALS) + 1 + 0xC3, len(_SPECIALS) + 1 + 0xA9]
    assert tok.decode(tok.encode("abc  é b")) == "abc  é b"


def test_from_file_reads_model_file_and_directory(tmp_path):
    _write_tiny_gguf(tmp_path / "tiny.gguf")
    proto = Tokenizer.from_gguf(tmp_path / "tiny.gguf").model_proto
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(proto)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "tokenizer.model"):
        assert Tokenizer.from_file(path).encode("  abc") == [6, len(_SPECIALS) + 1 + 256 + 7]


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json is not supported"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "bad.model").write_bytes(b"not a proto")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "bad.model")


def test_from_gguf_rejects_non_sentencepiece_tokenizer(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ValueError, match="expected 'llama'"):
        Tokenizer.from_gguf(tmp_path / "gpt2.gguf")


def test_encode_batch_cuts_long_texts_exactly(tmp_path):
    _write_tiny_gguf(tmp_path / "tiny.gguf")
    tok = Tokenizer.from_gguf(tmp_path / "tiny.gguf")
    texts = ["ab c\n\n  abc\n" * 2000, "a" * 9000 + "\n" * 5000 + "b", "", "abc"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@pytest.mark.slow
def test_embedded_tokenizer_matches_gemma3():
    tok = embedded_tokenizer()
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 262144)
    # Reference ids from Gemma 3's own tokenizer (research note gemma3-270m-offline.md).
    assert [tok.bos_id] + tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    assert tok.encode("<start_of_turn>user\n") == [105, 2364, 107]
    for text in ["naïve café 日本語 🙂\x00", "   x = 12345;\n\n\tdef f():", "  <end_of_turn>  "]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("2024") == [tok.encode(d)[-1] for d in "2024"]  # digits split one by one
    long_text = "def f(x):\n    return x  # twice\n\n\nThe  end.\n" * 500
    assert tok.encode_batch([long_text]) == [tok.encode(long_text)]
