"""On-disk layout of a built corpus, and the held-out split.

    <corpus>/manifest.json            sources (role, provenance, counts, checksums), tokenizer, build summary
    <corpus>/summary.txt              the human-readable summary printed by the builder
    <corpus>/<source>/tokens.npy      uint32 [n_tokens]   all documents' token ids back to back (no BOS/EOS)
    <corpus>/<source>/offsets.npy     int64 [n_docs + 1]  document d is tokens[offsets[d]:offsets[d + 1]]
    <corpus>/<source>/heldout.npy     bool [n_docs]       in the held-out split (see `is_heldout`)
    <corpus>/<source>/doc_ids.json    list[str] [n_docs]

Splits: "train" and "heldout" partition the documents of sources with role "train"; "ood" is every document
of sources with role "ood" (never trained on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "heldout", "ood")
DEFAULT_HELDOUT_FRACTION = 0.02


def default_corpus_dir() -> pathlib.Path:
    """`$GEMMA_SCOPE_CORPUS`, else `./corpus`."""
    return pathlib.Path(os.environ.get("GEMMA_SCOPE_CORPUS", "corpus"))


def is_heldout(source: str, doc_id: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Whether a document belongs to the held-out split: the first 8 bytes of sha256("<source>\\0<doc_id>"),
    read as an integer, fall in the lowest `fraction` of the 64-bit range. Stable across machines and builds."""
    digest = hashlib.sha256(f"{source}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclasses.dataclass(frozen=True)
class SourceTokens:
    """One source of a built corpus, memory-mapped: tokens uint32 [n_tokens], offsets int64 [n_docs + 1],
    heldout bool [n_docs], doc_ids list[str]."""

    name: str
    role: str
    tokens: np.ndarray
    offsets: np.ndarray
    heldout: np.ndarray
    doc_ids: list[str]

    def split_docs(self, split: str) -> np.ndarray:
        """Indices (int64) of this source's documents in `split`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self.role == "ood":
            chosen = np.full(len(self.heldout), split == "ood")
        elif split == "heldout":
            chosen = self.heldout
        elif split == "train":
            chosen = ~self.heldout
        else:  # "ood" of an in-distribution source
            chosen = np.zeros(len(self.heldout), bool)
        return np.flatnonzero(chosen)


def write_source(directory: pathlib.Path, tokens: np.ndarray, offsets: np.ndarray, heldout: np.ndarray,
                 doc_ids: list[str]) -> str:
    """Write one source's arrays (layout above); returns sha256 over tokens and offsets (the token checksum)."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "tokens.npy", tokens.astype(np.uint32, copy=False))
    np.save(directory / "offsets.npy", offsets.astype(np.int64, copy=False))
    np.save(directory / "heldout.npy", heldout.astype(bool, copy=False))
    (directory / "doc_ids.json").write_text(json.dumps(doc_ids, ensure_ascii=False))
    digest = hashlib.sha256(np.ascontiguousarray(tokens, np.uint32).tobytes())
    digest.update(np.ascontiguousarray(offsets, np.int64).tobytes())
    return digest.hexdigest()


def read_manifest(corpus: str | os.PathLike | None = None) -> dict:
    """The manifest of a built corpus (default `default_corpus_dir()`).

    Raises FileNotFoundError with the build command when there is none, NotADirectoryError when ``corpus`` is a
    file, ValueError naming the file when it is not JSON or has another format version.
    """
    corpus = pathlib.Path(corpus) if corpus is not None else default_corpus_dir()
    path = corpus / "manifest.json"
    if corpus.exists() and not corpus.is_dir():
        raise NotADirectoryError(f"{corpus} is a file; expected a built corpus directory (holding manifest.json)")
    if not path.is_file():
        raise FileNotFoundError(
            f"no built corpus at {corpus} (missing manifest.json); build it with "
            f"`python -m gemma_scope.data.build --out={corpus}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not a valid corpus manifest ({e}); rebuild the corpus") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: corpus format {manifest.get('format') if isinstance(manifest, dict) else None}, "
                         f"expected {FORMAT_VERSION}; rebuild it")
    return manifest


def load_source(corpus: str | os.PathLike, name: str, role: str) -> SourceTokens:
    """Memory-map one source of a built corpus.

    Raises FileNotFoundError naming a missing file, ValueError naming a truncated or corrupt one."""
    directory = pathlib.Path(corpus) / name
    path = directory / "tokens.npy"
    try:
        source = SourceTokens(
            name=name,
            role=role,
            tokens=np.load(path, mmap_mode="r"),
            offsets=np.load(path := directory / "offsets.npy"),
            heldout=np.load(path := directory / "heldout.npy"),
            doc_ids=json.loads((path := directory / "doc_ids.json").read_text()),
        )
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: cannot read it ({e}); the corpus is damaged: rebuild it") from e
    if len(source.offsets) != len(source.heldout) + 1 or source.offsets[-1] != len(source.tokens):
        raise ValueError(f"{directory}: tokens.npy, offsets.npy and heldout.npy disagree in length; the corpus is "
                         "damaged: rebuild it")
    return source
