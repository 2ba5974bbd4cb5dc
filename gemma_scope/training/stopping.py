"""How a run stops early: a preemption notice (SIGTERM, SIGINT) and a lost peer process.

- Preemption. Spot / preemptible machines get SIGTERM some seconds before they are killed (~30 s on Cloud TPU).
  ``watch`` makes the trainer finish the step it is on, save that step and stop with ``Preempted`` (exit status
  ``EXIT_PREEMPTED``). One process: Python handlers for SIGTERM and SIGINT set a flag that ``reached(step)``
  reads. Several processes (``jax.distributed``): JAX's preemption sync manager owns SIGTERM (XLA's coordination
  service propagates a notice on any process to all; they agree on the step to save, one past the furthest step
  any of them had reached, and ``multihost_utils.reached_preemption_sync_point(step)`` is True at that step on
  every process); SIGINT is forwarded to this process as SIGTERM so that it takes the same path. A second signal
  during the stop takes the default action (SIGINT: KeyboardInterrupt; SIGTERM: exit).
- A lost peer. ``initialize`` starts ``jax.distributed`` with a heartbeat timeout (``DEFAULT_HEARTBEAT_TIMEOUT_S``)
  and a missed-heartbeat callback: when a process stops sending heartbeats (killed, its host lost) the
  coordination service tells the others, which print one line naming the lost process and exit with
  ``EXIT_PEER_LOST`` instead of hanging in a collective (JAX's default callback aborts with a stack trace).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure; the user is invited to retry"
EXIT_PEER_LOST = 69  # sysexits.h EX_UNAVAILABLE
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed's default; the bound on how long a lost peer goes unnoticed


class Preempted(Exception):
    """The run stopped on a signal after sealing a checkpoint of the step it had reached; rerun to resume."""

    exit_status = EXIT_PREEMPTED


@contextlib.contextmanager
def watch() -> Iterator[Callable[[int], bool]]:
    """Within the block, yields ``reached(step) -> bool``: call it after every step with the steps done (on every
    process, from the same start); True means save this step and stop (module docstring). Restores the previous
    handlers when the block ends. Outside the main thread (no signals there) ``reached`` is always False."""
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
    try:
        yield multihost_utils.reached_preemption_sync_point if distributed else lambda step: bool(received)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def initialize(heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S, **kwargs) -> None:
    """``jax.distributed.initialize(**kwargs)`` whose processes exit with one line and ``EXIT_PEER_LOST`` within
    ``heartbeat_timeout_s`` (+ a few seconds) of a peer's loss (module docstring). Call it before any JAX
    computation, in place of ``jax.distributed.initialize``.

    Raises:
      ValueError: heartbeat_timeout_s < 1.
    """
    if heartbeat_timeout_s < 1:
        raise ValueError(f"mesh.heartbeat_timeout_s={heartbeat_timeout_s} must be >= 1 (seconds)")
    from jax._src import distributed  # jax.distributed.initialize takes no missed-heartbeat callback: pass ours

    make_client = distributed._jax.get_distributed_runtime_client

    def client_with_callback(*args, **kw):
        return make_client(*args, **kw, missed_heartbeat_callback=_peer_lost)

    distributed._jax.get_distributed_runtime_client = client_with_callback
    try:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s, **kwargs)
    finally:
        distributed._jax.get_distributed_runtime_client = make_client


def lost_processes(status: str) -> str:
    """The lost processes named in a coordination-service error (``"process 1"``, ``"processes 1, 2"``), or
    ``"a process"`` when it names none (e.g. the coordinator itself is gone)."""
    listed = re.search(r"unhealthy \(stopped sending heartbeats\):\s*([\d\s,]+)", status)
    ids = re.findall(r"\d+", listed.group(1)) if listed else re.findall(r"/task:(\d+)", status)
    ids = sorted(set(ids) - {str(jax.process_index())}, key=int)
    if not ids:
        return "the coordinator (process 0)" if jax.process_index() else "a process"
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(ids)


def _peer_lost(status) -> None:
    """The coordination service's error callback (a C++ thread): one line, then exit without waiting for the
    collectives that will never finish."""
    text = str(status)
    print(f"error: lost {lost_processes(text)} of {jax.process_count()} (no heartbeat within the timeout: killed, "
          f"or its host lost); process {jax.process_index()} stops too. Restart all processes to resume from the "
          f"newest checkpoint. ({' '.join(text.split())[:200]})", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)
