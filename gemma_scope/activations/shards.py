"""The on-disk format of activation shards (one owner): a directory per site of ``shard_<k>.npy`` files
``[n_k, d]`` (float32 or bfloat16) and a ``manifest.json`` (model, site, dtype, d, count, token source, per-shard
shape and sha256). ``write_shards`` writes it, ``open_shards`` reads and checks it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Iterable, Iterator

import jax.numpy as jnp
import numpy as np
import tqdm

from gemma_scope.files import atomic_path, sha256_file
from gemma_scope.sites import CUSTOM, release_site

MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


def open_shards(path: str | os.PathLike) -> tuple[list[np.ndarray], dict | None]:
    """Memory-maps a directory of activation shards: its ``*.npy`` files sorted by name, each ``[N_i, d]``.

    Files are float32, or bfloat16 when the directory's ``manifest.json`` (written by ``write_shards``) says so
    (NumPy stores bfloat16 as raw 2-byte records). With a manifest, the files must be exactly the ones it lists,
    with its shapes, and each one's sha256 is checked here (``verify_shard``), once per open: a run reads every
    row at least once per epoch anyway, so the check costs at most one extra read of the data (done in
    parallel threads), while a damaged shard would otherwise train and evaluate silently.

    Returns:
      (arrays, manifest or None).

    Raises:
      FileNotFoundError: not a directory, no ``.npy`` file in it, or a shard the manifest lists is missing.
      ValueError: a malformed manifest, an unreadable or truncated file, a file that is not a 2-D array of the
        expected dtype with rows, widths that differ, or a file whose shape or sha256 disagrees with the
        manifest; the message names the file.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory of .npy activation files")
    files = sorted(directory.glob("*.npy"))
    if not files:
        raise FileNotFoundError(f"{str(path)!r} holds no .npy files; expected float32 arrays [N, d]")
    manifest = _read_manifest(directory / MANIFEST) if (directory / MANIFEST).is_file() else None
    dtype = STORAGE_DTYPES[manifest["dtype"]] if manifest else STORAGE_DTYPES["float32"]
    if manifest:
        missing = sorted(set(manifest["shards"]) - {f.name for f in files})
        if missing:
            raise FileNotFoundError(f"{directory}: shard(s) {missing} listed in {MANIFEST} are missing; the "
                                    "directory is incomplete: regenerate it")
    arrays = []
    for f in files:
        try:
            a = np.load(f, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # truncated header or data, not an .npy file
            raise ValueError(f"{f}: cannot read it as an .npy array ({e}); the file is truncated or corrupt") from e
        a = a.view(dtype) if a.dtype.kind == "V" and a.dtype.itemsize == dtype.itemsize else a
        if a.dtype != dtype or a.ndim != 2 or 0 in a.shape:
            raise ValueError(f"{f}: activations must be {dtype.name} [N > 0, d > 0], got {a.dtype} {list(a.shape)}")
        if a.shape[1] != (arrays[0] if arrays else a).shape[1]:
            raise ValueError(f"{f}: width d={a.shape[1]} differs from {files[0].name}'s d={arrays[0].shape[1]}")
        if manifest:
            expected = manifest["shards"].get(f.name, {}).get("shape", "not listed")
            if expected != list(a.shape):
                raise ValueError(f"{f}: shape {list(a.shape)} disagrees with {directory / MANIFEST} ({expected}); "
                                 "the directory is incomplete or corrupt: regenerate it")
        arrays.append(a)
    if manifest:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda a: verify_shard(a, manifest["shards"][pathlib.Path(a.filename).name]["sha256"]),
                          arrays))
    return arrays, manifest


def _read_manifest(path: pathlib.Path) -> dict:
    """A shard directory's manifest, checked for the keys ``open_shards`` reads. Raises ValueError naming the file
    and key."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the manifest ({e}); regenerate the directory") from e
    problem = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        problem = "no 'shards' object"
    elif manifest.get("dtype") not in STORAGE_DTYPES:
        problem = f"'dtype' is {manifest.get('dtype')!r}, expected one of {sorted(STORAGE_DTYPES)}"
    elif not isinstance(manifest.get("site"), str):
        problem = f"'site' is {manifest.get('site')!r}, expected a site name such as 'res.12' (or {CUSTOM!r})"
    else:
        bad = [name for name, entry in manifest["shards"].items()
               if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                       and isinstance(entry.get("sha256"), str))]
        problem = f"shard entries {bad} lack 'shape' or 'sha256'" if bad else None
        try:
            release_site(manifest["site"])
        except ValueError as e:
            problem = problem or f"'site': {e}"
    if problem:
        raise ValueError(f"{path}: malformed manifest: {problem} (written by gemma_scope.activations.shards.write_shards)")
    return manifest


def verify_shard(array: np.memmap, sha256: str) -> None:
    """Checks a memory-mapped shard's file: the data after the ``.npy`` header is exactly ``array``'s bytes and
    has the given sha256 (of ``array.tobytes()``, as ``write_shards`` records it).

    Raises:
      ValueError: naming the file, when its size or checksum differs.
    """
    path = pathlib.Path(array.filename)
    size = path.stat().st_size
    if size != array.offset + array.nbytes:
        raise ValueError(f"{path}: {size} bytes, expected {array.offset + array.nbytes} for {array.dtype} "
                         f"{list(array.shape)}; the file is truncated or corrupt: regenerate the directory")
    digest = sha256_file(path, array.offset)
    if digest != sha256:
        raise ValueError(f"{path}: sha256 {digest[:12]}… differs from the manifest's {sha256[:12]}…; "
                         "the shard is corrupt: regenerate the directory")


def write_shards(source, out: str | os.PathLike, tokens: int, storage_dtype: str = "float32",
                 token_source: dict | None = None, mesh=None) -> dict[str, pathlib.Path]:
    """Writes at least ``tokens`` content-token activations of every site of ``source`` to disk.

    ``source`` is an ``activations.ModelSource`` (anything with ``sites``, ``d_in``, ``model_name`` and
    ``chunk(k, mesh, dtype) -> {site: [n_k, d]}``, which runs the forward passes on ``mesh`` and casts to the storage
    dtype on the device, one device-to-host copy per site). One shard per chunk and site, written atomically
    (temporary name, then rename), and
    a ``manifest.json`` per site written last: model, site, dtype, d, count, ``token_source`` and each shard's
    shape and sha256. Returns ``{site: directory}``.

    Raises:
      ValueError: ``tokens`` < 1, an unknown storage dtype, or an existing non-empty site directory.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    dirs = {site: pathlib.Path(out) / site for site in source.sites}
    for directory in dirs.values():
        if directory.exists() and any(directory.iterdir()):
            raise ValueError(f"{directory} is not empty; choose another --out or delete it")
        directory.mkdir(parents=True, exist_ok=True)
    shards = {site: {} for site in source.sites}
    written, k = 0, 0
    with tqdm.tqdm(total=tokens, unit="tok", desc="activations") as bar:
        while written < tokens:
            chunk = source.chunk(k, mesh, STORAGE_DTYPES[storage_dtype])
            for site, data in chunk.items():
                name = f"shard_{k:05d}.npy"
                with atomic_path(dirs[site] / name, data.nbytes + 128) as tmp, open(tmp, "wb") as f:  # + header
                    np.save(f, data)
                shards[site][name] = {"shape": list(data.shape), "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
            n = len(chunk[source.sites[0]])
            written, k = written + n, k + 1
            bar.update(n)
    for site, directory in dirs.items():
        manifest = {"model": source.model_name, "site": site, "dtype": storage_dtype, "d": source.d_in[site],
                    "count": written, "token_source": token_source or {}, "shards": shards[site]}
        text = json.dumps(manifest, indent=1) + "\n"
        with atomic_path(directory / MANIFEST, len(text)) as tmp:
            tmp.write_text(text)
    return dirs


def first_rows(arrays: Iterable[np.ndarray], max_tokens: int | None) -> Iterator[np.ndarray]:
    """The first ``max_tokens`` rows of a stream of arrays (all rows when None)."""
    left = math.inf if max_tokens is None else max_tokens
    for array in arrays:
        if left <= 0:
            return
        yield array[: int(min(left, len(array)))]
        left -= len(array)
