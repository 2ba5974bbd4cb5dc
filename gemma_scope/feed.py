"""Feeding an activation source to the mesh: finite checks, the normalisation constants (Gemma Scope §3) and the
prefetch thread that places numbered batches on the devices while the step runs."""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np

from gemma_scope import hosts, step as step_lib


def check_finite_batch(batch: dict[str, np.ndarray], number: int) -> None:
    """Raises ValueError naming the batch and site if the source gave NaN/Inf activations."""
    for site, x in batch.items():
        if not np.isfinite(x).all():
            raise ValueError(f"activation source gave non-finite values in batch {number}, site {site!r} "
                             f"({x.size - np.isfinite(x).sum()} values); expected finite float32 activations")


def normalisation_constants(source, sites: list[str], batch_size: int, n_batches: int) -> np.ndarray:
    """C per site with ``E||x / C||² = 1``, from the source's first ``n_batches`` batches (Gemma Scope §3).

    Returns float32 ``[len(sites)]``. Raises ValueError if the activations are all zero or not finite.
    """
    sums = np.zeros(len(sites), np.float64)
    for number, batch in zip(range(n_batches), source.batches(batch_size, 0)):
        check_finite_batch(batch, number)
        sums += [np.mean(np.sum(np.square(batch[s], dtype=np.float64), axis=-1)) for s in sites]
    mean_sq = hosts.global_mean(sums / n_batches)
    if not (np.isfinite(mean_sq).all() and (mean_sq > 0).all()):
        raise ValueError(f"cannot normalise sites {sites}: mean squared norms {mean_sq.tolist()} (zero or not finite)")
    return np.sqrt(mean_sq).astype(np.float32)


class Prefetcher:
    """Reads, checks and places batches ``start, start+1, ...`` on the mesh in a background thread.

    ``get()`` returns the next ``{group: [n_sites, batch_size, d]}`` global arrays (``step.batch_sharding``), or
    re-raises what the source raised; ``close()`` stops the thread.
    """

    def __init__(self, source, groups: dict[str, list[str]], batch_size: int, start: int, count: int, mesh):
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        sharding = step_lib.batch_sharding(mesh)
        local = batch_size // jax.process_count()

        def work():
            try:
                for number, batch in zip(range(start, start + count), source.batches(local, start)):
                    placed = {}
                    check_finite_batch(batch, number)
                    for g, sites in groups.items():
                        x = np.stack([batch[s] for s in sites])
                        placed[g] = jax.make_array_from_process_local_data(sharding, x, (len(sites), batch_size, x.shape[-1]))
                    if not self._put(placed):
                        return
            except BaseException as e:  # handed to the training loop, which re-raises it
                self._put(e)

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join()
