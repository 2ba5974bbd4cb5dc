"""Sources of site activations for the trainer: the ``ActivationSource`` protocol and its implementations.

A source names its sites (``"res.3"``, or ``sites.CUSTOM`` for activations not tied to a model site) and yields
numbered global batches ``{group: [n_sites, batch_size, d]}`` (sites grouped by width, ``group_sites``) as
``jax.Array``s laid out as the train step wants them (``mesh.batch_sharding``). Batch ``b`` is a pure function of
(source config, seed, mesh size, b), so a resumed run sees exactly the batches an uninterrupted run would have seen.

The shuffle buffers live on the devices (``buffers.ShuffleBuffers``); the host holds only token ids, masks and
permutation indices, and never waits on the device.

Activations can also be written to disk once and reused (``python -m gemma_scope.activations``, ``shards``).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_scope import model
from gemma_scope.activations.buffers import BufferLoads, ShuffleBuffers, read_rows
from gemma_scope.activations.shards import open_shards
from gemma_scope.mesh import single_device_mesh
from gemma_scope.sites import CUSTOM

NPY_BLOCK_ROWS = 4096  # rows of one contiguous read from a shard file


def group_sites(sites: list[str], d_in: dict[str, int]) -> dict[str, list[str]]:
    """Sites grouped by input width (one stacked group each): ``{"d<width>": [site, ...]}``, in ``sites`` order."""
    groups: dict[str, list[str]] = {}
    for site in sites:
        groups.setdefault(f"d{d_in[site]}", []).append(site)
    return groups


class ActivationSource(Protocol):
    """Numbered batches of activations of one or more sites (see the module docstring)."""

    sites: list[str]
    d_in: dict[str, int]
    groups: dict[str, list[str]]

    def batches(self, batch_size: int, start: int = 0, mesh: Mesh | None = None,
                stop: int | None = None) -> Iterator[dict[str, jax.Array]]:
        """Global batch number start, start+1, ... (up to ``stop``, endless if None); each ``{group: [n_sites,
        batch_size, d_in]}`` in the step's batch sharding on ``mesh`` (default ``single_device_mesh()``), in the
        buffer's dtype. No buffer past ``stop`` is prepared."""
        ...

    def check_finite(self) -> None:
        """Raises ValueError naming the batches and site if a buffer handed out so far held NaN/Inf."""
        ...


class NpyShardSource:
    """Activations of one site cached on disk as ``.npy`` files, each ``[N_i, d]`` (``open_shards``), read
    memory-mapped in contiguous blocks of ``NPY_BLOCK_ROWS`` rows and shuffled on the devices.

    Every epoch the blocks of all files are put in a fresh order (seeded by ``(seed, epoch)``) and taken
    ``buffer_rows // NPY_BLOCK_ROWS`` at a time into a shuffle buffer (``ShuffleBuffers``; its rows are split into
    equal contiguous slots, one per device; each process reads only its own devices' slots, in a background
    thread while the previous buffer is trained on). Each row is visited at most once per epoch; the few rows of a
    buffer that do not fill a batch are dropped. Batches are in the storage dtype (float32 or bfloat16).

    Args:
      path: directory holding the ``.npy`` files (sorted by name) — float32 (or bfloat16 with a manifest), 2-D,
        with the same d.
      site: name of the site the activations come from (``"res.12"``), or ``CUSTOM`` (then the site of the
        directory's manifest, if it has one).
      seed: shuffling seed.
      buffer_rows: rows per shuffle buffer (over all devices).

    Raises:
      FileNotFoundError / ValueError: as ``open_shards``; ``buffer_rows`` < 1.
    """

    def __init__(self, path: str, site: str = CUSTOM, seed: int = 0, buffer_rows: int = 2**18):
        self._arrays, manifest = open_shards(path)
        if buffer_rows < 1:
            raise ValueError(f"data.buffer_rows must be >= 1, got {buffer_rows}")
        site = site if site != CUSTOM or manifest is None else manifest["site"]
        # Where the activations came from, when the manifest says (``activations.shards``): the release records it.
        self.model_name = manifest.get("model") if manifest else None
        self.seq_len = (manifest.get("token_source") or {}).get("seq_len") if manifest else None
        self.sites = [site]
        self.d_in = {site: int(self._arrays[0].shape[1])}
        self.groups = group_sites(self.sites, self.d_in)
        block = min(NPY_BLOCK_ROWS, buffer_rows)
        self._blocks = np.array([(i, a, min(a + block, len(x))) for i, x in enumerate(self._arrays)
                                 for a in range(0, len(x), block)], np.int64)  # (file, first row, end row)
        self._per_buffer = max(1, buffer_rows // block)
        self._buffers_per_epoch = -(-len(self._blocks) // self._per_buffer)
        self._seed, self._order = seed, (None, None)
        self._buffers: ShuffleBuffers | None = None
        self._loads: BufferLoads | None = None

    @property
    def num_rows(self) -> int:
        """Total number of activation rows over all files."""
        return sum(len(a) for a in self._arrays)

    def _buffer_blocks(self, u: int) -> np.ndarray:
        """The blocks of buffer u (epoch u // buffers per epoch), in order."""
        epoch, j = divmod(u, self._buffers_per_epoch)
        order = self._order  # read once: the loader thread and the batch counter both call this
        if order[0] != epoch:
            order = self._order = (epoch, np.random.default_rng((self._seed, epoch)).permutation(len(self._blocks)))
        return self._blocks[order[1][j * self._per_buffer:(j + 1) * self._per_buffer]]

    def _slot_bounds(self, u: int) -> np.ndarray:
        """Row bounds ``[devices + 1]`` of each slot within buffer u's concatenated blocks."""
        blocks = self._buffer_blocks(u)
        n = int(np.sum(blocks[:, 2] - blocks[:, 1]))
        return np.arange(self._buffers.count + 1) * n // self._buffers.count

    def _load(self, u: int):
        buffers = self._buffers
        blocks, bounds = self._buffer_blocks(u), self._slot_bounds(u)
        slots = [jax.device_put(read_rows(self._arrays, blocks, bounds[s], bounds[s + 1], buffers.rows), device)
                 for s, device in zip(buffers.local, buffers.local_devices)]
        (group,) = self.groups
        finite = {group: [_all_finite(x) for x in slots]}
        valid = np.diff(bounds)[buffers.local]
        return buffers.view({group: slots}), buffers.permutations(valid, (self._seed, u)), finite

    def batches(self, batch_size: int, start: int = 0, mesh: Mesh | None = None,
                stop: int | None = None) -> Iterator[dict[str, jax.Array]]:
        """Global batch number start, start+1, ... (before ``stop``) as ``{group: [1, batch_size, d]}`` (class
        docstring)."""
        mesh = mesh or single_device_mesh()
        if self._buffers is None or self._buffers.mesh != mesh:
            largest = int(np.sort(self._blocks[:, 2] - self._blocks[:, 1])[-self._per_buffer:].sum())
            count = mesh.devices.size
            self._buffers = ShuffleBuffers(mesh, {g: (1, self.d_in[s[0]]) for g, s in self.groups.items()},
                                           -(-largest // count), self._arrays[0].dtype)
            self._buffers.check_fits("data.buffer_rows")
            self._loads = BufferLoads(self._load)
        per_slot = self._buffers.per_slot(batch_size)
        if all(np.diff(self._slot_bounds(u)).min() < per_slot for u in range(self._buffers_per_epoch)):
            raise ValueError(f"no shuffle buffer of {self.num_rows:,} rows fills a batch of {batch_size} "
                             f"({per_slot} rows on each of {self._buffers.count} devices); raise data.buffer_rows "
                             "or lower train.batch_size")
        return self._buffers.stream(batch_size, start, stop, lambda u: self._buffers.batches_in(
            np.diff(self._slot_bounds(u)), batch_size), self._loads)

    def check_finite(self) -> None:
        """Raises ValueError naming the batches if a buffer handed out so far held NaN/Inf."""
        if self._buffers is not None:
            self._buffers.check_finite(self.groups)


_all_finite = jax.jit(lambda x: jnp.isfinite(x).all(axis=(1, 2)))


class ModelSource:
    """Activations of many sites of a Gemma model, all from ONE forward pass per batch of token sequences, kept on
    the devices from the forward pass to the SAE step.

    Chunk ``k`` is the sequence reader's batch ``k`` of ``chunk_sequences`` sequences (so chunks are disjoint
    across processes). It is split into equal contiguous runs of sequences, one per device of this process (the
    last runs padded with empty sequences); every device runs the model on its run, ``forward_batch`` sequences
    at a time over all devices, capturing every site at once (layers after the deepest site are skipped), and
    writes the content tokens (mask True: not BOS, EOS, padding; Gemma Scope §3) into its slot of the shuffle
    buffer (``ShuffleBuffers``), in the buffer dtype — all in one jitted call per chunk that the host does not
    wait for. Each slot is visited ``passes`` times in fresh permutations seeded by ``(seed, k, pass, slot)``:
    fewer LM forward passes per SAE step, at the cost of data diversity (1 is the paper's setting). Batch
    counts come from the masks (no forward pass), so a resumed run gets exactly the batches it would have got.

    Args:
      lm: a ``model.LoadedModel``.
      reader: a ``data.SequenceReader`` (its process index/count shard the chunks; its ``seq_len`` is used).
      sites: the sites to capture, ``Site`` objects.
      chunk_sequences: sequences per shuffle buffer (per process).
      forward_batch: sequences per forward pass over all of this process's devices.
      passes: visits of each buffer (>= 1).
      seed: permutation seed.
      buffer_dtype: ``"float32"`` or ``"bfloat16"``: the buffer and the batches.

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
        self._sites = {str(s): s for s in sites}
        self.sites = list(self._sites)
        self.d_in = {str(s): cfg.site_width(s.kind) for s in sites}
        self.groups = group_sites(self.sites, self.d_in)
        self._lm, self._reader = lm, reader
        self.model_name, self.seq_len = cfg.name, reader.seq_len
        self.num_layers = cfg.num_layers
        self._chunk, self._forward_batch, self._passes, self._seed = chunk_sequences, forward_batch, passes, seed
        self._buffer_dtype = jnp.dtype(buffer_dtype)
        self._valid: dict[int, np.ndarray] = {}
        self._reading = threading.Lock()
        self._mesh, self._buffers, self._loads = None, None, None

    def _layout(self, mesh: Mesh) -> None:
        """Buffers, jitted fill and replicated params for ``mesh`` (once per mesh)."""
        if self._mesh == mesh:
            return
        local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self._per_forward = max(1, self._forward_batch // local)  # sequences per device per forward pass
        per_device = -(-self._chunk // local)
        self._per_device = -(-per_device // self._per_forward) * self._per_forward
        seq_len = self._reader.seq_len
        widths = {g: (len(s), self.d_in[s[0]]) for g, s in self.groups.items()}
        self._buffers = ShuffleBuffers(mesh, widths, self._per_device * seq_len, self._buffer_dtype, self._passes)
        self._buffers.check_fits("data.chunk_sequences, data.seq_len or data.buffer_dtype, or capture fewer "
                                 "data.sites per run")
        self._params = jax.device_put(self._lm.params, NamedSharding(self._buffers.local_mesh, P()))
        self._fill = self._make_fill(seq_len)
        self._mesh, self._valid, self._loads = mesh, {}, BufferLoads(self._load)

    def _make_fill(self, seq_len: int) -> Callable:
        """jit: (params, tokens, mask ``[devices·per_device, T]``) → local buffers and finite flags."""
        cfg, capture, rows, dtype = self._lm.config, tuple(self._sites.values()), self._buffers.rows, self._buffer_dtype
        per_forward, groups = self._per_forward, self.groups

        def fill(params, tokens, mask):  # one device's run of sequences
            def forward(carry, batch):
                buffers, filled, finite = carry
                t, m = batch
                acts = model.forward(params, cfg, t, capture=capture, logits=False).acts
                m = m.reshape(-1)
                where = jnp.where(m, filled + jnp.cumsum(m) - 1, rows)  # content tokens in order; the rest dropped
                buffers, finite = dict(buffers), dict(finite)
                for g, names in groups.items():
                    x = jnp.stack([acts[self._sites[s]].reshape(m.size, -1) for s in names]).astype(dtype)
                    buffers[g] = buffers[g].at[:, where].set(x, mode="drop")
                    finite[g] &= jnp.all(jnp.isfinite(x) | ~m[None, :, None], axis=(1, 2))
                return (buffers, filled + m.sum(), finite), None

            init = ({g: jnp.zeros((len(s), rows, self.d_in[s[0]]), dtype) for g, s in groups.items()},
                    jnp.zeros((), jnp.int32), {g: jnp.ones(len(s), bool) for g, s in groups.items()})
            batches = (tokens.reshape(-1, per_forward, seq_len), mask.reshape(-1, per_forward, seq_len))
            (buffers, _, finite), _ = jax.lax.scan(forward, init, batches)
            return buffers, {g: f[None] for g, f in finite.items()}

        return jax.jit(jax.shard_map(fill, mesh=self._buffers.local_mesh, in_specs=(P(), P("slot"), P("slot")),
                                     out_specs=(P(None, "slot", None), P("slot")), check_vma=False))

    def _tokens(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk k's tokens and mask ``[devices·per_device, T]``, padded with empty sequences."""
        with self._reading:  # the loader thread and the batch counter share the reader's caches
            batch = self._reader.batch(k, self._chunk)
        shape = (len(self._buffers.local) * self._per_device, batch["tokens"].shape[1])
        tokens, mask = np.zeros(shape, np.int32), np.zeros(shape, bool)
        tokens[:self._chunk], mask[:self._chunk] = batch["tokens"], batch["mask"]
        return tokens, mask

    def _valid_rows(self, k: int) -> np.ndarray:
        """Content tokens of chunk k in each local slot (from the masks alone)."""
        if k not in self._valid:
            self._valid[k] = self._tokens(k)[1].reshape(len(self._buffers.local), -1).sum(axis=1)
        return self._valid[k]

    def _local_chunk(self, k: int):
        """Dispatches chunk k's fill; ``({group: local array [n, devices·rows, d]}, flags, valid per slot)``."""
        tokens, mask = self._tokens(k)
        sharding = NamedSharding(self._buffers.local_mesh, P("slot"))
        buffers, finite = self._fill(self._params, jax.device_put(tokens, sharding), jax.device_put(mask, sharding))
        return buffers, finite, mask.reshape(len(self._buffers.local), -1).sum(axis=1)

    def _load(self, k: int):
        buffers, finite, valid = self._local_chunk(k)
        shards = {g: [s.data for s in sorted(x.addressable_shards, key=lambda s: s.index[1].start)]
                  for g, x in buffers.items()}
        return self._buffers.view(shards), self._buffers.permutations(valid, (self._seed, k)), \
            {g: [f] for g, f in finite.items()}

    def chunk(self, k: int, mesh: Mesh | None = None, dtype=None) -> dict[str, np.ndarray]:
        """Chunk k's content-token activations ``{site: [n_k, d]}`` in token order, in ``dtype`` (default the
        buffer dtype), cast on the device: one device-to-host transfer per site. ``mesh``: this process's
        devices share the forward passes (default ``single_device_mesh()``)."""
        self._layout(mesh or single_device_mesh())
        buffers, _, valid = self._local_chunk(k)
        rows = self._buffers.rows
        out = {}
        for g, names in self.groups.items():
            for i, site in enumerate(names):
                x = np.asarray(buffers[g][i].astype(dtype or self._buffer_dtype))
                out[site] = np.concatenate([x[s * rows:s * rows + n] for s, n in enumerate(valid)])
        return out

    def batches(self, batch_size: int, start: int = 0, mesh: Mesh | None = None,
                stop: int | None = None) -> Iterator[dict[str, jax.Array]]:
        """Global batch number start, start+1, ... (before ``stop``) as ``{group: [n_sites, batch_size, d]}`` (class
        docstring)."""
        self._layout(mesh or single_device_mesh())
        per_slot = self._buffers.per_slot(batch_size)

        def count_of(k: int) -> int:
            valid = self._valid_rows(k)
            if valid.min() < per_slot:
                raise ValueError(f"chunk {k} gives a device only {valid.min()} content tokens, fewer than its "
                                 f"{per_slot} rows of a batch of {batch_size} on {self._buffers.count} devices; "
                                 "raise data.chunk_sequences (to at least the device count) or lower "
                                 "train.batch_size")
            return self._buffers.batches_in(valid, batch_size)

        return self._buffers.stream(batch_size, start, stop, count_of, self._loads)

    def check_finite(self) -> None:
        """Raises ValueError naming the batches and site if a buffer handed out so far held NaN/Inf."""
        if self._buffers is not None:
            self._buffers.check_finite(self.groups)


def make_source(data_config, seed: int) -> ActivationSource:
    """Builds the activation source a config's ``data`` block describes (this process's part on multi-process runs).

    ``data.source``:
      ``"npy"``: ``NpyShardSource(data.path, data.site or CUSTOM, seed, data.buffer_rows)``;
      ``"model"``: ``ModelSource`` over ``data.model`` (``model.load``) reading ``data.sites`` from the corpus
        ``data.corpus`` (split ``train``, ``data.seq_len`` tokens per sequence, ``data.packing``).

    Raises:
      ValueError: an unknown ``data.source`` or a missing ``data.path`` / ``data.model``.
      FileNotFoundError: a missing corpus or checkpoint (the message says how to make or point at one).
    """
    if data_config.source == "npy":
        if not data_config.get("path"):
            raise ValueError("data.source='npy' needs data.path: a directory of float32 .npy files [N, d]")
        return NpyShardSource(data_config.path, data_config.get("site") or CUSTOM, seed, data_config.buffer_rows)
    if data_config.source == "model":
        from gemma_scope.data import SequenceReader
        from gemma_scope.sites import parse_sites

        if not data_config.get("model"):
            raise ValueError("data.source='model' needs data.model: 'gemma3_270m' (embedded) or the path of a Gemma "
                             "checkpoint (Hugging Face directory or orbax checkpoint)")
        lm = model.load(data_config.model, config=data_config.get("model_config") or None)
        reader = SequenceReader(data_config.corpus or None, split="train", seq_len=data_config.seq_len,
                                packing=data_config.packing, seed=seed, process_index=jax.process_index(),
                                process_count=jax.process_count(), tokenizer=lm.tokenizer)
        source = ModelSource(lm, reader, parse_sites(data_config.sites, lm.config.num_layers),
                             chunk_sequences=data_config.chunk_sequences, forward_batch=data_config.forward_batch,
                             passes=data_config.passes, seed=seed, buffer_dtype=data_config.buffer_dtype)
        return source
    raise ValueError(f"unknown data.source {data_config.source!r}; expected one of ['npy', 'model']")
