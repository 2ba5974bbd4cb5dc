"""How a run stops early: a preemption notice (SIGTERM, SIGINT) and a lost peer process.

- Preemption. Spot / preemptible machines get SIGTERM some seconds before they are killed (~30 s on Cloud TPU).
  ``watch`` makes the trainer finish the step it is on, save that step and stop with ``Preempted`` (exit status
  ``EXIT_PREEMPTED``). One process: Python handlers for SIGTERM and SIGINT set a flag that ``reached(step)``
  reads. Several processes (``jax.distributed``): JAX's preemption sync manager owns SIGTERM (XLA's coordination
  service propagates a notice on any process to all; they agree on the step to save, one past the furthest step
  any of them had reached, and ``multihost_utils.reached_preemption_sync_point(step)`` is True at that step on
  every process); SIGINT is forwarded to this process as SIGTERM so that it takes the same path. That agreement
  takes a second or so (JAX's notifier polls for the signal every second), so a run that ends sooner ends normally.
  In one process a second signal during the stop takes the default action (SIGINT: KeyboardInterrupt; SIGTERM:
  exit).
- A lost peer. A process that dies (kill -9, its host lost) breaks the others' next collective at once (gloo:
  "Connection closed by peer"); ``exit_on_lost_peer`` turns that into one line naming the lost process and exit
  status ``EXIT_PEER_LOST``. Whatever else the others are doing (a barrier, a collective that does not notice),
  ``jax.distributed``'s coordination service declares a process lost after ``heartbeat_timeout_s`` without a
  heartbeat (``initialize``; default ``DEFAULT_HEARTBEAT_TIMEOUT_S``) and aborts the rest (SIGABRT, after a dozen
  lines of XLA's log and a stack trace, which ``training.peer_log`` turns into the same one line); it does so at
  once when the lost process is process 0, which hosts the service. (jaxlib 0.10.2's client takes a
  ``missed_heartbeat_callback`` that could replace the abort, but ``jax.distributed.initialize`` does not pass
  one, and a Python callback there ends in ``std::bad_cast``.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils

from gemma_scope.training import peer_log

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure; the user is invited to retry"
EXIT_PEER_LOST = 69  # sysexits.h EX_UNAVAILABLE
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed's default; the bound on how long a lost peer goes unnoticed
# Orbax logs the sync point at WARNING on every process; the trainer's own line names the step and checkpoint.
logging.getLogger("absl").addFilter(lambda record: "Reached preemption sync point" not in record.getMessage())


class Preempted(Exception):
    """The run stopped on a signal after sealing a checkpoint of the step it had reached; rerun to resume."""

    exit_status = EXIT_PREEMPTED


@contextlib.contextmanager
def watch() -> Iterator[Callable[[int], bool]]:
    """Within the block, yields ``reached(step) -> bool``: call it with the step a run starts from as soon as that
    is known, then after every step with the steps done (on every process; Orbax's ``save`` calls it too, with the
    same step); True means save this step and stop (module docstring). Restores the previous handlers when the
    block ends. Outside the main thread (no signals there) ``reached`` is always False.

    JAX's sync point is one past the furthest step any process had passed to ``reached`` when the notice came,
    counting from 0 if none had; a notice before a resumed run's first call is therefore never reached (the run
    goes on until the scheduler's kill, losing only the steps since that start) — hence the early first call.
    Agreeing takes a second or so (module docstring): a 2-process test run of 40–120 fast steps finished first and
    exited 0 (the likely cause of a start-up SIGTERM once seen to be missed); slowed to 50 ms a step, every notice
    was reached.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False
        return
    distributed = jax.distributed.is_initialized()
    received: list[int] = []

    def handle(signum, frame):
        received.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):  # a second signal takes the default action
            if s in previous:
                signal.signal(s, previous[s])
        if distributed and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler: the processes agree on the step

    # With jax.distributed, SIGTERM stays with JAX's preemption notifier (installed by jax.distributed.initialize).
    previous = {s: signal.signal(s, handle) for s in ((signal.SIGINT,) if distributed else
                                                      (signal.SIGINT, signal.SIGTERM))}
    def agreed(step: int) -> bool:
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False): SIGTERM kills
            return False

    try:
        yield agreed if distributed else lambda step: bool(received)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def initialize(heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S, **kwargs) -> None:
    """``jax.distributed.initialize(**kwargs)`` with ``heartbeat_timeout_s``: a process that stops sending
    heartbeats is declared lost after that long and the others are stopped (module docstring); then, with several
    processes, this process's stderr goes through ``training.peer_log``'s filter. Call it before any JAX
    computation, in place of ``jax.distributed.initialize``.

    Raises:
      ValueError: heartbeat_timeout_s < 1.
    """
    if not heartbeat_timeout_s >= 1:
        raise ValueError(f"mesh.heartbeat_timeout_s={heartbeat_timeout_s} must be >= 1 (seconds)")
    jax.distributed.initialize(heartbeat_timeout_seconds=int(heartbeat_timeout_s), **kwargs)
    if jax.process_count() > 1:
        peer_log.start(jax.process_index(), jax.process_count())


_LOST_PEER = re.compile(r"Connection (closed|reset) by peer|heartbeat timeout|stopped sending heartbeats")


@contextlib.contextmanager
def exit_on_lost_peer() -> Iterator[None]:
    """In a multi-process run, turns a collective's failure on a lost peer (gloo: "Connection closed by peer") into
    one line on stderr and ``os._exit(EXIT_PEER_LOST)``: a normal exit would wait at jax.distributed's shutdown
    barrier for the lost process and then abort with a stack trace."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        lost = _LOST_PEER.search(str(e))
        if jax.process_count() == 1 or not lost:
            raise
        print(peer_log.lost_line(None, lost.group(0), jax.process_index(), jax.process_count()), file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)
