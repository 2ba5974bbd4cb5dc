"""Sources of site activations for the trainer: the ``ActivationSource`` protocol and its implementations.

A source names its sites (``"res.3"``, or ``sites.CUSTOM`` = ``"custom"`` for activations not tied to a model site)
and yields numbered batches ``{site: float32 [batch_size, d]}``. Batch ``b`` is a pure function of (source config,
seed, b), so a resumed run sees exactly the batches an uninterrupted run would have seen. On multi-host runs each
process builds its source with its own ``shard_index`` and gets its own rows of every global batch.

Activations can also be written to disk once and reused (e.g. by a λ sweep), one directory per site:

    python -m gemma_scope.activations --config=experiments/gemma3_270m_res.py --out=DIR --tokens=1000000 \
        [--storage_dtype=bfloat16] [--config.data.sites=res.8,att.8]

writes ``DIR/<site>/shard_<k>.npy`` (``[n_k, d]``, content tokens of chunk k in token order) and
``DIR/<site>/manifest.json`` (model, site, dtype, d, count, token source, per-shard sha256). Train on one with
``--config=experiments/from_activations.py --config.data.path=DIR/res.8``.
"""

from __future__ import annotations

import pathlib
from typing import Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope import model
from gemma_scope.sites import CUSTOM
from gemma_scope.shards import STORAGE_DTYPES, open_shards, write_shards

class ActivationSource(Protocol):
    """Numbered batches of activations of one or more sites (see the module docstring)."""

    sites: list[str]
    d_in: dict[str, int]

    def batches(self, batch_size: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batch number start, start+1, ...; each ``{site: float32 [batch_size, d_in[site]]}``."""
        ...


class NpyShardSource:
    """Activations of one site cached on disk as ``.npy`` files, each ``[N_i, d]`` (``open_shards``), read
    memory-mapped; batches are float32.

    Rows are visited in a fresh permutation every epoch (seeded by ``(seed, epoch)``); global batch ``b`` of
    ``batch_size * shard_count`` rows is the slice ``[b·G, (b+1)·G)`` of the epoch-wise permuted stream, and
    this process gets its ``shard_index``-th part of it. The permutation is held in memory (8 bytes per row).

    Args:
      path: directory holding the ``.npy`` files (sorted by name) — all float32, 2-D, with the same d.
      site: name of the site the activations come from (``"res.12"``), or ``CUSTOM`` (then the site of the
        directory's manifest, if it has one).
      seed: shuffling seed.
      shard_index, shard_count: this process's part of each global batch (``jax.process_index/count``).

    Raises:
      FileNotFoundError / ValueError: as ``open_shards``; a bad shard index.
    """

    def __init__(self, path: str, site: str = CUSTOM, seed: int = 0, shard_index: int = 0, shard_count: int = 1):
        self._arrays, manifest = open_shards(path)
        site = site if site != CUSTOM or manifest is None else manifest["site"]
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
            out[where[order]] = self._arrays[i][local[order]]  # casts bfloat16 storage to float32
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


class ModelSource:
    """Activations of many sites of a Gemma model, all from ONE forward pass per batch of token sequences.

    Chunk ``k`` is the sequence reader's batch ``k`` of ``chunk_sequences`` sequences (so chunks are disjoint
    across processes). Its sequences run through the model ``forward_batch`` at a time, capturing every site at
    once (layers after the deepest site are skipped); positions whose mask is False (BOS, EOS, padding; Gemma
    Scope §3) are dropped. The chunk's ``n_k`` activation rows are the shuffle buffer: they are permuted with
    ``(seed, k, pass)`` — the same permutation for every site, so row i of each site is the same token — and cut
    into ``n_k // batch_size`` batches (the remainder is dropped). ``passes > 1`` visits each buffer that many
    times in fresh permutations: fewer LM forward passes per SAE step, at the cost of data diversity (1 is the
    paper's setting). Batch numbering is a pure function of the reader, seed and batch size, found by counting
    mask entries (no forward pass), so a resumed run gets exactly the batches it would have got.

    Args:
      lm: a ``model.LoadedModel``.
      reader: a ``data.SequenceReader`` (its process index/count shard the chunks).
      sites: the sites to capture, ``Site`` objects.
      chunk_sequences: sequences per shuffle buffer.
      forward_batch: sequences per forward pass (a divisor of ``chunk_sequences``).
      passes: visits of each buffer (>= 1).
      seed: permutation seed.
      buffer_dtype: ``"float32"`` or ``"bfloat16"`` storage of the buffer (batches are always float32).

    Raises:
      ValueError: a site beyond the model's layers, bad sizes or dtype.
    """

    def __init__(self, lm, reader, sites, *, chunk_sequences: int, forward_batch: int, passes: int = 1,
                 seed: int = 0, buffer_dtype: str = "float32"):
        if forward_batch < 1 or chunk_sequences < 1:
            raise ValueError(f"data.forward_batch={forward_batch} and data.chunk_sequences={chunk_sequences} must be >= 1")
        if chunk_sequences % forward_batch:
            raise ValueError(f"data.chunk_sequences={chunk_sequences} must be a multiple of data.forward_batch={forward_batch}")
        if passes < 1:
            raise ValueError(f"data.passes must be >= 1, got {passes}")
        if buffer_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"data.buffer_dtype must be 'float32' or 'bfloat16', got {buffer_dtype!r}")
        cfg = lm.config
        for site in sites:
            if site.layer >= cfg.num_layers:
                raise ValueError(f"site {site} is beyond {cfg.name}'s layers 0..{cfg.num_layers - 1}")
        self._sites = list(sites)
        self.sites = [str(s) for s in self._sites]
        self.d_in = {str(s): cfg.site_width(s.kind) for s in self._sites}
        self._lm, self._reader = lm, reader
        self.model_name = cfg.name
        self.num_layers = cfg.num_layers
        self._chunk, self._forward_batch, self._passes, self._seed = chunk_sequences, forward_batch, passes, seed
        self._buffer_dtype = jnp.bfloat16 if buffer_dtype == "bfloat16" else jnp.float32
        capture = tuple(self._sites)
        self._forward = jax.jit(lambda params, tokens: model.forward(params, cfg, tokens, capture=capture, logits=False).acts)
        self._cached, self._cached_perm = (None, None), (None, None)

    def chunk(self, k: int) -> dict[str, np.ndarray]:
        """Chunk k's content-token activations ``{site: [n_k, d]}`` in token order, in the buffer dtype (the last
        chunk is cached)."""
        if self._cached[0] != k:
            batch = self._reader.batch(k, self._chunk)
            parts = {s: [] for s in self.sites}
            for i in range(0, self._chunk, self._forward_batch):
                tokens, mask = batch["tokens"][i:i + self._forward_batch], batch["mask"][i:i + self._forward_batch]
                acts = self._forward(self._lm.params, tokens)
                for site, name in zip(self._sites, self.sites):
                    parts[name].append(np.asarray(acts[site].astype(self._buffer_dtype))[mask])
            self._cached = (k, {s: np.concatenate(p) for s, p in parts.items()})
        return self._cached[1]

    def _permutation(self, k: int, p: int, n: int) -> np.ndarray:
        """Row order of pass p over chunk k's n rows (the last one is cached)."""
        if self._cached_perm[0] != (k, p):
            self._cached_perm = ((k, p), np.random.default_rng((self._seed, k, p)).permutation(n))
        return self._cached_perm[1]

    def _batches_in(self, k: int, batch_size: int) -> int:
        return self._passes * (int(self._reader.batch(k, self._chunk)["mask"].sum()) // batch_size)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batch number start, start+1, ... as ``{site: float32 [batch_size, d]}`` (class docstring)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        k, first = 0, 0  # chunk k holds batches [first, first + count)
        while first + (count := self._batches_in(k, batch_size)) <= start:
            k, first = k + 1, first + count
        b = start
        while True:
            buffer = self.chunk(k)
            per_pass = count // self._passes
            rows_in_buffer = len(buffer[self.sites[0]])
            for j in range(b - first, count):
                p, i = divmod(j, per_pass)
                rows = self._permutation(k, p, rows_in_buffer)[i * batch_size:(i + 1) * batch_size]
                yield {s: buffer[s][rows].astype(np.float32) for s in self.sites}
            b, first, k = first + count, first + count, k + 1
            count = self._batches_in(k, batch_size)


def make_source(data_config, seed: int, shard_index: int = 0, shard_count: int = 1) -> ActivationSource:
    """Builds the activation source a config's ``data`` block describes.

    ``data.source``:
      ``"npy"``: ``NpyShardSource(data.path, data.site or CUSTOM, seed, ...)``;
      ``"model"``: ``ModelSource`` over ``data.model`` (``model.load``) reading ``data.sites`` from the corpus
        ``data.corpus`` (split ``train``, ``data.seq_len`` tokens per sequence, ``data.packing``).

    Raises:
      ValueError: an unknown ``data.source`` or a missing ``data.path`` / ``data.model``.
      FileNotFoundError: a missing corpus or checkpoint (the message says how to make or point at one).
    """
    if data_config.source == "npy":
        if not data_config.get("path"):
            raise ValueError("data.source='npy' needs data.path: a directory of float32 .npy files [N, d]")
        return NpyShardSource(data_config.path, data_config.get("site") or CUSTOM, seed, shard_index, shard_count)
    if data_config.source == "model":
        from gemma_scope.data import SequenceReader
        from gemma_scope.sites import parse_sites

        if not data_config.get("model"):
            raise ValueError("data.source='model' needs data.model: 'gemma3_270m' (embedded) or the path of a Gemma "
                             "checkpoint (Hugging Face directory or orbax checkpoint)")
        lm = model.load(data_config.model, config=data_config.get("model_config") or None)
        reader = SequenceReader(data_config.corpus or None, split="train", seq_len=data_config.seq_len,
                                packing=data_config.packing, seed=seed, process_index=shard_index,
                                process_count=shard_count, tokenizer=lm.tokenizer)
        source = ModelSource(lm, reader, parse_sites(data_config.sites, lm.config.num_layers),
                             chunk_sequences=data_config.chunk_sequences, forward_batch=data_config.forward_batch,
                             passes=data_config.passes, seed=seed, buffer_dtype=data_config.buffer_dtype)
        return source
    raise ValueError(f"unknown data.source {data_config.source!r}; expected one of ['npy', 'model']")


_CONFIG = None  # the --config flag, defined when run as a command (train defines its own)


def main(argv: list[str]) -> dict[str, pathlib.Path]:
    """``python -m gemma_scope.activations``: writes activation shards of the config's model sites (module
    docstring); ``data`` and ``seed`` come from the config (``configs.lm_data`` defaults)."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=experiments/<name>.py is required")
    config, out = _CONFIG.value, flags.FLAGS.out
    if config.data.source != "model":
        raise ValueError(f"data.source must be 'model' to write activations, got {config.data.source!r}")
    source = make_source(config.data, config.seed)
    data = config.data
    token_source = {"model": data.model, "corpus": data.corpus or "default", "split": "train",
                    "seq_len": data.seq_len, "packing": data.packing, "seed": config.seed,
                    "chunk_sequences": data.chunk_sequences}
    dirs = write_shards(source, out, flags.FLAGS.tokens, flags.FLAGS.storage_dtype, token_source)
    for directory in dirs.values():
        print(directory)
    return dirs


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from gemma_scope import cli

    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/<name>.py)")
    flags.DEFINE_string("out", None, "output directory (one subdirectory per site)", required=True)
    flags.DEFINE_integer("tokens", None, "content-token activations to write per site", required=True)
    flags.DEFINE_enum("storage_dtype", "float32", sorted(STORAGE_DTYPES), "dtype of the written shards")
    cli.run_app(main)
