"""Nothing lost, nothing silent: corrupt checkpoints, workdir safety, bad inputs, kill -9 at random moments.

Each test reproduces one failure and asserts what happens now: a fallback whose release is
bitwise equal to an uninterrupted run, or an error of the right type whose message names the file / field.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from test_train import _config, _release_files

from gemma_scope import activations, release, score, train
from gemma_scope.activations import shards
from gemma_scope.data import builder
from gemma_scope.data.sources import TextFiles
from gemma_scope.evaluation import releases
from gemma_scope.training import checkpoint, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _release_bytes(root) -> dict:
    """Every released file's content by path relative to the workdir: bytes, and for ``.npz`` (a zip holding
    write times) the bytes of each array."""
    def content(p):
        if p.suffix != ".npz":
            return p.read_bytes()
        with np.load(p) as npz:
            return {k: (npz[k].dtype.str, npz[k].shape, npz[k].tobytes()) for k in npz.files}
    return {p.relative_to(root).as_posix(): content(p) for p in sorted(pathlib.Path(root, "release").rglob("*"))
            if p.is_file()}


def _flip_byte(path: pathlib.Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- checkpoints -------------------------------------------------------------------------------------------------

def test_corrupt_newest_checkpoint_falls_back_to_an_intact_one_bitwise(tmp_path, make_npy_dir, capfd):
    config = _config(tmp_path / "run", make_npy_dir())
    train.run(config)
    uninterrupted = _release_bytes(tmp_path / "run")
    newest = tmp_path / "run/checkpoints/12"
    assert (newest / checkpoint.CHECKSUMS_FILE).is_file()
    assert checkpoint.verify(newest) is None
    biggest = max((p for p in newest.rglob("*") if p.is_file() and p.parent != newest), key=lambda p: p.stat().st_size)
    _flip_byte(biggest, biggest.stat().st_size // 2)
    assert "sha256" in checkpoint.verify(newest)
    for p in (tmp_path / "run/release").rglob("*"):
        if p.is_file():
            p.unlink()
    capfd.readouterr()

    train.run(config)
    err = capfd.readouterr().err
    assert f"checkpoint {newest} is corrupt" in err and biggest.name in err
    assert (tmp_path / "run/checkpoints-corrupt/12").is_dir()  # kept for inspection, not deleted
    assert _release_bytes(tmp_path / "run") == uninterrupted
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["12", "8"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 3, 6, 6, 9, 9, 12, 12]


def test_checkpoint_without_checksums_is_not_trusted(tmp_path, make_npy_dir, capfd):
    config = _config(tmp_path / "run", make_npy_dir(), steps=8)
    train.run(config)
    (tmp_path / "run/checkpoints/8" / checkpoint.CHECKSUMS_FILE).unlink()
    capfd.readouterr()
    config = _config(tmp_path / "run", tmp_path / "acts", steps=12)
    train.run(config)
    assert f"{checkpoint.CHECKSUMS_FILE} is missing" in capfd.readouterr().err  # fell back to step 4
    assert (tmp_path / "run/checkpoints-corrupt/8").is_dir()


def _tiny_checkpoints(root, steps) -> dict:
    """Saves ``{"w": [step, step + 1, step + 2]}`` as checkpoints ``steps`` under ``root``; returns the states."""
    states = {step: {"w": jax.numpy.arange(3.0) + step} for step in steps}
    saver = checkpoint.Checkpointer(root, 1, len(steps), 3)
    for step, state in states.items():
        saver.save(step, state, force=True)
    saver.close()
    return states


def test_unsealed_checkpoint_of_an_older_version_is_resumed_saying_so(tmp_path, capfd):
    root = tmp_path / "checkpoints"
    states = _tiny_checkpoints(root, [1, 2])
    for name in (checkpoint.CHECKSUMS_FILE, checkpoint.STATE_FORMAT_FILE):  # as written before seals existed
        (root / "2" / name).unlink()
    capfd.readouterr()
    reopened = checkpoint.Checkpointer(root, 1, 2, 3)
    assert reopened.latest_step() == 2 and reopened.state_format(2) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"checkpoint {root / '2'} has no {checkpoint.CHECKSUMS_FILE} (written by a version before "
                   "checkpoints were sealed): its Orbax metadata is complete but its arrays cannot be checked; "
                   "resuming from it"]
    target = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
    np.testing.assert_array_equal(reopened.restore(2, target)["w"], states[2]["w"])
    reopened.close()
    (root / "2/_CHECKPOINT_METADATA").unlink()  # incomplete: not taken for an older version's
    assert checkpoint.Checkpointer(root, 1, 2, 3).latest_step() == 1
    assert f"checkpoint {root / '2'} is corrupt: {root / '2' / checkpoint.CHECKSUMS_FILE} is missing" in \
        capfd.readouterr().err


@pytest.mark.parametrize("content, problem", [(b"", "cannot be read as JSON (JSONDecodeError"),
                                              (b"\x00garbage", "cannot be read as JSON"),
                                              (b'["a"]', "does not hold a {file: sha256} object")])
def test_empty_or_garbage_seal_is_named(tmp_path, content, problem):
    root = tmp_path / "checkpoints"
    _tiny_checkpoints(root, [1])
    (root / "1" / checkpoint.CHECKSUMS_FILE).write_bytes(content)
    assert checkpoint.verify(root / "1").startswith(f"{root / '1' / checkpoint.CHECKSUMS_FILE} {problem}")


def test_corrupt_checkpoint_is_moved_aside_when_checkpoints_corrupt_is_a_file(tmp_path, capfd):
    root = tmp_path / "checkpoints"
    _tiny_checkpoints(root, [1, 2])
    (tmp_path / "checkpoints-corrupt").write_text("a user's file\n")
    (root / "2" / checkpoint.CHECKSUMS_FILE).write_text("{}")
    capfd.readouterr()
    assert checkpoint.Checkpointer(root, 1, 2, 3).latest_step() == 1
    assert f"checkpoint {root / '2'} is corrupt: default/" in capfd.readouterr().err
    assert (tmp_path / "checkpoints-corrupt").read_text() == "a user's file\n"
    assert (tmp_path / "checkpoints-corrupt.1/2/default").is_dir()


class _Exploding(activations.NpyShardSource):
    """Finite activations whose squares overflow float32 from batch 9 on: an infinite loss after checkpoint 8."""

    def batches(self, batch_size, start=0, mesh=None, stop=None):
        for number, batch in enumerate(super().batches(batch_size, start, mesh, stop), start):
            yield {k: v * np.float32(1e30) if number >= 9 else v for k, v in batch.items()}


def test_nonfinite_stop_names_a_checkpoint_that_verifies(tmp_path, make_npy_dir):
    data = make_npy_dir()
    with pytest.raises(train.NonFiniteError, match=r"at step 9; stopped \(last good checkpoint: step 8\)"):
        train.run(_config(tmp_path / "run", data), source=_Exploding(str(data)))
    assert checkpoint.verify(tmp_path / "run/checkpoints/8") is None
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["4", "8"]


class _NanAfterTraining(activations.NpyShardSource):
    """Finite activations for the training steps, then a NaN in the first batch read to measure the release's L0."""

    def __init__(self, path, steps):
        super().__init__(path)
        self._steps = steps

    def batches(self, batch_size, start=0, mesh=None, stop=None):
        for number, batch in enumerate(super().batches(batch_size, start, mesh, stop), start):
            yield {k: v.at[0, 5, 3].set(np.nan) if number == self._steps else v for k, v in batch.items()}


def test_nan_in_the_l0_batches_releases_nothing_and_names_the_batch(tmp_path, make_npy_dir):
    data = make_npy_dir()
    with pytest.raises(ValueError, match=r"^activation batch 4, read after training to measure the average L0 of "
                                         r"each SAE \(train.eval_batches\), holds NaN/Inf at site 'custom'"):
        train.run(_config(tmp_path / "run", data, steps=4), source=_NanAfterTraining(str(data), 4))
    assert _release_files(tmp_path / "run") == [] and checkpoint.verify(tmp_path / "run/checkpoints/4") is None


# --- workdir -----------------------------------------------------------------------------------------------------

def test_second_trainer_on_a_workdir_is_refused_naming_the_holder(tmp_path, make_npy_dir):
    config = _config(tmp_path / "run", make_npy_dir(), steps=4)
    with workdir.lock(tmp_path / "run"):
        with pytest.raises(workdir.WorkdirInUseError, match=f"pid {os.getpid()} on host"):
            train.run(config)
    (tmp_path / "run/.lock").write_text("pid 999999 on host gone\n")  # a dead holder's file blocks nothing
    assert _release_files(tmp_path / "run") == [] and train.run(config)


def test_resume_refuses_a_result_changing_config_and_steps_below_the_checkpoint(tmp_path, make_npy_dir):
    data = make_npy_dir()
    train.run(_config(tmp_path / "run", data, steps=8))
    changed = _config(tmp_path / "run", data, steps=8)
    changed.sae.l0_coefficient, changed.sae.width, changed.seed = (2e-3, 1e-2), 64, 1
    with pytest.raises(ValueError) as err:
        train.run(changed)
    for line in ("sae.l0_coefficient: [0.001, 0.01] → [0.002, 0.01]", "sae.width: 32 → 64", "seed: 0 → 1"):
        assert line in str(err.value)
    with pytest.raises(ValueError, match=r"train.steps=4 is below the newest checkpoint \(step 8\)"):
        train.run(_config(tmp_path / "run", data, steps=4))
    # Fields that do not change the result may differ: more steps, other logging and checkpoint cadence.
    longer = _config(tmp_path / "run", data, steps=12, log_every=4, checkpoint_every=6, eval_batches=1)
    assert train.run(longer)
    assert json.loads((tmp_path / "run/config.json").read_text())["train"]["steps"] == 12


def test_config_differences_ignores_only_the_documented_fields():
    saved = {"workdir": "a", "seed": 0, "train": {"steps": 10, "log_every": 1, "batch_size": 64},
             "eval": {"seq_len": 5}, "mesh": {"model": "auto"}, "sae": {"width": 32}}
    current = {"workdir": "b", "seed": 0, "train": {"steps": 20, "log_every": 2, "batch_size": 128},
               "eval": {"seq_len": 7}, "mesh": {"model": "2"}, "sae": {"width": 32, "new": 1}}
    assert workdir.config_differences(saved, current) == ['sae.new: "absent" → 1', "train.batch_size: 64 → 128"]
    # A field added after the run was written, at its default (what older versions did), is no difference.
    assert workdir.config_differences(saved, current, {"sae": {"new": 1}}) == ["train.batch_size: 64 → 128"]
    assert workdir.config_differences(saved, current, {"sae": {"new": 2}}) == ['sae.new: "absent" → 1',
                                                                               "train.batch_size: 64 → 128"]


def _world_readable_dir() -> pathlib.Path:
    path = pathlib.Path(tempfile.mkdtemp(prefix="gemma_scope_reliability_"))
    path.chmod(0o755)
    return path


def test_unwritable_checkpoint_directory_fails_within_seconds_naming_it(make_npy_dir):
    """Reproduces the hang (Orbax's threads waited forever at exit); as root the trainer runs as nobody."""
    base = _world_readable_dir()
    data = make_npy_dir()
    for f in data.glob("*.npy"):  # the data must be readable by the unprivileged trainer
        (base / f.name).write_bytes(f.read_bytes())
        (base / f.name).chmod(0o644)
    run_dir = base / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    run_dir.chmod(0o777)
    (run_dir / "checkpoints").chmod(0o555)
    as_nobody = []  # root writes anywhere: run the trainer as nobody
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a directory unwritable")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    start = time.monotonic()
    result = subprocess.run(
        [*as_nobody, sys.executable, "-m", "gemma_scope.train", "--config=experiments/from_activations.py",
         f"--config.data.path={base}", f"--config.workdir={run_dir}", "--config.sae.width=32",
         "--config.train.steps=8", "--config.train.batch_size=64", "--config.train.norm_batches=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(base)})
    shutil.rmtree(base)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert f"cannot write to {run_dir / 'checkpoints'}" in result.stderr


# --- activation shards --------------------------------------------------------------------------------------------

class _FakeModelSource:
    """Chunks of Gaussian activations, enough of ``ModelSource`` for ``write_shards``."""

    sites, d_in, model_name = ["res.3"], {"res.3": 8}, "fake"

    def chunk(self, k, mesh=None, dtype=np.float32):
        return {"res.3": np.random.default_rng(k).normal(size=(100, 8)).astype(dtype)}


@pytest.fixture
def shard_dir(tmp_path):
    return shards.write_shards(_FakeModelSource(), tmp_path / "acts", tokens=300)["res.3"]


def test_intact_shards_open_and_bfloat16_shards_are_verified_too(shard_dir, tmp_path):
    arrays, manifest = shards.open_shards(shard_dir)
    assert [a.shape for a in arrays] == [(100, 8)] * 3 and manifest["site"] == "res.3"
    bf16 = shards.write_shards(_FakeModelSource(), tmp_path / "bf16", tokens=100, storage_dtype="bfloat16")
    assert shards.open_shards(bf16["res.3"])[0][0].dtype.name == "bfloat16"
    _flip_byte(bf16["res.3"] / "shard_00000.npy", 200)
    with pytest.raises(ValueError, match="shard_00000.npy: sha256"):
        shards.open_shards(bf16["res.3"])


@pytest.mark.parametrize("damage, error, message", [
    ("flip", ValueError, r"shard_00001.npy: sha256 .* differs from the manifest"),
    ("delete", FileNotFoundError, r"\['shard_00002.npy'\] listed in manifest.json are missing"),
    ("truncate", ValueError, r"shard_00001.npy: cannot read it as an .npy array"),
    ("append", ValueError, r"shard_00001.npy: \d+ bytes, expected \d+"),
    ("zero_rows", ValueError, r"shard_00001.npy: activations must be float32 \[N > 0, d > 0\], got float32 \[0, 8\]"),
    ("zero_width", ValueError, r"shard_00001.npy: activations must be float32 \[N > 0, d > 0\], got .* \[100, 0\]"),
    ("bad_site", ValueError, r"manifest.json: malformed manifest: 'site': bad site 'res.x'; expected '<kind>.<layer>'"),
    ("bad_json", ValueError, r"manifest.json: cannot read the manifest"),
    ("no_shards_key", ValueError, r"manifest.json: malformed manifest: no 'shards' object"),
    ("no_sha256", ValueError, r"manifest.json: malformed manifest: shard entries \['shard_00000.npy'\] lack"),
])
def test_damaged_shard_directories_are_named(shard_dir, damage, error, message):
    shard, manifest_path = shard_dir / "shard_00001.npy", shard_dir / shards.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if damage == "flip":
        _flip_byte(shard, shard.stat().st_size - 5)
    elif damage == "delete":
        (shard_dir / "shard_00002.npy").unlink()
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-40])
    elif damage == "append":
        shard.write_bytes(shard.read_bytes() + b"\0" * 4)
    elif damage == "zero_rows":
        np.save(shard, np.zeros((0, 8), np.float32))
    elif damage == "zero_width":
        np.save(shard, np.zeros((100, 0), np.float32))
    elif damage == "bad_site":
        manifest_path.write_text(json.dumps({**manifest, "site": "res.x"}))
    elif damage == "bad_json":
        manifest_path.write_text(manifest_path.read_text()[:-10])
    elif damage == "no_shards_key":
        manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "shards"}))
    elif damage == "no_sha256":
        del manifest["shards"]["shard_00000.npy"]["sha256"]
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(error, match=message):
        shards.open_shards(shard_dir)


def test_truncated_npy_without_manifest_is_named(tmp_path, make_npy_dir):
    data = make_npy_dir()
    part = data / "part01.npy"
    part.write_bytes(part.read_bytes()[:60])  # inside the header
    with pytest.raises(ValueError, match="part01.npy: cannot read it as an .npy array"):
        train.run(_config(tmp_path / "run", data))


def test_evaluate_names_the_file_and_row_of_nan_activations(tmp_path, shard_dir):
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(8, 16)), "W_dec": rng.normal(size=(16, 8)), "b_enc": np.zeros(16),
              "b_dec": np.zeros(8), "threshold": np.full(16, 0.1)}
    sae = release.write_sae(tmp_path / "release", None, params, 4.0)
    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x[17, 2] = np.nan
    np.save(nan_dir / "a.npy", x)
    with pytest.raises(ValueError, match=r"a.npy: row 17 holds NaN/Inf"):
        releases.evaluate_saes([sae], activations=str(nan_dir))
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        releases.evaluate_saes([sae], activations=str(shard_dir), max_tokens=0)


# --- text, JSONL, configs, SAELens configs -------------------------------------------------------------------------

def test_non_utf8_text_and_bad_jsonl_lines_are_named(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 3"):
        score.main(["--text-file", str(latin1)])  # before the model is loaded
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text"):
        list(TextFiles([str(latin1)]).documents())
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "cut\n[1, 2]\n{"text": 3}\n{"text": "caf\xe9"}\n')
    for line, message in ((2, "not valid JSON"), (3, "expected a JSON object, got a list"),
                          (4, "field 'text' is a int, expected a string"), (5, "not UTF-8 text")):
        lines = jsonl.read_bytes().splitlines(keepends=True)
        one = tmp_path / f"line{line}.jsonl"
        one.write_bytes(lines[0] + lines[line - 1])
        with pytest.raises(ValueError, match=rf"line{line}.jsonl:2: {message}"):
            list(TextFiles([str(one)]).documents())


def test_corpus_builder_range_checks():
    with pytest.raises(ValueError, match=r"heldout_fraction must lie in \[0, 1\).*got 1.5"):
        builder.build_corpus([], "/nonexistent/corpus", heldout_fraction=1.5)
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        builder.build_corpus([], "/nonexistent/corpus", max_tokens=-1)


def test_config_file_without_get_config_is_named(tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("CONFIG = {}\n")
    for overrides in ([], ["--config.seed=1"]):
        result = subprocess.run([sys.executable, "-m", "gemma_scope.train", f"--config={bad}", *overrides],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode != 0
        assert result.stderr.strip() == f"error: --config={bad}: the file defines no get_config() returning an " \
                                         "ml_collections ConfigDict (see experiments/from_activations.py)"


@pytest.mark.parametrize("change, message", [
    ({"architecture": "topk"}, "architecture 'topk'; only 'jumprelu'"),
    ({"d_sae": 32}, "d_sae=32 disagrees with the weights' 16"),
    ({"d_in": 4}, "d_in=4 disagrees with the weights' 8"),
])
def test_saelens_cfg_that_disagrees_with_the_weights_is_named(tmp_path, change, message):
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(8, 16)), "W_dec": rng.normal(size=(16, 8)), "b_enc": np.zeros(16),
              "b_dec": np.zeros(8), "threshold": np.full(16, 0.1)}
    path = release.write_sae(tmp_path, None, params, 4.0)
    cfg_path = path.parent / release.SAELENS_CFG_FILE
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    for name in (release.PARAMS_FILE, release.SAELENS_WEIGHTS_FILE):
        with pytest.raises(ValueError, match=f"{cfg_path}: {message}".replace("[", r"\[").replace("(", r"\(")):
            release.load_params(path.parent / name)


# --- kill -9 at random moments -------------------------------------------------------------------------------------

def _trainer(workdir_path, data) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gemma_scope.train", "--config=experiments/from_activations.py",
         f"--config.data.path={data}", f"--config.workdir={workdir_path}", "--config.sae.width=32",
         "--config.train.steps=120", "--config.train.batch_size=64", "--config.train.checkpoint_every=4",
         "--config.train.keep_checkpoints=2", "--config.train.log_every=5", "--config.train.norm_batches=2",
         "--config.train.lr_warmup_steps=10", "--config.train.l0_warmup_steps=20", "--config.train.eval_batches=2",
         "--config.train.learning_rate=0.001"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bitwise(tmp_path, make_npy_dir):
    data = make_npy_dir()
    reference = _trainer(tmp_path / "straight", data)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    rng = np.random.default_rng(14)
    # Kill points: mid-save (as soon as Orbax's temporary directory appears), then at random moments just after
    # random checkpoints (start-up takes most of a launch, so wall-clock times alone would all land before step 4).
    targets = [None, *sorted(rng.choice(np.arange(8, 117, 4), size=5, replace=False))]
    checkpoints, kills = tmp_path / "killed/checkpoints", []
    for target in targets:
        process = _trainer(tmp_path / "killed", data)
        pattern = "*.orbax-checkpoint-tmp*" if target is None else str(target)
        while process.poll() is None and not list(checkpoints.glob(pattern)):
            time.sleep(0.002)
        time.sleep(0 if target is None else rng.uniform(0.0, 0.3))
        assert process.poll() is None, f"the run ended before the kill after checkpoint {target}"
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills.append(max((int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()), default=0))
    assert len(set(kills)) >= 5, kills  # the kills landed at different points of the run
    final = _trainer(tmp_path / "killed", data)
    assert final.wait(timeout=600) == 0, final.stderr.read()
    straight = _release_bytes(tmp_path / "straight")
    assert straight and _release_bytes(tmp_path / "killed") == straight
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 121, 5))
