"""Sources of site activations for the trainer: the ``ActivationSource`` protocol and its implementations.

A source names its sites (``"res.3"``, or ``"custom"`` for activations not tied to a model site) and yields
numbered batches ``{site: float32 [batch_size, d]}``. Batch ``b`` is a pure function of (source config, seed, b),
so a resumed run sees exactly the batches an uninterrupted run would have seen. On multi-host runs each process
builds its source with its own ``shard_index`` and gets its own rows of every global batch.
"""

from __future__ import annotations

import pathlib
from typing import Iterator, Protocol

import numpy as np

CUSTOM_SITE = "custom"  # site name of activations not tied to a model site (released under custom/layer_0)


class ActivationSource(Protocol):
    """Numbered batches of activations of one or more sites (see the module docstring)."""

    sites: list[str]
    d_in: dict[str, int]

    def batches(self, batch_size: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batch number start, start+1, ...; each ``{site: float32 [batch_size, d_in[site]]}``."""
        ...


class NpyShardSource:
    """Activations of one site cached on disk as float32 ``.npy`` files, each ``[N_i, d]``, read memory-mapped.

    Rows are visited in a fresh permutation every epoch (seeded by ``(seed, epoch)``); global batch ``b`` of
    ``batch_size * shard_count`` rows is the slice ``[b·G, (b+1)·G)`` of the epoch-wise permuted stream, and
    this process gets its ``shard_index``-th part of it. The permutation is held in memory (8 bytes per row).

    Args:
      path: directory holding the ``.npy`` files (sorted by name) — all float32, 2-D, with the same d.
      site: name of the site the activations come from (``"res.12"``), or ``CUSTOM_SITE``.
      seed: shuffling seed.
      shard_index, shard_count: this process's part of each global batch (``jax.process_index/count``).

    Raises:
      FileNotFoundError: no directory or no ``.npy`` file in it.
      ValueError: a file that is not float32 2-D, or widths that differ; the message names the file.
    """

    def __init__(self, path: str, site: str = CUSTOM_SITE, seed: int = 0, shard_index: int = 0, shard_count: int = 1):
        directory = pathlib.Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"data.path {str(path)!r} is not a directory of .npy activation files")
        files = sorted(directory.glob("*.npy"))
        if not files:
            raise FileNotFoundError(f"data.path {str(path)!r} holds no .npy files; expected float32 arrays [N, d]")
        self._arrays = [np.load(f, mmap_mode="r") for f in files]
        for f, a in zip(files, self._arrays):
            if a.dtype != np.float32 or a.ndim != 2:
                raise ValueError(f"{f}: activations must be float32 [N, d], got {a.dtype} {list(a.shape)}")
            if a.shape[1] != self._arrays[0].shape[1]:
                raise ValueError(f"{f}: width d={a.shape[1]} differs from {files[0].name}'s d={self._arrays[0].shape[1]}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} must lie in [0, shard_count={shard_count})")
        self.sites = [site]
        self.d_in = {site: int(self._arrays[0].shape[1])}
        self._offsets = np.cumsum([0] + [a.shape[0] for a in self._arrays])
        self._seed, self._shard_index, self._shard_count = seed, shard_index, shard_count
        self._perm_epoch, self._perm = -1, None

    @property
    def num_rows(self) -> int:
        """Total number of activation rows over all files."""
        return int(self._offsets[-1])

    def _rows(self, start: int, count: int) -> np.ndarray:
        """Row indices ``[start, start + count)`` of the epoch-wise permuted infinite stream."""
        out = np.empty(count, np.int64)
        filled = 0
        while filled < count:
            epoch, pos = divmod(start + filled, self.num_rows)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng((self._seed, epoch)).permutation(self.num_rows)
                self._perm_epoch = epoch
            take = min(count - filled, self.num_rows - pos)
            out[filled:filled + take] = self._perm[pos:pos + take]
            filled += take
        return out

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Reads the given global rows (in order) from the memory-mapped files."""
        out = np.empty((rows.size, self.d_in[self.sites[0]]), np.float32)
        file_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for i in np.unique(file_of):
            where = np.nonzero(file_of == i)[0]
            local = rows[where] - self._offsets[i]
            order = np.argsort(local)  # sequential reads of the memmap
            out[where[order]] = self._arrays[i][local[order]]
        return out

    def batches(self, batch_size: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batch number start, start+1, ... as ``{site: float32 [batch_size, d]}`` (module docstring)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        global_size = batch_size * self._shard_count
        b = start
        while True:
            rows = self._rows(b * global_size + self._shard_index * batch_size, batch_size)
            yield {self.sites[0]: self._gather(rows)}
            b += 1


def make_source(data_config, seed: int, shard_index: int = 0, shard_count: int = 1) -> ActivationSource:
    """Builds the activation source a config's ``data`` block describes.

    ``data.source``: ``"npy"`` — ``NpyShardSource(data.path, data.site or CUSTOM_SITE, seed, ...)``.

    Raises:
      ValueError: an unknown ``data.source`` or a missing ``data.path``.
    """
    if data_config.source == "npy":
        if not data_config.get("path"):
            raise ValueError("data.source='npy' needs data.path: a directory of float32 .npy files [N, d]")
        return NpyShardSource(data_config.path, data_config.get("site") or CUSTOM_SITE, seed, shard_index, shard_count)
    raise ValueError(f"unknown data.source {data_config.source!r}; expected one of ['npy']")
