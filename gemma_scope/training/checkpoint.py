"""Train-state checkpoints with Orbax: atomic, checksummed, every N steps and at the end, keeping the last k.

Orbax writes each step to a temporary directory and renames it into place when complete, so a run killed at any
moment leaves only whole checkpoints. Orbax (0.12) checks nothing of the array data on restore (only the zarr
shard index carries a crc32c), so a flipped byte would be restored silently. Hence our own integrity layer:

- Sealing: after Orbax has finalised a step's files and before it renames the temporary directory into place,
  the sha256 of every file in the step's item directories goes into ``<step>/gemma_scope_sha256.json``
  (Orbax's own top-level bookkeeping, ``_CHECKPOINT_METADATA`` and ``commit_success.txt``, is rewritten after
  the rename and is not covered; damage there makes the restore fail, which is reported). A step directory
  that exists is therefore always sealed.
- Verification: when a ``Checkpointer`` opens a directory it verifies the newest step; a corrupt, unreadable or
  unsealed one is reported on stderr and moved to ``<directory>-corrupt/<step>`` (never deleted), and the next
  older step is tried, so training resumes from the newest intact checkpoint.
- Format: ``<step>/gemma_scope_state_format.json`` records the state's format number (``{"state_format": N}``,
  sealed with the item files), so that a reader can tell which layout a checkpoint holds; checkpoints written
  before formats were recorded have none and read as format 1.
- Rotation (ours, not Orbax's ``max_to_keep``): only after a newer step is in place with its checksums are the
  oldest steps beyond ``keep`` removed, so the newest verified checkpoint is never removed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import pathlib
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gemma_scope.files import NO_SPACE_TEXT, NoSpaceError, is_no_space, sha256_file

CHECKSUMS_FILE = "gemma_scope_sha256.json"
STATE_FORMAT_FILE = "gemma_scope_state_format.json"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax.checkpoint._src.path.atomicity_types.TMP_DIR_SUFFIX


class _QuietOnNoSpace(logging.Filter):
    """Drops Orbax's log records (with tracebacks, hundreds of lines) of a write that failed for lack of space, and
    asyncio's "Task exception was never retrieved" for its abandoned writes: the save raises ``NoSpaceError``, which
    says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (NO_SPACE_TEXT.search(record.getMessage()) or is_no_space(record.exc_info and record.exc_info[1]))


for _logger in ("absl", "asyncio"):  # a logger's filter sees only its own records, not its children's
    logging.getLogger(_logger).addFilter(_QuietOnNoSpace())
_ABANDONED = ("Event loop is closed", "Python is likely shutting down")


def _quiet_abandoned_writes(unraisable, previous=sys.unraisablehook) -> None:
    """After a failed save Orbax abandons its TensorStore writes: their callbacks find its event loop closed and
    its coroutines are collected at exit, each printing an "Exception ignored" traceback; those are dropped, and so
    are writes failing for lack of space (TensorBoard's flush at exit): the run reports the first in one line."""
    abandoned = isinstance(unraisable.exc_value, (RuntimeError, ImportError)) and \
        any(text in str(unraisable.exc_value) for text in _ABANDONED)
    if not (abandoned or is_no_space(unraisable.exc_value)):
        previous(unraisable)


sys.unraisablehook = _quiet_abandoned_writes


def file_checksums(step_dir: pathlib.Path) -> dict[str, str]:
    """sha256 (hex) of every file below the item directories of a step directory and of its state-format file, by
    relative path (hashed in threads)."""
    files = [p for item in sorted(step_dir.iterdir()) if item.is_dir() for p in sorted(item.rglob("*")) if p.is_file()]
    files += [p for p in (step_dir / STATE_FORMAT_FILE,) if p.is_file()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return {p.relative_to(step_dir).as_posix(): digest for p, digest in zip(files, pool.map(sha256_file, files))}


def verify(step_dir: pathlib.Path) -> str | None:
    """Why the checkpoint at ``step_dir`` is not intact (a sentence naming the file), or None if it is."""
    seal = step_dir / CHECKSUMS_FILE
    try:
        expected = json.loads(seal.read_text())
    except FileNotFoundError:
        return f"{seal} is missing"
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON (empty, garbage)
        return f"{seal} cannot be read as JSON ({type(e).__name__}: {e})"
    if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
        return f"{seal} does not hold a {{file: sha256}} object"
    try:
        actual = file_checksums(step_dir)
    except OSError as e:
        return f"cannot read {e.filename or step_dir} ({type(e).__name__}: {e.strerror or e})"
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            return f"{name} is missing"
        if name not in expected:
            return f"{name} is not in {CHECKSUMS_FILE}"
        if actual[name] != expected[name]:
            return f"{name} has sha256 {actual[name][:12]}…, {CHECKSUMS_FILE} says {expected[name][:12]}…"
    return None


class Checkpointer:
    """Saves and restores the trainer's state pytree under ``<directory>/<step>`` (module docstring).

    Opening it verifies the newest checkpoint, falling back (with a message on stderr) to older ones.

    Args:
      directory: checkpoint root (created if missing).
      every: save interval in steps (``save`` with ``force=True`` saves regardless).
      keep: number of most recent checkpoints kept.
      state_format: the format number of the states this instance saves (module docstring).

    Raises:
      ValueError: every or keep < 1.
      PermissionError: the directory cannot be created or written (Orbax would otherwise fail in a background
        thread).
    """

    def __init__(self, directory: str | pathlib.Path, every: int, keep: int, state_format: int):
        if every < 1 or keep < 1:
            raise ValueError(f"train.checkpoint_every ({every}) and train.keep_checkpoints ({keep}) must be >= 1")
        self._root, self._keep, self._pending, self._pending_bytes = pathlib.Path(directory).absolute(), keep, None, 0
        self._state_format = state_format
        self._latest = self._newest_intact()
        # Directories are created in the calling thread: if that fails, save raises here instead of leaving
        # Orbax's signalling threads waiting forever (the process would never exit).
        async_options = ocp.AsyncOptions(post_finalization_callback=self._seal, create_directories_asynchronously=False)
        # cleanup_tmp_directories: a partial step left by a crash or by writes abandoned on a full disk goes on reopen.
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=None, create=True,
                                               cleanup_tmp_directories=True, async_options=async_options)
        self._manager = ocp.CheckpointManager(self._root, options=options)

    def _steps_on_disk(self) -> list[int]:
        return sorted((int(p.name) for p in self._root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True) \
            if self._root.is_dir() else []

    def _newest_intact(self) -> int | None:
        """Verifies steps newest first; moves each bad one aside (process 0) and returns the first intact one (an
        unsealed one of an older version counts: ``_older_version``)."""
        found = None
        for step in self._steps_on_disk():
            problem = verify(self._root / str(step))
            if problem is None or self._older_version(step):
                found = step
                break
            if jax.process_index() == 0:
                moved = self._quarantine(step)
                print(f"checkpoint {self._root / str(step)} is corrupt: {problem}; moved to {moved}; "
                      "falling back to the previous checkpoint", file=sys.stderr)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("gemma_scope checkpoint verification")
        return found

    def _older_version(self, step: int) -> bool:
        """Whether step ``step`` is an unsealed checkpoint written before seals existed (neither a seal nor a state
        format file, both of which sealing versions write) whose Orbax metadata is complete; if so, says on stderr
        that it resumes without checking the arrays (a damaged array still fails the restore, which is reported)."""
        step_dir = self._root / str(step)
        if (step_dir / CHECKSUMS_FILE).exists() or (step_dir / STATE_FORMAT_FILE).exists():
            return False
        try:
            json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
            items = [p for p in step_dir.iterdir() if p.is_dir()]
        except (OSError, ValueError):
            return False
        if not items or not all((p / "_METADATA").is_file() for p in items):
            return False
        if jax.process_index() == 0:
            print(f"checkpoint {step_dir} has no {CHECKSUMS_FILE} (written by a version before checkpoints were "
                  "sealed): its Orbax metadata is complete but its arrays cannot be checked; resuming from it",
                  file=sys.stderr)
        return True

    def _quarantine(self, step: int) -> pathlib.Path:
        """Moves a bad step to ``<root>-corrupt/<step>`` (``<root>-corrupt.1/...`` if that name is taken by a file,
        ``<step>.1`` if the step is there already)."""
        parent, n = self._root.with_name(self._root.name + "-corrupt"), 0
        while parent.exists() and not parent.is_dir():
            n += 1
            parent = self._root.with_name(f"{self._root.name}-corrupt.{n}")
        target, n = parent / str(step), 0
        while target.exists():
            n += 1
            target = target.with_name(f"{step}.{n}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self._root / str(step), target)
        return target

    def _seal(self) -> None:
        """Orbax's post-finalisation callback: writes the state format and the checksums into the pending step's
        temporary directory (Orbax renames it into place afterwards)."""
        if jax.process_index() != 0:
            return
        candidates = sorted(self._root.glob(f"{self._pending}{_ORBAX_TMP_SUFFIX}*"))
        if len(candidates) != 1:
            raise RuntimeError(f"cannot find the temporary directory of checkpoint {self._pending} under {self._root} "
                               f"(found {candidates}); has Orbax's naming changed?")
        (candidates[0] / STATE_FORMAT_FILE).write_text(json.dumps({"state_format": self._state_format}) + "\n")
        (candidates[0] / CHECKSUMS_FILE).write_text(json.dumps(file_checksums(candidates[0]), indent=1) + "\n")

    @property
    def directory(self) -> pathlib.Path:
        """The checkpoint root (absolute)."""
        return self._root

    def latest_step(self) -> int | None:
        """The newest intact checkpoint's step (verified on opening, or saved and finalised since), or None."""
        return self._latest

    def state_format(self, step: int) -> int:
        """The state format recorded with checkpoint ``step`` (1 if it records none: written before formats were).

        Raises:
          OSError, ValueError, KeyError: the format file exists but cannot be read.
        """
        path = self._root / str(step) / STATE_FORMAT_FILE
        return json.loads(path.read_text())["state_format"] if path.exists() else 1

    def restore(self, step: int, target):
        """Restores the state saved at ``step`` onto ``target``'s structure, shapes, dtypes and shardings
        (a tree of ``jax.ShapeDtypeStruct``)."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def save(self, step: int, state, force: bool = False) -> bool:
        """Saves ``state`` as ``step`` if the interval says so (or ``force``); asynchronous after the device copy.
        First waits for the previous save and rotates old checkpoints out.

        Raises:
          NoSpaceError: the disk filled up (here or in ``wait``); names the step's directory and the state's size.
            The partial step is removed; the older checkpoints are intact.
        """
        self.wait()
        self._pending = step  # read by _seal
        self._pending_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        with self._space_for_pending():
            saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        if not saved:
            self._pending = self._latest
        return saved

    @contextlib.contextmanager
    def _space_for_pending(self):
        """NoSpaceError for the pending step, after removing its partial (temporary) directory."""
        try:
            yield
        except Exception as e:
            if not is_no_space(e):
                raise
            with contextlib.suppress(Exception):  # writes still in flight would re-create the partial directory
                self._manager.wait_until_finished()
            if jax.process_index() == 0:
                for partial in self._root.glob(f"{self._pending}{_ORBAX_TMP_SUFFIX}*"):
                    shutil.rmtree(partial, ignore_errors=True)
            error = NoSpaceError(self._root / str(self._pending), self._pending_bytes)
            self._pending = self._latest
            raise error from e

    def wait(self) -> None:
        """Blocks until pending saves are on disk; once the newest is in place with its checksums, removes the
        oldest checkpoints beyond ``keep`` (otherwise it says so on stderr and removes nothing). (Re-hashing the
        files just written would read them back from the page cache, so it would prove nothing.)"""
        with self._space_for_pending():
            self._manager.wait_until_finished()
        if self._pending is None or self._pending == self._latest:
            return
        if not (self._root / str(self._pending) / CHECKSUMS_FILE).is_file():
            print(f"checkpoint {self._root / str(self._pending)} is not in place with its {CHECKSUMS_FILE}; keeping "
                  f"the older checkpoints (the newest intact one is step {self._latest})", file=sys.stderr)
            self._pending = self._latest
            return
        self._latest = self._pending
        # Every process, from Orbax's own step list (a directory listing could race process 0's deletes): Orbax
        # deletes on process 0 and syncs the processes after each step.
        for step in sorted(self._manager.all_steps(), reverse=True)[self._keep:]:
            self._manager.delete(step)

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.wait()
        self._manager.close()
