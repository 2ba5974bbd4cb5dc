"""Feeding an activation source to the mesh: finite checks, the normalisation constants (Gemma Scope §3) and the
prefetch thread that places numbered batches on the devices while the step runs."""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np

from gemma_scope import hosts, sae, step as step_lib
from gemma_scope.sites import Site, transcoder_target


def check_finite_batch(batch: dict[str, np.ndarray], number: int) -> None:
    """Raises ValueError naming the batch and site if the source gave NaN/Inf activations."""
    for site, x in batch.items():
        if not np.isfinite(x).all():
            raise ValueError(f"activation source gave non-finite values in batch {number}, site {site!r} "
                             f"({x.size - np.isfinite(x).sum()} values); expected finite float32 activations")


def normalisation_constants(source, sites: list[str], batch_size: int, n_batches: int,
                            b_dec_init: str = "zero") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """C per site with ``E||x / C||² = 1`` (Gemma Scope §3) and each site's initial b_dec in normalised units,
    both from one pass over the source's first ``n_batches`` batches.

    ``b_dec_init``: ``"zero"`` (the paper, §3), ``"mean"`` (the activations' mean / C) or ``"geometric_median"``
    (``sae.geometric_median`` of these batches / C; it holds them in memory, and on several processes averages the
    per-process medians). Deviation from the paper where the mean is used: Adam moves b_dec by about the learning
    rate per step, so a short run never reaches a residual stream's mean (≈ 79% of E||x||² at Gemma 3 270M's
    layer 8) from 0; issue 12 measured loss recovered 52–66% from zero, 74–88% from the mean (res.8, 1,600 steps).

    Returns:
      ``(C float32 [len(sites)], {site: float32 [d]})``.

    Raises:
      ValueError: activations all zero or not finite; an unknown ``b_dec_init``.
    """
    if b_dec_init not in sae.B_DEC_INITS:
        raise ValueError(f"b_dec_init must be one of {sae.B_DEC_INITS}, got {b_dec_init!r}")
    sums = np.zeros(len(sites), np.float64)
    means: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    for number, batch in zip(range(n_batches), source.batches(batch_size, 0)):
        check_finite_batch(batch, number)
        sums += [np.mean(np.sum(np.square(batch[s], dtype=np.float64), axis=-1)) for s in sites]
        for s in sites:
            means[s] = means.get(s, 0.0) + np.mean(batch[s], axis=0, dtype=np.float64) / n_batches
            if b_dec_init == "geometric_median":
                kept[s].append(np.asarray(batch[s], np.float32))
    mean_sq = hosts.global_mean(sums / n_batches)
    if not (np.isfinite(mean_sq).all() and (mean_sq > 0).all()):
        raise ValueError(f"cannot normalise sites {sites}: mean squared norms {mean_sq.tolist()} (zero or not finite)")
    constants = np.sqrt(mean_sq).astype(np.float32)
    b_dec = {}
    for s, c in zip(sites, constants):
        if b_dec_init == "zero":
            centre = np.zeros_like(means[s])
        elif b_dec_init == "mean":
            centre = hosts.global_mean(means[s])
        else:
            centre = hosts.global_mean(np.asarray(sae.geometric_median(np.concatenate(kept[s])), np.float64))
        b_dec[s] = (centre / c).astype(np.float32)
    return constants, b_dec


class Prefetcher:
    """Reads, checks and places batches ``start, start+1, ...`` on the mesh in a background thread.

    ``get()`` returns the next ``{group: [n_sites, batch_size, d]}`` global arrays (``step.batch_sharding``), a
    pair ``(x, y)`` of them for a transcoder group (its sites' activations and those of the sites they predict), or
    re-raises what the source raised; ``close()`` stops the thread.
    """

    def __init__(self, source, groups: dict[str, list[str]], grid: dict[str, step_lib.Group], batch_size: int,
                 start: int, count: int, mesh):
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
                        stacks = [np.stack([batch[s] for s in sites])]
                        if grid[g].transcoder:
                            stacks.append(np.stack([batch[str(transcoder_target(Site.parse(s)))] for s in sites]))
                        arrays = tuple(jax.make_array_from_process_local_data(
                            sharding, x, (len(sites), batch_size, x.shape[-1])) for x in stacks)
                        placed[g] = arrays if grid[g].transcoder else arrays[0]
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
