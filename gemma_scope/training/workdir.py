"""Workdir safety for the trainer: one trainer per workdir, writable directories, resumes only of the same run.

- Lock: ``<workdir>/.lock`` is held with ``fcntl.flock`` while a trainer runs and names its holder (pid, host).
  A second trainer on the workdir stops with a message naming the holder. The kernel drops the lock when the
  holder dies (kill -9 included), so a stale ``.lock`` file of a dead process blocks nothing. (flock is not
  reliable across hosts on NFS; multi-host runs, ``mesh.distributed``, are coordinated by their launcher and
  take no lock.)
- Writable: every directory the trainer writes is probed up front, so an unwritable one fails within seconds
  naming its path (Orbax would fail in a background thread).
- Resume rule: a run that resumes from a checkpoint must be the run that wrote it. Its config may differ from
  the saved ``config.json`` only in fields that do not change the trained parameters — ``RESULT_NEUTRAL``: the
  workdir, ``train.steps`` (not below the checkpoint: the learning-rate and λ schedules do not depend on it),
  logging and checkpoint cadence, ``train.eval_batches`` (read only when the release is written, from the final
  state), ``eval.*`` (after training) and ``mesh.*`` (the same arithmetic on another device layout; the last
  bits may differ with the reduction order). Everything else (λ, width, sites, data, seed, batch size, the
  optimiser and SAE recipe, normalisation batches, ...) changes the result, and a change is refused with the
  list of differences.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import functools
import json
import os
import pathlib
import socket
import sys
import tempfile
from collections.abc import Iterator

from flax import traverse_util

from gemma_scope import configs
from gemma_scope.files import check_output_dir

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
RESULT_NEUTRAL = ("workdir", "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.eval_batches", "eval.*", "mesh.*")


class WorkdirInUseError(ValueError):
    """Another live process holds the workdir's lock (a user error: two trainers on one workdir)."""


def check_writable(*directories: str | os.PathLike) -> None:
    """Creates each directory (with parents) and writes and removes a probe file in it.

    Raises:
      NotADirectoryError: a file where one of them, or a parent, should be (``files.check_output_dir``).
      OSError (PermissionError for a permission problem): naming the directory that cannot be written.
    """
    for directory in map(pathlib.Path, directories):
        check_output_dir(directory, "workdir")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise type(e)(e.errno, f"cannot write to {directory} ({e.strerror or e}); the trainer writes its "
                          "metrics, checkpoints and release there: fix its permissions or choose another workdir") from e


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds ``<workdir>/.lock`` (created with the workdir if missing) for the duration of the block.

    Raises:
      WorkdirInUseError: another process holds it; the message names its pid and host.
      OSError: the workdir cannot be written (``check_writable``).
    """
    path = pathlib.Path(workdir) / LOCK_FILE
    check_writable(path.parent)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise WorkdirInUseError(f"workdir {path.parent} is in use by another trainer ({holder}; lock file "
                                    f"{path}); wait for it to finish, stop it, or choose another workdir") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # the lock itself goes with the file descriptor


def exclusive(run):
    """Decorates ``run(config, ...)`` to hold ``config.workdir``'s lock while it runs (module docstring)."""

    @functools.wraps(run)
    def locked(config, *args, **kwargs):
        if not config.get("workdir") or config.mesh.get("distributed"):
            return run(config, *args, **kwargs)
        with lock(config.workdir):
            return run(config, *args, **kwargs)

    return locked


def config_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """Fields (dotted) whose values differ between two JSON configs and change the result, as
    ``"field: saved → current"`` lines (``RESULT_NEUTRAL`` fields are ignored; a missing field reads "absent").

    A field missing from ``saved`` whose current value is its value in ``defaults`` (the config layout's defaults)
    is not a difference: the run was written by a version without that field, and every field added since (e.g.
    ``clt.*``, ``crosscoder.*``) defaults to what older versions did."""
    a, b = traverse_util.flatten_dict(saved, sep="."), traverse_util.flatten_dict(current, sep=".")
    defaults = traverse_util.flatten_dict(defaults or {}, sep=".")
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in RESULT_NEUTRAL):
            continue
        if key not in a and key in defaults and defaults[key] == b.get(key):
            continue
        if a.get(key, "absent") != b.get(key, "absent"):
            lines.append(f"{key}: {json.dumps(a.get(key, 'absent'))} → {json.dumps(b.get(key, 'absent'))}")
    return lines


def check_resume(workdir: str | os.PathLike, config, checkpoint_step: int | None) -> None:
    """Refuses to resume the checkpoint at ``checkpoint_step`` with a config that would change the result
    (module docstring) or with ``train.steps`` below it. Nothing to check without a checkpoint. A checkpoint
    without a readable ``config.json`` beside it resumes with a warning on stderr.

    Raises:
      ValueError: listing every differing field (saved → current), or naming train.steps and the checkpoint.
    """
    if checkpoint_step is None:
        return
    path = pathlib.Path(workdir) / CONFIG_FILE
    if config.train.steps < checkpoint_step:
        raise ValueError(f"train.steps={config.train.steps} is below the newest checkpoint (step {checkpoint_step}) "
                         f"in {pathlib.Path(workdir) / 'checkpoints'}; raise train.steps to at least {checkpoint_step} "
                         "or use a fresh workdir")
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"warning: {path} is missing; cannot check that this config matches checkpoint {checkpoint_step}",
              file=sys.stderr)
        return
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the config of the run that wrote checkpoint {checkpoint_step} "
                         f"({e}); restore it or use a fresh workdir") from e
    defaults = json.loads(configs.train_config(config.data).to_json_best_effort())
    differences = config_differences(saved, json.loads(config.to_json_best_effort()), defaults)
    if differences:
        raise ValueError(f"workdir {workdir} holds checkpoint {checkpoint_step} of a different run; these fields "
                         f"differ from its {CONFIG_FILE} and change the result: " + "; ".join(differences)
                         + ". Use a fresh workdir (or restore the old values to resume).")
