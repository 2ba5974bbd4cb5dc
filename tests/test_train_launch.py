"""launch/: the λ-sweep launcher's commands and the TPU VM script's dry run."""

import importlib.util
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch/sweep.py")  # launch/ is scripts, not a package
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_grid_sweep_is_one_run_with_every_lambda():
    (command,) = sweep.sweep_commands("experiments/from_activations.py", [3e-4, 1e-3], "/w", "grid", ["--config.seed=2"])
    assert command[1:3] == ["-m", "gemma_scope.train"]
    assert command[3:] == ["--config=experiments/from_activations.py", "--config.workdir=/w",
                           "--config.sae.l0_coefficient=0.0003,0.001", "--config.seed=2"]


def test_separate_sweep_gives_one_workdir_per_lambda():
    commands = sweep.sweep_commands("c.py", [3e-4, 1e-3], "/w/", "separate", [], tpu="v3", zone="z")
    assert [c[-2] for c in commands] == ["--config.workdir=/w/l0_0.0003", "--config.workdir=/w/l0_0.001"]
    assert all(c[:2] == ["bash", str(sweep.TPU_SCRIPT)] and "--tpu" in c for c in commands)
    with pytest.raises(ValueError, match="--zone"):
        sweep.sweep_commands("c.py", [1e-3], "/w", "grid", [], tpu="v3")
    with pytest.raises(ValueError, match=">= 0"):
        sweep.sweep_commands("c.py", [-1.0], "/w", "grid", [])


def test_tpu_script_dry_run_prints_all_worker_commands():
    result = subprocess.run(["bash", str(ROOT / "launch/tpu_vm.sh"), "--tpu", "v3-8", "--zone", "eu", "--setup", "--",
                             "--config=experiments/from_activations.py"], capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all("--worker=all" in ln for ln in lines[1:])
    assert "gemma_scope.train" in lines[-1] and "distributed=True" in lines[-1]
    bad = subprocess.run(["bash", str(ROOT / "launch/tpu_vm.sh"), "--zone", "eu", "--", "x"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--tpu NAME" in bad.stderr
