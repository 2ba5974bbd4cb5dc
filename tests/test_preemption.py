"""What clusters do to long runs: a preemption notice (SIGTERM / SIGINT) stops the trainer at a sealed
checkpoint with exit status 75 and the rerun resumes bitwise."""

import json
import os
import re
import signal
import threading
import time

import pytest
from test_reliability import _release_bytes, _trainer
from test_train import _config

from gemma_scope import activations, train
from gemma_scope.training import checkpoint, stopping


class _Signalling(activations.NpyShardSource):
    """Sends ``signum`` to this process once, when batch ``at`` is read (``at=-1``: when batches are first asked for,
    by the normalisation before the first step). ``at="seal"``: the seal of checkpoint 8 sends it, in Orbax's
    thread, and the reader of batch 9 waits for that (so the stop is on step 10 whatever the machine's load)."""

    at, signum, sealed = None, signal.SIGTERM, threading.Event()

    def batches(self, batch_size, start=0, mesh=None, stop=None):
        for number, batch in enumerate(super().batches(batch_size, start, mesh, stop), start):
            if self.at == "seal" and number == 9:
                assert self.sealed.wait(120)
            if self.at in (-1, number):
                self.at = None
                os.kill(os.getpid(), self.signum)
            yield batch


def _metrics(workdir):
    """metrics.jsonl's records without the throughput (wall-clock) fields."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("per_s")}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 8 short runs in one process: ~15 s on an idle 2-core machine
def test_signals_at_six_points_stop_at_a_sealed_step_and_resume_bitwise(tmp_path, make_npy_dir, monkeypatch):
    data = make_npy_dir()
    straight = _config(tmp_path / "straight", data)
    train.run(straight)
    config = _config(tmp_path / "run", data)
    source = _Signalling(str(data))
    seal = checkpoint.Checkpointer._seal

    def seal_then_signal(self):  # while checkpoint 8 is being written (sealed, not yet renamed into place)
        if self._pending == 8 and source.at == "seal":
            os.kill(os.getpid(), signal.SIGTERM)
            source.sealed.set()
        seal(self)

    monkeypatch.setattr(checkpoint.Checkpointer, "_seal", seal_then_signal)
    # Before the first step, before the first checkpoint (SIGINT), on a checkpoint step, between checkpoints, during
    # a checkpoint write, on the last step.
    points = [(-1, signal.SIGTERM, 1), (1, signal.SIGINT, 2), (3, signal.SIGTERM, 4), (5, signal.SIGINT, 6),
              ("seal", signal.SIGTERM, 10), (11, signal.SIGTERM, 12)]
    for at, source.signum, expected in points:
        source.at = at
        with pytest.raises(stopping.Preempted) as stop:
            train.run(config, source)
        step = int(re.search(r"stopped after step (\d+) of 12", str(stop.value)).group(1))
        assert step == expected
        assert f"checkpoint {tmp_path / 'run/checkpoints' / str(step)} is sealed" in str(stop.value)
        assert checkpoint.verify(tmp_path / "run/checkpoints" / str(step)) is None
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    source.at = None
    train.run(config, source)
    assert _release_bytes(tmp_path / "run") == _release_bytes(tmp_path / "straight") != {}
    assert _metrics(tmp_path / "run") == _metrics(tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_to_the_command_prints_one_line_and_exits_75(tmp_path, make_npy_dir):
    process = _trainer(tmp_path / "run", make_npy_dir())
    while process.poll() is None and not (tmp_path / "run/checkpoints/4").is_dir():
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    err = process.stderr.read().strip().splitlines()
    assert process.wait() == stopping.EXIT_PREEMPTED, err
    step = int(re.fullmatch(r"preempted: stopped after step (\d+) of 120; checkpoint (\S+) is sealed; rerun the "
                            r"same command to resume", err[-1]).group(1))
    assert step >= 4 and checkpoint.verify(tmp_path / "run/checkpoints" / str(step)) is None
