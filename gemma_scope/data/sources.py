"""Document sources: anything that yields `(doc_id, text)` pairs in a fixed order.

A source has a `name` (a corpus sub-directory), a `role` ("train": 2% of its documents are hashed into the
held-out split; "ood": evaluation only, never trained on), `fetch() -> dict` (provenance recorded in the
corpus manifest; may raise `fetch.SourceUnavailable`, which makes the build skip it) and `documents()`.
Doc ids must be unique within a source and stable across rebuilds: they decide the held-out split.

Sources here are the user-facing ones; the packaged default mix is in `packaged.py`.
  TextFiles(paths)                   plain-text files (one document each) or JSONL (one per line, field "text")
  TfdsSource("wikipedia/20230601.en", split="train")   an already-prepared tensorflow-datasets dataset
Spell them on the command line as `files:PATTERN` and `tfds:NAME[:SPLIT][#FIELD]` (see `parse`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import pathlib
import re
from collections.abc import Iterator
from typing import Protocol

from gemma_scope.files import utf8_text

ROLES = ("train", "ood")


class Source(Protocol):
    name: str
    role: str  # one of ROLES

    def fetch(self) -> dict: ...

    def documents(self) -> Iterator[tuple[str, str]]: ...


def _pattern_base(pattern: str) -> pathlib.Path:
    """The directory a glob pattern (or plain file path) is rooted at: its leading parts without wildcards."""
    fixed = itertools.takewhile(lambda part: not re.search(r"[*?[]", part), pathlib.Path(pattern).parts)
    base = pathlib.Path(*fixed)
    return base if base.is_dir() else base.parent


@dataclasses.dataclass
class TextFiles:
    """Local files: `*.jsonl` gives one document per line (field `text_field`; id the line's "id" field, else
    `<file>:<line number>`); any other file is one UTF-8 document.

    `paths` are files or glob patterns (`**` recurses), expanded and sorted. Doc ids use file paths relative to
    each pattern's directory, so the held-out split does not depend on where the files live.
    Raises FileNotFoundError if a pattern matches nothing; ValueError naming the file (and line, for JSONL) for
    text that is not UTF-8, a line that is not a JSON object, or a missing or non-string text field.
    """

    paths: list[str]
    name: str = "files"
    role: str = "train"
    text_field: str = "text"

    def _files(self) -> list[tuple[pathlib.Path, str]]:
        found = {}
        for pattern in self.paths:
            matches = sorted(glob.glob(pattern, recursive=True))
            files = [pathlib.Path(m) for m in matches if pathlib.Path(m).is_file()]
            if not files:
                raise FileNotFoundError(f"source {self.name!r}: no file matches {pattern!r}")
            base = _pattern_base(pattern)
            found.update({f: f.relative_to(base).as_posix() for f in files})
        return sorted(found.items())

    def fetch(self) -> dict:
        digest = hashlib.sha256()
        for f, doc_id in self._files():
            digest.update(doc_id.encode() + b"\0" + f.read_bytes())
        return {"files": [doc_id for _, doc_id in self._files()], "sha256": digest.hexdigest()}

    def documents(self) -> Iterator[tuple[str, str]]:
        for f, file_id in self._files():
            if f.suffix != ".jsonl":
                yield file_id, utf8_text(f.read_bytes(), f)
                continue
            with open(f, "rb") as lines:
                for i, raw in enumerate(lines):
                    where = f"{f}:{i + 1}"
                    line = utf8_text(raw, where)
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"{where}: not valid JSON ({e}); expected one JSON object per line") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{where}: expected a JSON object, got a {type(record).__name__}")
                    if self.text_field not in record:
                        raise ValueError(f"{where}: no {self.text_field!r} field (keys: {sorted(record)})")
                    if not isinstance(record[self.text_field], str):
                        raise ValueError(f"{where}: field {self.text_field!r} is a "
                                         f"{type(record[self.text_field]).__name__}, expected a string")
                    yield str(record.get("id", f"{file_id}:{i + 1}")), record[self.text_field]


@dataclasses.dataclass
class TfdsSource:
    """A tensorflow-datasets dataset already prepared in the local TFDS data dir (nothing is downloaded).

    Optional: needs `pip install gemma_scope[tfds]`. Doc ids are `<split>:<index>`.
    """

    dataset: str
    split: str = "train"
    text_field: str = "text"
    name: str = ""
    role: str = "train"

    def __post_init__(self):
        self.name = self.name or "tfds_" + self.dataset.replace("/", "_").replace(":", "_")

    def _builder(self):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError(
                f"source tfds:{self.dataset} needs tensorflow-datasets: pip install 'gemma_scope[tfds]'"
            ) from e
        builder = tfds.builder(self.dataset)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"tfds dataset {self.dataset} is not prepared under {builder.data_dir}; prepare it with "
                "tfds first (this build never downloads)"
            )
        return builder

    def fetch(self) -> dict:
        builder = self._builder()
        return {"dataset": self.dataset, "version": str(builder.version), "split": self.split}

    def documents(self) -> Iterator[tuple[str, str]]:
        dataset = self._builder().as_dataset(split=self.split, shuffle_files=False)
        for i, example in enumerate(dataset.as_numpy_iterator()):
            text = example[self.text_field]
            yield f"{self.split}:{i}", text.decode("utf-8") if isinstance(text, bytes) else str(text)


def parse(spec: str) -> Source:
    """A user source from its command-line spelling: `files:PATTERN` (a path or glob; source named after it)
    or `tfds:NAME[:SPLIT][#FIELD]`. Raises ValueError for anything else."""
    kind, _, rest = spec.partition(":")
    if kind == "files" and rest:
        return TextFiles([rest], name="files_" + re.sub(r"[^A-Za-z0-9]+", "_", rest).strip("_"))
    if kind == "tfds" and rest:
        rest, _, field = rest.partition("#")
        dataset, _, split = rest.partition(":")  # the split may hold ':' itself, e.g. train[:1%]
        return TfdsSource(dataset, split=split or "train", text_field=field or "text")
    raise ValueError(f"unknown source {spec!r}; expected a packaged source name, files:PATTERN or tfds:NAME[:SPLIT]")
