"""Train-state checkpoints with Orbax: atomic, every N steps and at the end, keeping the last k.

Orbax writes each step to a temporary directory and renames it into place when complete, so a run killed at any
moment leaves only whole checkpoints; the restart resumes from the newest one.
"""

from __future__ import annotations

import pathlib

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores the trainer's state pytree under ``<directory>/<step>``.

    Args:
      directory: checkpoint root (created if missing).
      every: save interval in steps (``save`` with ``force=True`` saves regardless).
      keep: number of most recent checkpoints kept.

    Raises:
      ValueError: every or keep < 1.
    """

    def __init__(self, directory: str | pathlib.Path, every: int, keep: int):
        if every < 1 or keep < 1:
            raise ValueError(f"train.checkpoint_every ({every}) and train.keep_checkpoints ({keep}) must be >= 1")
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def restore(self, step: int, target):
        """Restores the state saved at ``step`` onto ``target``'s structure, shapes, dtypes and shardings
        (a tree of ``jax.ShapeDtypeStruct``)."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def save(self, step: int, state, force: bool = False) -> bool:
        """Saves ``state`` as ``step`` if the interval says so (or ``force``); asynchronous after the device copy."""
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.close()
