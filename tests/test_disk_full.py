"""A full disk: each write that fails for lack of space ends in one line naming the file and the bytes it needed,
the previous checkpoint / release stays intact, and a rerun with space resumes.

The disk is a real one: a 1 MiB tmpfs mounted for the test, which needs root (CAP_SYS_ADMIN); elsewhere these
tests are skipped. NumPy's short write (``N requested and M written``, no errno) is checked by its message."""

import errno
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_reliability import ROOT, _release_bytes
from test_train import _config

from gemma_scope import files, release, train
from gemma_scope.evaluation import latent_site
from gemma_scope.training import checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at ``tmp_path/disk`` and ``fill(leave)``, which fills it up to ``leave`` free bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")

    def fill(leave=0):
        free = shutil.disk_usage(disk).free
        if free > leave:
            (disk / f"filler{len(list(disk.glob('filler*')))}").write_bytes(b"\0" * (free - leave))
        return disk

    try:
        yield fill
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow  # 4 short runs
def test_checkpoint_on_a_full_disk_is_named_the_previous_kept_and_the_rerun_resumes(tmp_path, make_npy_dir,
                                                                                      small_disk, capfd):
    data = make_npy_dir()
    train.run(_config(tmp_path / "straight", data))
    disk = small_disk(leave=1 << 20)
    train.run(_config(disk / "run", data, steps=8))
    small_disk(leave=40_000)  # room for the metrics and config, not for a checkpoint
    capfd.readouterr()
    with pytest.raises(files.NoSpaceError) as full:
        train.run(_config(disk / "run", data))
    message = str(full.value)
    assert message.startswith(f"no space left on the device to write {disk / 'run/checkpoints/12'}: it needs ")
    params_bytes = 2 * 4 * (2 * 16 * 32 + 2 * 32 + 16)  # two SAEs' W_enc, W_dec, b_enc, threshold, b_dec
    assert int(message.split("it needs ")[1].split(" bytes")[0].replace(",", "")) > params_bytes
    assert len(capfd.readouterr().err.splitlines()) < 10  # no Orbax / asyncio tracebacks
    assert checkpoint.verify(disk / "run/checkpoints/8") is None
    # Orbax's abandoned tensorstore writes may re-create the partial step's directory after it was removed (seen in
    # CI); nothing else may be there, and reopening removes it.
    left = sorted(p.name for p in (disk / "run/checkpoints").iterdir())
    assert left[-2:] == ["4", "8"] and all(name.startswith("12.orbax-checkpoint-tmp") for name in left[:-2]), left
    for filler in disk.glob("filler*"):
        filler.unlink()
    shutil.rmtree(disk / "run/release")  # the 8-step run's
    train.run(_config(disk / "run", data))
    assert not list((disk / "run/checkpoints").glob("*orbax-checkpoint-tmp*"))
    assert _release_bytes(disk / "run") == _release_bytes(tmp_path / "straight") != {}


def test_release_and_site_writes_on_a_full_disk_name_the_file_and_keep_the_old_one(small_disk):
    disk = small_disk(leave=1 << 20)
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(16, 1024)).astype(np.float32), "W_dec": np.zeros((1024, 16), np.float32),
              "b_enc": np.zeros(1024, np.float32), "b_dec": np.zeros(16, np.float32),
              "threshold": np.full(1024, 0.1, np.float32)}
    path = release.write_sae(disk, None, params, 4.0)
    before = path.read_bytes()
    small_disk(leave=0)
    with pytest.raises(files.NoSpaceError, match=f"to write {path}: it needs {sum(v.nbytes for v in params.values()):,} "
                                                 "bytes, 0 bytes are free there"):
        release.write_sae(disk, None, {**params, "W_enc": params["W_enc"] + 1}, 4.0)
    assert path.read_bytes() == before and not list(disk.rglob("*.tmp"))
    with pytest.raises(files.NoSpaceError, match=f"to write {disk}/site/data/index.js: it needs 100,000 bytes"):
        (disk / "site/data").mkdir(parents=True)
        latent_site._write(disk / "site/data/index.js", "x" * 100_000)
    with pytest.raises(files.NoSpaceError, match=r"shard_00000.npy: it needs 800,128 bytes"):  # the shards' write
        with files.atomic_path(disk / "shard_00000.npy", 800_128) as tmp, open(tmp, "wb") as f:
            np.save(f, np.zeros(100_000))


def test_short_writes_and_wrapped_errors_count_as_a_full_disk(tmp_path):
    assert files.is_no_space(OSError("4096 requested and 0 written"))  # NumPy's tofile
    assert files.is_no_space(ValueError('RESOURCE_EXHAUSTED: Failed writing: "x": No space left on device'))
    wrapped = RuntimeError("background save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert files.is_no_space(wrapped) and not files.is_no_space(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(files.NoSpaceError, match=f"to write {tmp_path / 'a.npy'}: it needs 12 bytes"):
        with files.space_for(tmp_path / "a.npy", 12):
            raise OSError("12 requested and 3 written")


@pytest.mark.slow  # a launch of the trainer
def test_the_trainer_on_a_full_disk_prints_one_line_and_exits_74(tmp_path, make_npy_dir, small_disk):
    data = make_npy_dir()
    disk = small_disk(leave=40_000)  # the first checkpoint fails (in Orbax's threads), then the metrics
    result = subprocess.run(
        [sys.executable, "-m", "gemma_scope.train", "--config=experiments/from_activations.py",
         f"--config.data.path={data}", f"--config.workdir={disk / 'run'}", "--config.sae.width=32",
         "--config.train.steps=8", "--config.train.checkpoint_every=4", "--config.train.batch_size=64",
         "--config.train.norm_batches=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == files.NoSpaceError.exit_status, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: no space left on the device to write {pathlib.Path(disk, 'run')}/"), result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
