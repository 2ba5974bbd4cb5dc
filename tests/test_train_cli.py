"""The from_activations CLI end to end in subprocesses: release written, kill -9 then resume is bit-identical."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gemma_scope import release

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _release_files(workdir):
    return sorted(pathlib.Path(workdir, "release").rglob("params.npz"))


@pytest.mark.slow
def test_from_activations_cli_writes_release(tmp_path, make_npy_dir):
    data = make_npy_dir()
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "gemma_scope.train", "--config=experiments/from_activations.py",
         f"--config.workdir={workdir}", f"--config.data.path={data}", "--config.sae.width=48",
         "--config.sae.l0_coefficient=0.002", "--config.train.steps=6", "--config.train.batch_size=32",
         "--config.train.learning_rate=1e-3", "--config.seed=7", "--config.train.log_every=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = _release_files(workdir)
    params = release.load_params(path)
    assert params["W_enc"].shape == (16, 48) and params["W_enc"].dtype == np.float32
    assert str(path) in result.stdout
    assert json.loads((workdir / "config.json").read_text())["seed"] == 7


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_same_command_resumes_exactly(tmp_path, make_npy_dir):
    """A real kill -9 while training (possibly mid-checkpoint); rerunning the same command ends bit-identical."""
    data = make_npy_dir()

    def command(workdir):
        return [sys.executable, "-m", "gemma_scope.train", "--config=experiments/from_activations.py",
                f"--config.workdir={workdir}", f"--config.data.path={data}", "--config.sae.width=32",
                "--config.train.steps=300", "--config.train.batch_size=64", "--config.train.checkpoint_every=7",
                "--config.train.log_every=5", "--config.train.learning_rate=1e-3", "--config.train.l0_warmup_steps=50"]

    straight = subprocess.run(command(tmp_path / "straight"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    victim = subprocess.Popen(command(tmp_path / "killed"), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed/checkpoints"
    deadline = time.time() + 120
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert victim.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.005)
    time.sleep(np.random.default_rng().uniform(0, 0.05))
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not _release_files(tmp_path / "killed")  # it really died before the end
    resumed = subprocess.run(command(tmp_path / "killed"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a,), (b,) = _release_files(tmp_path / "straight"), _release_files(tmp_path / "killed")
    pa, pb = release.load_params(a), release.load_params(b)
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key])
