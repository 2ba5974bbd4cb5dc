"""Shuffle buffers on the devices, shared by every activation source (``activations``): each buffer's token axis
is split over every device of the mesh, one slot per device, and each device gathers its share of every batch
from its own slot with one ``jnp.take``; the host holds only permutation indices and never waits on the device.
The next buffer is loaded in a background thread (``BufferLoads``) while the current one is trained on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_scope.mesh import batch_sharding

SLOTS = ("data", "model")  # the buffer's token axis is split over every device of the mesh, data-major


def _free_bytes(device: jax.Device, devices_sharing: int) -> int | None:
    """Memory free on ``device`` (accelerators: ``memory_stats``; CPU devices: the host's available memory split
    among this process's devices); None if unknown."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None
    return kib * 1024 // devices_sharing


class ShuffleBuffers:
    """Shuffle buffers on a mesh: a slot of ``rows`` rows per device, one array ``[n_sites, devices·rows, d]``
    per group with the token axis split over every device (``SLOTS``).

    Each process fills the slots of its own devices (so buffers change at each process's own pace); a buffer's
    slot ``s`` has ``valid[s]`` rows, visited ``passes`` times, each time in a fresh permutation seeded by
    ``(*seed, pass, s)``. Global batch ``i`` of a buffer is, on every device, rows ``[i·b, (i+1)·b)`` of its
    slot's permutation with ``b = batch_size / devices``: one device-local ``jnp.take`` (no communication), then
    the step's batch sharding (an all-gather over ``'model'`` when that axis is > 1). A buffer yields
    ``passes · (min_s valid[s] // b)`` batches (the rest of each slot is dropped).

    Args:
      mesh: the trainer's ('data', 'model') mesh.
      widths: ``{group: (n_sites, d)}``.
      rows: slot rows per device.
      dtype: buffer dtype.
      passes: visits of each buffer.
    """

    def __init__(self, mesh: Mesh, widths: dict[str, tuple[int, int]], rows: int, dtype, passes: int = 1):
        devices = list(mesh.devices.flat)
        self.mesh, self.widths, self.rows, self.dtype, self.passes = mesh, widths, rows, jnp.dtype(dtype), passes
        self.count = len(devices)
        self.local = [s for s, d in enumerate(devices) if d.process_index == jax.process_index()]
        self.local_devices = [devices[s] for s in self.local]
        self.local_mesh = Mesh(np.array(self.local_devices), ("slot",))
        self._sharding = NamedSharding(mesh, P(None, SLOTS, None))
        self._slot_sharding = NamedSharding(mesh, P(SLOTS))
        self._gathers: dict[int, Callable] = {}
        self._pending: list[tuple[int, int, int, dict]] = []  # (buffer, first batch, end batch, finite flags)

    @property
    def bytes_per_device(self) -> int:
        """Device bytes of one buffer's slot and its permutations."""
        return self.rows * (sum(n * d for n, d in self.widths.values()) * self.dtype.itemsize + 4 * self.passes)

    def check_fits(self, fields: str) -> None:
        """Prints the buffer's size; raises MemoryError (naming ``fields``) if two buffers (the one in use and
        the next one filling) do not fit in a device's free memory."""
        need = 2 * self.bytes_per_device
        if jax.process_index() == 0:
            print(f"shuffle buffer: {self.count * self.rows:,} rows ({self.rows:,} per device on {self.count} "
                  f"device(s)), {self.bytes_per_device / 2**20:,.1f} MiB per device; 2 live while the next one "
                  "fills", file=sys.stderr, flush=True)
        free = _free_bytes(self.local_devices[0], len(self.local_devices))
        if free is not None and need > free:
            raise MemoryError(f"two shuffle buffers need {need / 2**30:.2f} GiB per device but "
                              f"{self.local_devices[0]} has {free / 2**30:.2f} GiB free; lower {fields}")

    def per_slot(self, batch_size: int) -> int:
        """Rows each device gathers per batch; ValueError unless ``batch_size`` splits evenly over the devices."""
        if batch_size <= 0 or batch_size % self.count:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the number of devices "
                             f"{self.count} (each device gathers an equal share of every batch from its slot)")
        return batch_size // self.count

    def batches_in(self, valid: np.ndarray, batch_size: int) -> int:
        """Batches a buffer whose slots hold ``valid`` rows yields."""
        return self.passes * (int(np.min(valid)) // self.per_slot(batch_size))

    def _global(self, shards: list[jax.Array], shape: tuple[int, ...], sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    def view(self, local: dict[str, list[jax.Array]]) -> dict[str, jax.Array]:
        """The global buffers ``{group: [n, devices·rows, d]}`` over this process's per-device slots (no copy)."""
        return {g: self._global(shards, (shards[0].shape[0], self.count * self.rows, shards[0].shape[2]),
                                self._sharding) for g, shards in local.items()}

    def permutations(self, valid: np.ndarray, seed: tuple[int, ...]) -> jax.Array:
        """int32 ``[devices, passes, rows]``: each local slot's row order per pass (padded with 0), on its device."""
        shards = []
        for s, n, device in zip(self.local, valid, self.local_devices):
            order = np.zeros((1, self.passes, self.rows), np.int32)
            for p in range(self.passes):
                order[0, p, :n] = np.random.default_rng((*seed, p, s)).permutation(int(n))
            shards.append(jax.device_put(order, device))
        return self._global(shards, (self.count, self.passes, self.rows), self._slot_sharding)

    def _gather(self, per_slot: int) -> Callable:
        if per_slot not in self._gathers:
            def take(buffers, order, position):  # one device's slot, its row orders and (pass, batch)
                rows = jax.lax.dynamic_slice_in_dim(order[0, position[0, 0]], position[0, 1] * per_slot, per_slot)
                return {g: jnp.take(x, rows, axis=1) for g, x in buffers.items()}

            self._gathers[per_slot] = jax.jit(
                jax.shard_map(take, mesh=self.mesh, in_specs=(P(None, SLOTS, None), P(SLOTS), P(SLOTS)),
                              out_specs=P(None, SLOTS, None)),
                out_shardings=batch_sharding(self.mesh))
        return self._gathers[per_slot]

    def stream(self, batch_size: int, start: int, stop: int | None, count_of: Callable[[int], int],
               load) -> Iterator[dict]:
        """Global batches ``start, start+1, ...`` (before ``stop``, if given) from buffers ``u = 0, 1, ...``.

        ``count_of(u)``: batches of buffer u (from its valid counts, host only); ``load(u)``: a future of
        ``(view(...), permutations(...), {group: finite flags})``, asked for one buffer ahead while the stream will
        reach it.
        """
        per_slot = self.per_slot(batch_size)
        gather = self._gather(per_slot)
        u, first = 0, 0
        while first + (count := count_of(u)) <= start:
            u, first = u + 1, first + count
        b = start
        while stop is None or b < stop:  # buffer u holds batches [first, first + count)
            buffers, order, finite = load(u).result()
            self._pending.append((u, first, first + count, finite))
            if stop is None or first + count < stop:
                load(u + 1)  # the next buffer's reads and forward pass start now
            per_pass = count // self.passes
            for j in range(b - first, count if stop is None else min(count, stop - first)):
                position = np.tile(np.array(divmod(j, per_pass), np.int32), (len(self.local), 1))
                yield gather(buffers, order, jax.make_array_from_process_local_data(
                    self._slot_sharding, position, (self.count, 2)))
            u, first = u + 1, first + count
            b = first
            if stop is None or b < stop:
                count = count_of(u)

    def check_finite(self, groups: dict[str, list[str]]) -> None:
        """Raises ValueError if a buffer handed out so far held NaN/Inf (fetches a few flags per buffer)."""
        pending, self._pending = self._pending, []
        for u, first, end, finite in pending:
            for g, flags in finite.items():
                ok = np.concatenate([np.asarray(f).reshape(-1, len(groups[g])) for f in flags]).all(axis=0)
                if not ok.all():
                    site = groups[g][int(np.argmin(ok))]
                    raise ValueError(f"activation source gave non-finite values in batches {first}–{end - 1} "
                                     f"(shuffle buffer {u}), site {site!r}; expected finite activations")


class BufferLoads:
    """Futures of a source's buffer loads, run one at a time in a background thread; the two most recently
    asked for are kept, so a stream restarted at the same place (normalisation, then training) reuses them."""

    def __init__(self, load: Callable[[int], tuple]):
        self._load, self._futures = load, collections.OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="activations")

    def __call__(self, u: int) -> concurrent.futures.Future:
        if u not in self._futures:
            self._futures[u] = self._pool.submit(self._load, u)
        self._futures.move_to_end(u)
        while len(self._futures) > 2:
            self._futures.popitem(last=False)
        return self._futures[u]


_READERS = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="npy-read")


def read_rows(arrays: list[np.ndarray], blocks: np.ndarray, lo: int, hi: int, rows: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of the concatenated ``blocks`` (``(array, first row, end row)`` of ``arrays [N_i, d]``,
    e.g. memory-mapped shards) as one slot ``[1, rows, d]`` in the arrays' dtype, zero padded; the pieces are
    copied by a pool of threads."""
    out = np.zeros((1, rows, arrays[0].shape[1]), arrays[0].dtype)
    pieces, at, filled = [], 0, 0
    for file, a, b in blocks:
        take_lo, take_hi = max(lo, at), min(hi, at + b - a)
        if take_lo < take_hi:
            pieces.append((filled, file, a + take_lo - at, take_hi - take_lo))
            filled += take_hi - take_lo
        at += b - a

    def copy(piece):
        to, file, first, n = piece
        out[0, to:to + n] = arrays[file][first:first + n]  # NumPy drops the GIL while copying

    list(_READERS.map(copy, pieces))
    return out
