"""The shared command-line convention: --help on every entry point, one-line user errors, --verbose tracebacks."""

import os
import pathlib
import subprocess
import sys

import pytest

from gemma_scope import cli, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train": ["-m", "gemma_scope.train"], "activations": ["-m", "gemma_scope.activations"],
                "evaluate": ["-m", "gemma_scope.evaluate"], "score": ["-m", "gemma_scope.score"],
                "data.build": ["-m", "gemma_scope.data.build"], "sweep": ["launch/sweep.py"],
                "browse": ["-m", "gemma_scope.browse"], "steer": ["-m", "gemma_scope.steer"]}
OPTIONS = {"train": ["--config"], "activations": ["--config", "--out", "--tokens", "--storage_dtype"],
           "evaluate": ["--sae", "--activations", "--model", "--model_config", "--out", "--verbose"],
           "score": ["--model", "--text_file", "--max_length", "--verbose"],
           "data.build": ["--out", "--sources", "--max_tokens", "--heldout_fraction", "--verbose"],
           "sweep": ["--config", "--lambdas", "--workdir", "--mode", "--verbose"],
           "browse": ["--sae", "--model", "--out", "--tokens", "--site", "--verbose"],
           "steer": ["--sae", "--latent", "--alpha", "--prompt", "--tokens", "--temperature", "--seed", "--verbose"]}


def _run(args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # launch/sweep.py imports this checkout's package
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_lists_every_option(name):
    result = _run([*ENTRY_POINTS[name], "--help"])
    assert result.returncode in (0, 1), result.stderr[-2000:]  # absl's --help exits 1
    for option in OPTIONS[name]:
        assert option in result.stdout, f"{name} --help lacks {option}"


def test_user_error_is_one_line_with_exit_status_2(capsys):
    def main(argv):
        raise FileNotFoundError("no SAE at /nowhere:\n  expected a params.npz")

    with pytest.raises(SystemExit) as exit_:
        cli.run(main, ["--sae=/nowhere"])
    assert exit_.value.code == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: no SAE at /nowhere: expected a params.npz\n"
    with pytest.raises(FileNotFoundError):  # --verbose: the exception (and its traceback) goes through
        cli.run(main, ["--sae=/nowhere", "--verbose"])


def test_a_nan_stop_is_one_line(capsys):
    def main(argv):
        raise train.NonFiniteError("non-finite loss (NaN/Inf) at step 9; stopped (last good checkpoint: step 8)")

    with pytest.raises(SystemExit):
        cli.run(main, [])
    assert capsys.readouterr().err.count("\n") == 1


def test_other_exceptions_are_not_hidden():
    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        cli.run(main, [])


@pytest.mark.parametrize("args, message", [
    (["--config=experiments/2b_res.py:depth=3"], "bad config argument 'depth=3'"),
    (["--config=experiments/from_activations.py", "--config.workdir=/tmp/unused", "--config.data.path=/nonexistent"],
     "is not a directory of .npy activation files")])
def test_train_user_errors_are_one_line_and_verbose_shows_the_traceback(args, message):
    command = ["-m", "gemma_scope.train", *args]
    result = _run(command)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    verbose = _run([*command, "--verbose"])
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and message in verbose.stderr


def test_unknown_config_key_names_the_key_and_where():
    result = _run(["-m", "gemma_scope.train", "--config=experiments/from_activations.py", "--config.sae.widht=8"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown config key 'widht' under 'config.sae'" in result.stderr


def test_missing_config_file_is_one_line():
    result = _run(["-m", "gemma_scope.train", "--config=experiments/no_such_config.py"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "No such file or directory: 'experiments/no_such_config.py'" in result.stderr
