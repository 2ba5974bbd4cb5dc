import os

import pytest

from gemma_scope.files import atomic_path, sha256_file


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["out.bin"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == 0o644


def test_sha256_file_matches_the_fips_vectors_from_any_offset(tmp_path):
    short, long = tmp_path / "short.bin", tmp_path / "long.bin"
    short.write_bytes(b"header:abc")
    long.write_bytes(b"a" * 1_000_000)  # several read blocks
    assert sha256_file(short, offset=7) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(long) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
