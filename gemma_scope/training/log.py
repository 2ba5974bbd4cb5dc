"""The training metrics log: ``<workdir>/metrics.jsonl``, one record per SAE per log step, the same values as
TensorBoard event files in ``<workdir>`` (``tensorboard --logdir <workdir>``; one run per workdir, each SAE a
series ``<site>/lambda_<λ>/<metric>`` or, in a target-L0 sweep, ``<site>/target_<L0>/<metric>``, plus
``learning_rate`` and ``tokens_per_s``), and a tqdm bar.

A record holds ``step``, ``site``, ``l0_coefficient`` (λ), ``target_l0`` (None unless the sparsity loss is
"target_l0"), ``lambda_now`` (λ after warmup), ``learning_rate``,
``tokens``, ``tokens_per_s`` and the step's per-SAE metrics (``loss``, ``mse``, ``fvu``, ``l0``, ``dead_fraction``;
a CLT's or crosscoder's also ``fvu_layers`` and a CLT's ``l0_layers``, lists over its layers, which TensorBoard gets
as one series per layer, ``<label>/<sweep>/l0_layers/<i>``).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import tqdm
from tensorboardX import SummaryWriter

from gemma_scope.files import space_for
from gemma_scope.training.grid import Grid

METRICS_FILE = "metrics.jsonl"
# Per-SAE values of a record that become TensorBoard series (the rest are the run's or the SAE's identity).
_RUN_SCALARS = ("learning_rate", "tokens_per_s")
_NOT_SERIES = ("step", "site", "l0_coefficient", "target_l0", "tokens", *_RUN_SCALARS)


def tensorboard_tag(site: str, l0_coefficient: float, target_l0: float | None, metric: str) -> str:
    """The TensorBoard tag of one SAE's metric: ``"res.8/lambda_0.0003/l0"``, or ``"res.8/target_100/l0"`` for an
    SAE of a target-L0 sweep (whose λ may be shared by every target)."""
    sweep = f"lambda_{l0_coefficient:g}" if target_l0 is None else f"target_{target_l0:g}"
    return f"{site}/{sweep}/{metric}"


def truncate(path: pathlib.Path, step: int) -> None:
    """Drops metric records after ``step`` (written by a run that died before its next checkpoint)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


class MetricsLog:
    """Appends metric records to ``<workdir>/metrics.jsonl`` and shows them on a progress bar (process 0 only).

    Args:
      workdir: the run's directory.
      grid: the run's grid; a record per SAE of ``Grid.saes``, in that order, named by its ``SAE.label``.
      batch_size: global tokens per step.
      start, steps: the first step of this process's run and the last step.
    """

    def __init__(self, workdir: pathlib.Path, grid: Grid, batch_size: int, start: int, steps: int):
        self._on = jax.process_index() == 0
        self._path, self._saes, self._batch = pathlib.Path(workdir) / METRICS_FILE, grid.saes, batch_size
        self._writer = None
        if self._on:
            truncate(self._path, start)
            # purge_step: TensorBoard drops events a dead run wrote after the checkpoint this run resumes from.
            self._writer = SummaryWriter(logdir=str(workdir), purge_step=start or None, flush_secs=30)
        self._bar = tqdm.tqdm(total=steps, initial=start, unit="step", disable=not self._on, dynamic_ncols=True)
        self._last_step, self._last_time = start, time.perf_counter()

    def write(self, step: int, metrics: dict) -> None:
        """Logs the host copy of ``train_step``'s metrics after ``step`` steps."""
        now = time.perf_counter()
        tokens_per_s = (step - self._last_step) * self._batch / max(now - self._last_time, 1e-9)
        self._bar.update(step - self._last_step)
        self._last_step, self._last_time = step, now
        if not self._on:
            return
        lr, scale = float(metrics["learning_rate"]), float(metrics["l0_scale"])
        records = [{"step": step, "site": one.label, "l0_coefficient": one.l0_coefficient,
                    "target_l0": one.target_l0, "lambda_now": one.l0_coefficient * scale, "learning_rate": lr,
                    "tokens": step * self._batch, "tokens_per_s": tokens_per_s,
                    **{k: v[one.index].tolist() for k, v in metrics[one.stack].items()}}
                   for one in self._saes]
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        with space_for(self._path, len(data)), open(self._path, "ab", buffering=0) as f:
            size = f.seek(0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:  # a raw write may be short
                    view = view[f.write(view):]
            except OSError:
                f.truncate(size)  # no torn record for the resume to trip over
                raise
        for name in _RUN_SCALARS:
            self._writer.add_scalar(name, records[0][name], step)
        for r in records:
            for key, value in r.items():
                if key in _NOT_SERIES:
                    continue
                tag = tensorboard_tag(r["site"], r["l0_coefficient"], r["target_l0"], key)
                for i, v in enumerate(value) if isinstance(value, list) else ((None, value),):
                    self._writer.add_scalar(tag if i is None else f"{tag}/{i}", v, step)
        with space_for(self._path.with_name("events.out.tfevents.*")):
            self._writer.flush()
        first = records[0]
        self._bar.set_postfix(loss=f"{first['loss']:.4g}", fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}",
                              dead=f"{first['dead_fraction']:.2f}", tok_s=f"{tokens_per_s:.3g}")

    def close(self) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
