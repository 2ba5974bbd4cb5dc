"""A multi-process run's stderr when a process is lost, as one line.

When the lost process is process 0 (it hosts ``jax.distributed``'s coordination service), or a survivor is not in
a collective when another dies, XLA's coordination service ends the survivors itself: a dozen lines of its log, a
C++ stack trace, then SIGABRT (``training.stopping``). ``start`` routes this process's stderr (file descriptor 2,
so XLA's log as well as Python's) through a small filter process that passes everything on unchanged, except
that log (and a thread's traceback just before it), which it replaces by the line ``stopping.exit_on_lost_peer``
prints for a broken collective (``lost_line``). XLA's coordination records and tracebacks wait up to ``HOLD_S``
to see whether the fatal record follows; all else passes at once. A separate process, because nothing runs in
this one after the abort, and jaxlib's hook for the event (``missed_heartbeat_callback``) cannot call Python. The
abort's exit status (134) stays: only this process could change it.

Stdlib only: the filter runs as ``python peer_log.py PROCESS_INDEX PROCESS_COUNT``, reading stdin, writing stdout.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys

# absl's log prefix, as XLA writes it: "E1202 12:28:29.216721    4703 coordination_service.cc:1549] ..."
_RECORD = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ([\w.]+):\d+\] ")
_COORDINATION = {b"coordination_service.cc", b"coordination_service_agent.cc", b"preemption_sync_manager.cc",
                 b"preemption_notifier.cc", b"client.h"}
_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
_OWN = b"error: "  # how the trainer's one-line errors start
_TRACEBACK_STARTS = (b"Traceback (most recent call last):", b"Exception in thread ")  # one a lost peer may cause
_OWN_LINE = re.compile(rb"([^\n]*\])?" + _OWN)  # at the start, or right after a progress bar's "...]"
_TRACEBACK = re.compile(b"|".join(map(re.escape, _TRACEBACK_STARTS)))
# Where, in a line whose end has not arrived, a record, a traceback or the trainer's line may begin.
_MAY_START = re.compile(b"|".join([rb"[IWEF]\d", rb"[IWEF]$"] + [
    re.escape(word[:n]) + (b"" if n == len(word) else b"$")  # the whole word, or its start at the end
    for word in (_OWN, *_TRACEBACK_STARTS) for n in range(1, len(word) + 1)]))
_SIGTERM_CAUGHT = b"SIGTERM caught at"  # the trainer's own "preempted: ..." line follows
HOLD_S = 2.0  # seconds: held lines that no fatal record follows within this are passed on


def lost_line(lost: list[int] | None, why: str, index: int, count: int) -> str:
    """The one line for process ``index`` of ``count`` stopping because the processes ``lost`` are gone (None: one
    of the others, unknown which), ``why`` saying how it showed."""
    candidates = lost if lost is not None else [i for i in range(count) if i != index]
    if len(candidates) == 1:
        who = f"process {candidates[0]}"
    else:
        who = f"{'processes' if lost else 'one of processes'} {', '.join(map(str, candidates))}"
    role = ", the coordinator" if candidates == [0] else ""
    return (f"error: lost {who} of {count}{role} ({why}; killed, or its host lost); process {index} stops too. "
            "Restart all processes to resume from the newest checkpoint.")


def _lost_from(log: bytes) -> tuple[list[int] | None, str]:
    """Which processes XLA's fatal log says were lost, and how it showed."""
    if b"leader task was preempted/died" in log:
        return [0], "its coordination service stopped answering"
    unhealthy = re.search(rb"stopped sending heartbeats\):\s*\n((?:\s*\d+[\s,]*\n)+)", log)
    if unhealthy:
        return sorted({int(i) for i in re.findall(rb"\d+", unhealthy.group(1))}), "stopped sending heartbeats"
    tasks = sorted({int(i) for i in re.findall(rb"(?:Task |/task:)(\d+)", log)})
    return tasks or None, "JAX's coordination service stopped this process"


class Filter:
    """What of this process's stderr to pass on, fed as it arrives (module docstring). ``feed(data)``, ``idle()``
    (nothing arrived for ``HOLD_S``) and ``end()`` (end of file) return the bytes to write now."""

    def __init__(self, index: int, count: int):
        self.index, self.count = index, count
        self.partial = b""  # the start of a line whose end has not arrived
        self.held: list[bytes] = []  # coordination records, tracebacks and what follows them: a fatal record may
        self.fatal: bytes | None = None  # from the fatal record on, all that followed (the process is aborting)
        self.reported = False  # an "error: " line was passed on: the one line is out already
        self.line_open = False  # what was passed on last ended without a newline (a progress bar)

    @property
    def holding(self) -> bool:
        return bool(self.held or self.partial)

    def feed(self, data: bytes) -> bytes:
        *lines, partial = (self.partial + data).split(b"\n")
        self.partial = b""
        out = b"".join(self._line(line + b"\n") for line in lines)
        self.partial = partial
        # Progress bars redraw with "\r" and no newline: pass a partial line on at once, up to where a record or
        # the trainer's one line may start.
        if self.partial and self.fatal is None and not self.held:
            may_start = _MAY_START.search(self.partial)
            cut = may_start.start() if may_start else len(self.partial)
            out, self.partial = out + self._put(self.partial[:cut]), self.partial[cut:]
        return out

    def idle(self) -> bytes:
        if self.fatal is not None:
            return b""
        out, self.held, self.partial = b"".join(self.held) + self.partial, [], b""
        return self._put(out)

    def end(self) -> bytes:
        if self.fatal is None:
            return self.idle()
        if self.reported:
            return b""
        lost, why = _lost_from(self.fatal + self.partial)
        return b"\n" * self.line_open + (lost_line(lost, why, self.index, self.count) + "\n").encode()

    def _line(self, line: bytes) -> bytes:
        if _OWN_LINE.match(line.rsplit(b"\r", 1)[-1]):  # the trainer's one line says why this process stops:
            self.reported, self.held = True, []  # XLA's records just before it go
            return self._put(line)
        if self.fatal is not None:
            self.fatal += line
            return b""
        record = _RECORD.search(line)  # not always at the start: after a progress bar's redraw, say
        if record and record.group(1) in _COORDINATION:
            head, line = line[:record.start()], line[record.start():]
            out = self.idle() + self._put(head) if head else b""
            if _FATAL in line:
                self.fatal, self.held = b"".join(self.held) + line, []
            elif _SIGTERM_CAUGHT not in line:
                self.held.append(line)
            return out
        if self.held and not (record and record.start() == 0) or _TRACEBACK.match(line):
            self.held.append(line)  # a held record's continuation line, a thread's traceback the abort may follow,
            return b""              # or output that waits for HOLD_S
        return self.idle() + self._put(line)

    def _put(self, out: bytes) -> bytes:
        if out:
            self.line_open = not out.endswith(b"\n")
        return out


def start(index: int, count: int) -> None:
    """Routes file descriptor 2 of this process through the filter for process ``index`` of ``count`` (module
    docstring) until this process exits. Call it once, after ``jax.distributed.initialize``."""
    sys.stderr.flush()
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(index), str(count)],
                             stdin=subprocess.PIPE, stdout=2)
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()  # file descriptor 2 is its stdin's only writer here: it ends when this process does


def _serve(index: int, count: int) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, signal.SIG_IGN)  # a Ctrl-C or a preemption notice to the process group is the trainer's
    lines = Filter(index, count)
    while True:
        ready, _, _ = select.select([0], [], [], HOLD_S if lines.holding else None)
        data = os.read(0, 1 << 16) if ready else None
        out = lines.end() if data == b"" else lines.idle() if data is None else lines.feed(data)
        while out:
            out = out[os.write(1, out):]
        if data == b"":
            return


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
