"""training.peer_log: XLA's log when a process is lost becomes one line naming it, however the pipe splits it; all
other output passes unchanged and in order; behind a real abort, the filter process prints the line.

The golden logs are stderr captured from jaxlib 0.10.2 on CPU, two processes with ``heartbeat_timeout_seconds=5``:
``xla_abort_lost_coordinator.txt`` is process 1's when process 0 was killed (kill -9) while 1 slept;
``xla_abort_lost_heartbeats.txt`` is process 0's when process 1 was killed while 0 waited at a barrier.
"""

import pathlib
import signal
import subprocess
import sys

import pytest

from gemma_scope.training import peer_log

GOLDEN = pathlib.Path(__file__).parent / "golden"
LOST_COORDINATOR = (GOLDEN / "xla_abort_lost_coordinator.txt").read_bytes()
LOST_HEARTBEATS = (GOLDEN / "xla_abort_lost_heartbeats.txt").read_bytes()
RESTART = b"Restart all processes to resume from the newest checkpoint.\n"
LINE_COORDINATOR = (b"error: lost process 0 of 2, the coordinator (its coordination service stopped answering; killed, "
                    b"or its host lost); process 1 stops too. " + RESTART)
LINE_HEARTBEATS = (b"error: lost process 1 of 2 (stopped sending heartbeats; killed, or its host lost); process 0 "
                   b"stops too. " + RESTART)
BAR = b"\r  2%|2         | 8/400 [00:04<02:48,  2.32step/s, l0=15.6]"  # tqdm redraws without a newline


def _filtered(data: bytes, chunk: int, index: int, count: int = 2) -> bytes:
    lines = peer_log.Filter(index, count)
    return b"".join(lines.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)) + lines.end()


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_xla_abort_log_becomes_one_line_naming_the_lost_process(chunk):
    start = b"shuffle buffer: 256 rows\n" + BAR + b"\n"
    assert _filtered(start + LOST_COORDINATOR, chunk, 1) == start + LINE_COORDINATOR
    assert _filtered(start + LOST_HEARTBEATS, chunk, 0) == start + LINE_HEARTBEATS
    # mid-redraw: the line starts on a line of its own
    assert _filtered(BAR + LOST_COORDINATOR, chunk, 1) == BAR + b"\n" + LINE_COORDINATOR
    several = LOST_HEARTBEATS.replace(b"(stopped sending heartbeats):\n1\n", b"(stopped sending heartbeats):\n1\n3\n")
    assert _filtered(several, chunk, 0, 4) == (b"error: lost processes 1, 3 of 4 (stopped sending heartbeats; killed, "
                                               b"or its host lost); process 0 stops too. " + RESTART)


def test_an_unknown_fatal_status_still_ends_in_one_line():
    log = LOST_COORDINATOR.replace(b"Either the leader task was preempted/died/restarted unexpectedly", b"Something")
    assert _filtered(log, 1 << 20, 2, 3) == (b"error: lost one of processes 0, 1 of 3 (JAX's coordination service "
                                             b"stopped this process; killed, or its host lost); process 2 stops too. "
                                             + RESTART)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_the_trainers_own_line_is_the_only_one_whichever_comes_first(chunk):
    """A broken collective makes the trainer print its line (training.stopping.exit_on_lost_peer) while XLA's
    service aborts it: before, between or after XLA's records, that line alone is shown."""
    own = peer_log.lost_line(None, "Connection closed by peer", 1, 2).encode() + b"\n"
    fatal_at = LOST_COORDINATOR.index(b"F1202")
    for log in (own + LOST_COORDINATOR, LOST_COORDINATOR[:fatal_at] + own + LOST_COORDINATOR[fatal_at:],
                LOST_COORDINATOR + own):
        assert _filtered(log, chunk, 1) == own
    assert _filtered(BAR + own + LOST_COORDINATOR, chunk, 1) == BAR + own  # printed after a redraw


def test_other_output_passes_unchanged_and_in_order():
    other_record = b"W1202 12:00:00.000001   1234 cpu_client.cc:512] an XLA warning of another kind\n"
    held = LOST_COORDINATOR[:LOST_COORDINATOR.index(b"F1202")]  # coordination records no fatal one follows
    lines = peer_log.Filter(0, 2)
    assert lines.feed(b"before\n" + BAR) == b"before\n" + BAR  # at once, the redraw too
    assert lines.feed(b"\n" + other_record) == b"\n" + other_record
    assert lines.feed(held) == b"" and lines.holding
    assert lines.feed(b"after\n") == b""  # may still be a continuation line of a held record
    assert lines.idle() == held + b"after\n" and not lines.holding  # nothing fatal came: all of it, in order
    assert lines.feed(b"last, unfinished") == b"last, unfinished" and lines.end() == b""


def test_a_traceback_goes_with_the_abort_that_follows_it_and_stays_otherwise():
    """A thread whose call broke on the lost peer may print its traceback just before XLA's fatal record."""
    traceback = (b"Exception in thread Thread-3 (_save):\nTraceback (most recent call last):\n  File \"x.py\", line 1, "
                 b"in _save\njax.errors.JaxRuntimeError: UNAVAILABLE: Socket closed\n")
    assert _filtered(traceback + LOST_COORDINATOR, 7, 1) == LINE_COORDINATOR
    assert _filtered(b"before\n" + traceback, 7, 1) == b"before\n" + traceback  # released at the end of the output


def test_jaxs_sigterm_record_gives_way_to_the_trainers_line():
    caught = b"W1202 12:29:40.543635    4890 preemption_notifier.cc:90] SIGTERM caught at 2026-12-02T12:29:40\n"
    preempted = b"preempted: stopped after step 16 of 400; checkpoint /w/checkpoints/16 is sealed; rerun ...\n"
    assert _filtered(caught + BAR + b"\n" + preempted, 1 << 20, 1) == BAR + b"\n" + preempted


SCRIPT = """
import os, sys
from gemma_scope.training import peer_log
peer_log.start(1, 2)
print("before", file=sys.stderr, flush=True)
os.write(2, open(sys.argv[1], "rb").read())
if sys.argv[2] == "abort":
    os.abort()
print("after", file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("ending", ["abort", "exit"])
def test_the_filter_process_behind_file_descriptor_2(tmp_path, ending):
    """The real plumbing: XLA's records written straight to file descriptor 2, then abort() as XLA does: the last
    line is the filter's, the status the abort's; a process that goes on has nothing lost."""
    held = GOLDEN / "xla_abort_lost_coordinator.txt" if ending == "abort" else tmp_path / "held.txt"
    if ending == "exit":
        held.write_bytes(LOST_COORDINATOR[:LOST_COORDINATOR.index(b"F1202")])
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(held), ending], capture_output=True, timeout=60,
                         cwd=pathlib.Path(__file__).parents[1])
    if ending == "abort":
        assert (run.returncode, run.stderr) == (-signal.SIGABRT, b"before\n" + LINE_COORDINATOR)
    else:
        assert (run.returncode, run.stderr) == (0, b"before\n" + held.read_bytes() + b"after\n")
