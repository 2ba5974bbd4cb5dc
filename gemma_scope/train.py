"""Train a grid of JumpReLU SAEs, transcoders, CLTs and crosscoders:
``python -m gemma_scope.train --config=experiments/<name>.py [--config.x.y=v]``.

``run`` is the story of a run: validate the config (``training.settings``), build the activation source
(``activations``), the grid (``training.grid``: which SAE reads which site at which λ) and the mesh, restore or
initialise the state (``training.checkpoint``, ``training.normalisation``, ``training.step``), loop over the
source's device-resident batches logging metrics (``training.log``) and checkpointing, then write the release
(``training.export``). A run killed at any moment and restarted with the same command resumes from its newest
checkpoint and ends with exactly the parameters of an uninterrupted run (batches are numbered; the state holds
everything else).

Outputs under ``config.workdir``: ``checkpoints/<step>``, ``metrics.jsonl`` (one record per SAE per log step) and
the same metrics as TensorBoard event files, ``config.json``, the SAEs in the Gemma Scope 1 layout
``release/<kind>/layer_<L>/width_<W>/average_l0_<K>/`` and SAEs, transcoders, CLTs and crosscoders in the Gemma
Scope 2 layout under ``release_gs2/`` (``training.export``, ``release``).
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from gemma_scope import activations, cli
from gemma_scope import mesh as mesh_lib
from gemma_scope.evaluation import probe_datasets, probe_report
from gemma_scope.evaluation.probe_runs import probe_saes
from gemma_scope.evaluation.releases import evaluate_saes
from gemma_scope.files import as_no_space, is_no_space, space_for
from gemma_scope.training import normalisation, stopping
from gemma_scope.training import step as step_lib
from gemma_scope.training import workdir as workdir_lib
from gemma_scope.training.checkpoint import Checkpointer
from gemma_scope.training.export import write_release
from gemma_scope.training.grid import Grid, source_data
from gemma_scope.training.log import MetricsLog
from gemma_scope.training.settings import hyperparams, lambdas_of, validate_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (experiments/<name>.py)")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


def _check_finite(state, checkpointer: Checkpointer) -> None:
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
        checkpointer.wait()
        last_good = checkpointer.latest_step()
        kept = f"last good checkpoint: step {last_good}" if last_good is not None else "no checkpoint was written"
        raise NonFiniteError(f"non-finite loss (NaN/Inf) at step {bad}; stopped ({kept})")


def _make_mesh(config, batch_size: int, grid: Grid) -> jax.sharding.Mesh:
    """The config's ('data', 'model') mesh; ValueError if the batch or a width does not split over it. "auto" sizes
    the model axis for the grid's widest dictionary (a CLT's latents counted over all its layers, as Gemma Scope 2
    names its CLT widths)."""
    widest = max([config.sae.width] + [s.width * (s.n_sites if s.crosslayer == "clt" else 1)
                                       for s in grid.stacks.values()])
    mesh = mesh_lib.make_mesh(config.mesh.data, mesh_lib.model_axis_size(config.mesh.model, widest, jax.device_count()))
    if batch_size % mesh.size:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the mesh's data size × model size = "
                         f"{mesh.size} devices (each device gathers an equal share of every batch)")
    fields = {"sae.width": config.sae.width, "clt.width": config.clt.width, "crosscoder.width": config.crosscoder.width}
    for name, width in fields.items():
        if width is not None and width % mesh.shape["model"]:
            raise ValueError(f"{name}={width} must be divisible by the mesh's model size {mesh.shape['model']}")
    return mesh


@workdir_lib.exclusive  # one trainer per workdir
def run(config: ml_collections.ConfigDict, source: activations.ActivationSource | None = None) -> list[pathlib.Path]:
    """Trains the config's grid to ``config.train.steps`` (resuming from ``<workdir>/checkpoints``) and writes
    the release.

    Args:
      config: layout of experiments/from_activations.py.
      source: activation source; default ``activations.make_source(grid.source_data(config), ...)``.

    Returns:
      The written ``params.npz`` paths (process 0; empty on other processes).

    Raises:
      ValueError: a bad config or bad activations (the message names the field / batch).
      NonFiniteError: a NaN/Inf loss, naming the step; the last good checkpoint is kept.
      WorkdirInUseError, OSError: another trainer holds the workdir, or it cannot be written (``training.workdir``).
      stopping.Preempted: a SIGTERM or SIGINT; the step reached is saved (``training.stopping``).
      files.NoSpaceError: the disk filled up; the message names the file and the bytes it needed.
    """
    sweep = validate_config(config)
    if config.sae.l0_coefficient is None:  # record the default λ itself: config.json and a resume compare values
        config.sae.l0_coefficient = lambdas_of(config)
    if config.mesh.distributed and not jax.distributed.is_initialized():
        stopping.initialize(config.mesh.heartbeat_timeout_s)  # a launcher may have, with an explicit coordinator
    try:
        with stopping.watch() as stop_at, stopping.exit_on_lost_peer():  # a signal stops the run at a saved step
            return _train(config, source, sweep, stop_at)
    except Exception as e:  # the first write that failed for lack of space, named (a later one may fail too)
        if not is_no_space(e):
            raise
        raise as_no_space(e, config.workdir) from e


def _train(config, source, sweep, stop_at) -> list[pathlib.Path]:
    hp = hyperparams(config)
    workdir = pathlib.Path(config.workdir)
    workdir_lib.check_writable(workdir, workdir / "checkpoints")
    if source is None:
        source = activations.make_source(source_data(config), config.seed)
    grid = Grid.build(config, source, sweep)
    batch_size, steps = config.train.batch_size, config.train.steps
    mesh = _make_mesh(config, batch_size, grid)

    checkpointer = Checkpointer(workdir / "checkpoints", config.train.checkpoint_every, config.train.keep_checkpoints,
                                step_lib.STATE_FORMAT)
    last_good = checkpointer.latest_step()
    # Early: JAX's count of steps starts here (training.stopping.watch); before a first step, only a checkpoint
    # already on disk can be the one to stop at.
    preempted = stop_at(last_good or 0) and last_good is not None
    workdir_lib.check_resume(workdir, config, last_good)
    if last_good is not None:
        try:
            state = step_lib.restore_state(checkpointer, last_good, grid.stacks, hp, mesh)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {workdir / 'checkpoints'}/{last_good} passed its checksums but does not "
                             f"restore onto this config's state: {e}") from e
    else:
        norm_scale, b_dec = grid.constants(*normalisation.normalisation_constants(
            source, mesh, batch_size, config.train.norm_batches, config.sae.b_dec_init, config.sae.normalisation))
        state = step_lib.init_state(jax.random.key(config.seed), grid.stacks, hp, mesh, norm_scale, b_dec)
    if jax.process_index() == 0:
        text = config.to_json_best_effort(indent=2)
        with space_for(workdir / "config.json", len(text.encode())):
            (workdir / "config.json").write_text(text)

    start = int(jax.device_get(state["step"]))
    train_step = step_lib.make_train_step(grid.stacks, hp, mesh)
    to_stacks = grid.batches(mesh)
    batches = source.batches(batch_size, start, mesh, stop=steps)
    log = MetricsLog(workdir, grid, batch_size, start, steps)
    done = start
    try:  # no host sync between log steps: batches and steps are dispatched ahead of the device
        for number, batch in zip(range(start, steps), batches):
            if preempted:  # the notice came before the first step: the restored checkpoint is the step reached
                break
            state, metrics = train_step(state, to_stacks(batch))
            done = number + 1
            preempted = stop_at(done)  # every step, on every process (JAX's preemption sync point)
            if done % config.train.log_every == 0 or done == steps:
                source.check_finite()
                _check_finite(state, checkpointer)
                log.write(done, jax.device_get(metrics))
            if preempted or done % config.train.checkpoint_every == 0 or done == steps:
                source.check_finite()
                _check_finite(state, checkpointer)
                checkpointer.save(done, state, force=preempted or done == steps)
            if preempted:
                break
    finally:
        batches.close()
        log.close()
        checkpointer.wait()
    checkpointer.close()
    if preempted:
        raise stopping.Preempted(f"preempted: stopped after step {done} of {steps}; checkpoint "
                                 f"{checkpointer.directory / str(done)} is sealed; rerun the same command to resume")
    return write_release(config, source, mesh, grid, state)


def evaluate_run(config, paths: list[pathlib.Path]) -> list[dict]:
    """Evaluates a finished model-source run's released SAEs, transcoders, CLTs and crosscoders on held-out text
    (Gemma Scope §4) and writes ``<workdir>/report/{report.md, metrics.json, *.png}``; with ``eval.probe``, k-sparse
    probing of the SAE files first (``probe_runs.probe_saes``: ``probing.{csv,md,png}`` there, and its section in the
    report). Returns the metric records. A CLT or crosscoder is spliced whole only (each layer alone would cost one
    more pass per covered layer: ``python -m gemma_scope.evaluate --sae=DIR`` measures those)."""
    report_dir = pathlib.Path(config.workdir) / "report"
    sections = []
    if config.eval.get("probe", False):
        probes = probe_saes([p for p in paths if not pathlib.Path(p).is_dir()], model_name=config.data.model,
                            model_config=config.data.get("model_config") or None, out=report_dir)
        sections.append(probe_report.markdown(probes))
    tokens = config.train.steps * config.train.batch_size
    notes = (f"Model `{config.data.model}`, sites `{config.data.sites}`; trained on {tokens:,} activations per SAE "
             f"({config.train.steps:,} steps × {config.train.batch_size:,}); evaluated on "
             f"{config.eval.num_sequences} held-out sequences × {config.eval.seq_len} tokens.")
    return evaluate_saes(
        paths, model_name=config.data.model, model_config=config.data.get("model_config") or None,
        corpus=config.data.corpus or None, packing=config.data.packing,
        num_sequences=config.eval.num_sequences, seq_len=config.eval.seq_len,
        lm_batch_size=config.eval.lm_batch_size, out=report_dir, notes=notes, sections=sections, layers_alone=False)


def summary(records: list[dict], tokens: int) -> str:
    """A plain-text table of evaluated SAEs: site, λ, target L0, width, L0, FVU, delta LM loss, zero-ablation delta
    and loss recovered ``(zero − spliced) / (zero − clean)``; '—' for a λ or target the release does not record."""
    lines = [f"trained on {tokens:,} activations per SAE",
             f"{'site':>7} {'λ':>8} {'target':>6} {'width':>6} {'L0':>7} {'FVU':>6} {'ΔLM loss':>9} {'zero-abl. Δ':>11} "
             f"{'recovered':>9}"]

    def number(value, width: int, spec: str) -> str:  # '—' where the release does not say (e.g. GS2 transcoders)
        return f"{'—':>{width}}" if value is None else f"{value:>{width}{spec}}"

    for r in records:
        zero = r["zero_ablation_loss"] - r["clean_loss"]
        lines.append(f"{r['site']:>7} {number(r['l0_coefficient'], 8, '.2g')} {number(r.get('target_l0'), 6, '.4g')} "
                     f"{r['width']:>6} {r['l0']:>7.1f} {r['fvu']:>6.3f} {r['delta_lm_loss']:>9.4f} {zero:>11.3f} "
                     f"{(zero - r['delta_lm_loss']) / zero:>9.1%}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=experiments/<name>.py is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    config = _CONFIG.value
    evaluating = config.data.source == "model" and config.eval.num_sequences > 0
    if evaluating and config.eval.get("probe", False):
        probe_datasets.check_installed()  # before training, not after it
    paths = run(config)
    for path in paths:
        print(path)
    if evaluating and jax.process_index() == 0:
        records = evaluate_run(config, paths)
        print(summary(records, config.train.steps * config.train.batch_size))
        print(f"report: {pathlib.Path(config.workdir) / 'report' / 'report.md'}")


if __name__ == "__main__":
    cli.run_app(main)
