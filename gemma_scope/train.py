"""Train a grid of JumpReLU SAEs: ``python -m gemma_scope.train --config=experiments/<name>.py [--config.x.y=v]``.

Wires an activation source (``activations.make_source``), the sharded jitted step (``step.py``), Orbax
checkpoints (``checkpoint.py``), metrics and the Gemma Scope release (``release.write_sae``). A run killed at any
moment and restarted with the same command resumes from its newest checkpoint and ends with exactly the
parameters of an uninterrupted run (batches are numbered; the state holds everything else).

Outputs under ``config.workdir``: ``checkpoints/<step>``, ``metrics.jsonl`` (one record per SAE per log step),
``config.json`` and ``release/<kind>/layer_<L>/width_<W>/average_l0_<K>/params.npz``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from gemma_scope import activations, evaluate, release, sae, step as step_lib
from gemma_scope.checkpoint import Checkpointer
from gemma_scope.sites import Site

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (experiments/<name>.py)")
DTYPES = ("float32", "bfloat16")
NARROW_WIDTH = 2**14  # Gemma Scope §3.3: pure data parallelism up to this width, latent-axis parallelism beyond


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


def lambdas_of(config) -> tuple[float, ...]:
    """``config.sae.l0_coefficient`` as a tuple of λ ≥ 0 (a float is a one-value sweep).

    Raises:
      ValueError: empty, non-numeric or negative.
    """
    value = config.sae.l0_coefficient
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"sae.l0_coefficient must be a number >= 0 or a non-empty tuple of them, got {value!r}")
    return tuple(float(v) for v in values)


def validate_config(config) -> None:
    """Checks the fields the trainer reads (layout: experiments/from_activations.py).

    Raises:
      ValueError: naming the field, its value and what is expected.
    """
    lambdas_of(config)
    positive = {"sae.width": config.sae.width, "train.steps": config.train.steps,
                "train.batch_size": config.train.batch_size, "train.log_every": config.train.log_every,
                "train.norm_batches": config.train.norm_batches, "train.eval_batches": config.train.eval_batches,
                "train.dead_window_steps": config.train.dead_window_steps}
    for name, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("learning_rate", "adam_eps"):
        value = config.train[name]
        if not value > 0:
            raise ValueError(f"train.{name} must be > 0, got {value!r}")
    for name in ("lr_warmup_steps", "l0_warmup_steps"):
        if config.train[name] < 0:
            raise ValueError(f"train.{name} must be >= 0, got {config.train[name]!r}")
    if not (0 <= config.train.adam_b1 < 1 and 0 <= config.train.adam_b2 < 1):
        raise ValueError(f"train.adam_b1/adam_b2 must lie in [0, 1), got {config.train.adam_b1}, {config.train.adam_b2}")
    if not (config.sae.bandwidth > 0 and config.sae.threshold_init > 0):
        raise ValueError(f"sae.bandwidth and sae.threshold_init must be > 0, got {config.sae.bandwidth}, "
                         f"{config.sae.threshold_init}")
    if config.sae.dtype not in DTYPES:
        raise ValueError(f"sae.dtype must be one of {DTYPES}, got {config.sae.dtype!r}")
    if not config.workdir:
        raise ValueError("workdir must name an output directory")


def model_axis_size(config, device_count: int) -> int:
    """``config.mesh.model`` as an int; ``"auto"``: 1 up to width 2**14, else the largest divisor of the device
    count not above width / 2**14 (Gemma Scope §3.3)."""
    value = config.mesh.model
    if value == "auto":
        target = max(1, config.sae.width // NARROW_WIDTH)
        return max(k for k in range(1, device_count + 1) if device_count % k == 0 and k <= target)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"mesh.model must be a positive integer or 'auto', got {value!r}") from None


def hyperparams(config) -> step_lib.Hyperparams:
    """The step's hyperparameters from the config."""
    t = config.train
    return step_lib.Hyperparams(
        learning_rate=t.learning_rate, lr_warmup_steps=t.lr_warmup_steps, l0_warmup_steps=t.l0_warmup_steps,
        adam_b1=t.adam_b1, adam_b2=t.adam_b2, adam_eps=t.adam_eps, bandwidth=config.sae.bandwidth,
        threshold_init=config.sae.threshold_init, compute_dtype=config.sae.dtype,
        dead_window_steps=t.dead_window_steps)


def _to_host(tree):
    """Whole global arrays as NumPy on every process (shards live on other hosts in multi-host runs)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def normalisation_constants(source: activations.ActivationSource, mesh, batch_size: int,
                            n_batches: int) -> dict[str, np.ndarray]:
    """C per site with ``E||x / C||² = 1``, from the source's first ``n_batches`` global batches (Gemma Scope §3).

    Summed on the devices; one transfer at the end. Returns ``{group: float32 [n_sites]}``.

    Raises:
      ValueError: non-finite activations (naming the batches and site), or all-zero ones.
    """
    mean_sq = jax.jit(lambda batch: {g: jnp.mean(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1), axis=-1)
                                     for g, x in batch.items()}, out_shardings=NamedSharding(mesh, P()))
    batches = source.batches(batch_size, 0, mesh)
    sums = None
    for _, batch in zip(range(n_batches), batches):
        sums = mean_sq(batch) if sums is None else jax.tree.map(jnp.add, sums, mean_sq(batch))
    batches.close()
    source.check_finite()
    constants = {}
    for g, total in sums.items():
        value = np.asarray(total, np.float64) / n_batches
        if not (np.isfinite(value).all() and (value > 0).all()):
            raise ValueError(f"cannot normalise sites {source.groups[g]}: mean squared norms {value.tolist()} "
                             "(zero or not finite)")
        constants[g] = np.sqrt(value).astype(np.float32)
    return constants


def _check_finite(state, last_good: int | None) -> None:
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
        kept = f"last good checkpoint: step {last_good}" if last_good is not None else "no checkpoint was written"
        raise NonFiniteError(f"non-finite loss (NaN/Inf) at step {bad}; stopped ({kept})")


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drops metric records after ``step`` (written by a run that died before its next checkpoint)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _site_of(name: str) -> Site | None:
    """The release site of a source's site name (None for ``activations.CUSTOM_SITE``); ValueError if malformed."""
    return None if name == activations.CUSTOM_SITE else Site.parse(name)


def run(config: ml_collections.ConfigDict, source: activations.ActivationSource | None = None) -> list[pathlib.Path]:
    """Trains the config's grid to ``config.train.steps`` (resuming from ``<workdir>/checkpoints``) and writes
    the release.

    Args:
      config: layout of experiments/from_activations.py.
      source: activation source; default ``activations.make_source(config.data, ...)``.

    Returns:
      The written ``params.npz`` paths (process 0; empty on other processes).

    Raises:
      ValueError: a bad config or bad activations (the message names the field / batch).
      NonFiniteError: a NaN/Inf loss, naming the step; the last good checkpoint is kept.
    """
    validate_config(config)
    if config.mesh.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()  # a launcher may have initialised it with an explicit coordinator
    lambdas = lambdas_of(config)
    hp = hyperparams(config)
    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = activations.make_source(config.data, config.seed)
    release_sites = {name: _site_of(name) for name in source.sites}  # fail early on a bad data.site
    groups = source.groups
    grid = {g: step_lib.Group(len(sites), source.d_in[sites[0]], config.sae.width, lambdas)
            for g, sites in groups.items()}
    mesh = step_lib.make_mesh(config.mesh.data, model_axis_size(config, jax.device_count()))
    batch_size, steps = config.train.batch_size, config.train.steps
    if batch_size % mesh.size:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the mesh's data size × model size = "
                         f"{mesh.size} devices (each device gathers an equal share of every batch)")
    if config.sae.width % mesh.shape["model"]:
        raise ValueError(f"sae.width={config.sae.width} must be divisible by the mesh's model size {mesh.shape['model']}")

    checkpointer = Checkpointer(workdir / "checkpoints", config.train.checkpoint_every, config.train.keep_checkpoints)
    last_good = checkpointer.latest_step()
    if last_good is not None:
        try:
            state = checkpointer.restore(last_good, step_lib.abstract_state(grid, hp, mesh))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {workdir / 'checkpoints'}/{last_good} does not match this config (changed "
                             f"sae.width, sites or number of l0_coefficient values?); use a fresh workdir: {e}") from e
    else:
        scales = normalisation_constants(source, mesh, batch_size, config.train.norm_batches)
        state = step_lib.init_state(jax.random.key(config.seed), grid, hp, mesh, scales)
    if jax.process_index() == 0:
        _truncate_metrics(workdir / "metrics.jsonl", last_good or 0)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    start = int(jax.device_get(state["step"]))
    train_step = step_lib.make_train_step(grid, hp, mesh)
    batches = source.batches(batch_size, start, mesh)
    log = _MetricsLog(workdir / "metrics.jsonl", groups, lambdas, batch_size, start, steps)
    try:  # no host sync between log steps: batches and steps are dispatched ahead of the device
        for number, batch in zip(range(start, steps), batches):
            state, metrics = train_step(state, batch)
            done = number + 1
            if done % config.train.log_every == 0 or done == steps:
                source.check_finite()
                _check_finite(state, last_good)
                log.write(done, jax.device_get(metrics))
            if done % config.train.checkpoint_every == 0 or done == steps:
                source.check_finite()
                _check_finite(state, last_good)
                checkpointer.save(done, state, force=done == steps)
                last_good = done
    finally:
        batches.close()
        log.close()
        checkpointer.wait()
    checkpointer.close()
    return write_release(config, source, mesh, release_sites, state)


class _MetricsLog:
    """Appends metric records to a JSONL file and shows them on a tqdm progress bar (process 0 only)."""

    def __init__(self, path: pathlib.Path, groups, lambdas, batch_size: int, start: int, steps: int):
        self._on = jax.process_index() == 0
        self._path, self._groups, self._lambdas, self._batch = path, groups, lambdas, batch_size
        self._bar = tqdm.tqdm(total=steps, initial=start, unit="step", disable=not self._on, dynamic_ncols=True)
        self._last_step, self._last_time = start, time.perf_counter()

    def write(self, step: int, metrics: dict) -> None:
        now = time.perf_counter()
        tokens_per_s = (step - self._last_step) * self._batch / max(now - self._last_time, 1e-9)
        self._bar.update(step - self._last_step)
        self._last_step, self._last_time = step, now
        if not self._on:
            return
        lr, scale = float(metrics["learning_rate"]), float(metrics["l0_scale"])
        records = []
        for g, sites in self._groups.items():
            for i in range(len(sites) * len(self._lambdas)):
                lam = self._lambdas[i % len(self._lambdas)]
                records.append({"step": step, "site": sites[i // len(self._lambdas)], "l0_coefficient": lam,
                                "lambda_now": lam * scale, "learning_rate": lr, "tokens": step * self._batch,
                                "tokens_per_s": tokens_per_s,
                                **{k: float(v[i]) for k, v in metrics[g].items()}})
        with self._path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        first = records[0]
        self._bar.set_postfix(loss=f"{first['loss']:.4g}", fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}",
                              dead=f"{first['dead_fraction']:.2f}", tok_s=f"{tokens_per_s:.3g}")

    def close(self) -> None:
        self._bar.close()


def write_release(config, source, mesh, release_sites: dict[str, Site | None], state: dict) -> list[pathlib.Path]:
    """Folds every SAE of the grid (``sae.fold_normalisation``), measures its average L0 on the
    ``train.eval_batches`` batches after training, and writes it with ``release.write_sae`` (process 0).

    SAEs of one site whose rounded average L0 coincide would share a release directory; the later ones are skipped
    with a warning (they remain in the checkpoint).
    """
    lambdas = lambdas_of(config)
    params = _to_host(state["params"])
    scales = _to_host(state["norm_scale"])
    stream = source.batches(config.train.batch_size, config.train.steps, mesh)
    batches = [b for _, b in zip(range(config.train.eval_batches), stream)]
    stream.close()
    l0_of = jax.jit(jax.vmap(lambda p, x: jnp.mean(jnp.sum(sae.encode(p, x.astype(jnp.float32)) > 0, axis=-1)),
                             in_axes=(0, None)), out_shardings=NamedSharding(mesh, P()))
    written, used = [], set()
    for g, sites in source.groups.items():
        folded = [jax.vmap(sae.fold_normalisation, in_axes=(0, None))(
            jax.tree.map(lambda a: a[i * len(lambdas):(i + 1) * len(lambdas)], params[g]), scales[g][i])
            for i in range(len(sites))]
        for i, site in enumerate(sites):
            l0 = np.mean([np.asarray(l0_of(folded[i], b[g][i])) for b in batches], axis=0)
            for j, lam in enumerate(lambdas):
                key = (site, round(float(l0[j])))
                if key in used:
                    print(f"warning: SAE of site {site} with l0_coefficient={lam} has the same rounded average L0 "
                          f"({key[1]}) as another; not released (it stays in the checkpoint)", file=sys.stderr)
                    continue
                used.add(key)
                if jax.process_index() == 0:
                    one = {k: np.asarray(v[j], np.float32) for k, v in folded[i].items()}
                    meta = {"l0_coefficient": lam, "training_steps": config.train.steps,
                            "training_tokens": config.train.steps * config.train.batch_size,
                            "normalisation_constant": float(scales[g][i]), "seed": config.seed}
                    written.append(release.write_sae(pathlib.Path(config.workdir) / "release", release_sites[site], one,
                                                     float(l0[j]), meta))
    return written


def _check_overrides(argv: list[str]) -> None:
    """Exits with a clear message if a ``--config.<path>=`` override names a key the config file lacks."""
    spec_text = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec_text is None:
        return
    path, sep, config_arg = spec_text.partition(":")  # "FILE:ARG" passes ARG to get_config, as config_flags does
    spec = importlib.util.spec_from_file_location("_gemma_scope_config", path)
    if spec is None or not pathlib.Path(path).is_file():
        raise app.UsageError(f"--config={path}: no such config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(config_arg) if sep else module.get_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, keys = config, arg[len("--config."):].split("=", 1)[0].split(".")
        for depth, key in enumerate(keys):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(["config", *keys[:depth]])
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise app.UsageError(f"{arg.split('=', 1)[0]}: unknown config key {key!r} under {where!r} of "
                                     f"{path}; known keys: {known}")
            node = node[key]


def _parse_flags(argv: list[str]):
    try:
        _check_overrides(argv)
    except (app.UsageError, ValueError) as e:  # ValueError: a bad "FILE:ARG" argument to get_config
        sys.exit(f"FATAL config error: {e}")
    return flags.FLAGS(argv)


def evaluate_run(config, paths: list[pathlib.Path]) -> list[dict]:
    """Evaluates a finished model-source run's released SAEs on held-out text (Gemma Scope §4) and writes
    ``<workdir>/report/{report.md, metrics.json, *.png}``; returns the metric records."""
    tokens = config.train.steps * config.train.batch_size
    notes = (f"Model `{config.data.model}`, sites `{config.data.sites}`; trained on {tokens:,} activations per SAE "
             f"({config.train.steps:,} steps × {config.train.batch_size:,}); evaluated on "
             f"{config.eval.num_sequences} held-out sequences × {config.eval.seq_len} tokens.")
    return evaluate.evaluate_saes(
        paths, model_name=config.data.model, corpus=config.data.corpus or None, packing=config.data.packing,
        num_sequences=config.eval.num_sequences, seq_len=config.eval.seq_len,
        lm_batch_size=config.eval.lm_batch_size, out=pathlib.Path(config.workdir) / "report", notes=notes)


def summary(records: list[dict], tokens: int) -> str:
    """A plain-text table of evaluated SAEs: site, λ, width, L0, FVU, delta LM loss, zero-ablation delta."""
    lines = [f"trained on {tokens:,} activations per SAE",
             f"{'site':>7} {'λ':>8} {'width':>6} {'L0':>7} {'FVU':>6} {'ΔLM loss':>9} {'zero-abl. Δ':>11}"]
    for r in records:
        lines.append(f"{r['site']:>7} {r['l0_coefficient'] or float('nan'):>8.2g} {r['width']:>6} {r['l0']:>7.1f} "
                     f"{r['fvu']:>6.3f} {r['delta_lm_loss']:>9.4f} {r['zero_ablation_loss'] - r['clean_loss']:>11.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=experiments/<name>.py is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    config = _CONFIG.value
    paths = run(config)
    for path in paths:
        print(path)
    if config.data.source == "model" and config.eval.num_sequences > 0 and jax.process_index() == 0:
        records = evaluate_run(config, paths)
        print(summary(records, config.train.steps * config.train.batch_size))
        print(f"report: {pathlib.Path(config.workdir) / 'report' / 'report.md'}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
