"""The trainer: sharded == single device, resume == uninterrupted, clear errors, the from_activations CLI."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import f32_tol

from benchmarks.sae_step import build_benchmark_step
from gemma_scope import activations, release, sae, train
from gemma_scope import mesh as mesh_lib
from gemma_scope.training import normalisation as normalisation_lib
from gemma_scope.training import settings
from gemma_scope.training import step as step_lib
from gemma_scope.training.grid import Grid, Stack

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("from_activations", ROOT / "experiments/from_activations.py")
from_activations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(from_activations)


def _config(workdir, data_path, **train_overrides):
    config = from_activations.get_config()
    config.workdir = str(workdir)
    config.data.path = str(data_path)
    config.sae.width = 32
    config.sae.l0_coefficient = (1e-3, 1e-2)
    config.train.update(dict(steps=12, batch_size=64, learning_rate=1e-3, lr_warmup_steps=4, l0_warmup_steps=6,
                             checkpoint_every=4, keep_checkpoints=2, log_every=3, norm_batches=2, eval_batches=2))
    config.train.update(train_overrides)
    return config


def _sharded_equals_single_device(grid, batches, scales, hp):
    """Runs the step on one device and on 8 (data 8 × model 1, data 2 × model 4); returns the single-device state
    after asserting every sharded state and metric equals it."""

    def run(mesh):
        state = step_lib.init_state(jax.random.key(0), grid, hp, mesh, scales)
        fn = step_lib.make_train_step(grid, hp, mesh)
        for b in batches:
            state, metrics = fn(state, b)
        return jax.device_get(state), jax.device_get(metrics)

    single, single_metrics = run(mesh_lib.make_mesh(devices=jax.devices()[:1]))
    assert len(jax.devices()) == 8
    # Sharded sums add the batch and latents in other orders. Adam's step η·g/√v̂ is per coordinate, so where a
    # gradient coordinate's terms cancel, its relative float32 error reaches the params at full size relative to η:
    # measured ≤ 2.3e-4·η after 3 steps (AVX-512; 6e-5·η with SSE4.2); 1e-2·η leaves room for other orders and stays
    # far below the η-sized differences of a wrong reduction. The metrics are sums over d, the width and the batch.
    atol = 1e-2 * hp.learning_rate
    for data, model in ((8, 1), (2, 4)):
        mesh = mesh_lib.make_mesh(data, model)
        sharded, metrics = run(mesh)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol), single, sharded)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=f32_tol(3 * 16 + 64 + 64), atol=1e-6),
                     single_metrics, metrics)
    assert single["step"] == len(batches)
    return single


def test_sharded_step_equals_single_device():
    grid = {"d16": Stack(sites=("res.0", "res.1"), d_model=16, width=64, l0_coefficients=(1e-3, 3e-2)),
            "d8": Stack(sites=("att.0",), d_model=8, width=64, l0_coefficients=(1e-3, 3e-2))}
    hp = step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=2, l0_warmup_steps=2)
    rng = np.random.default_rng(0)
    batches = [{"d16": rng.normal(size=(2, 64, 16)).astype(np.float32),
                "d8": rng.normal(size=(1, 64, 8)).astype(np.float32)} for _ in range(3)]
    scales = {"d16": rng.uniform(0.5, 2.0, size=(2, 16)).astype(np.float32), "d8": np.full((1, 8), 0.5, np.float32)}
    single = _sharded_equals_single_device(grid, batches, scales, hp)
    assert not np.array_equal(single["params"]["d16"]["b_dec"], 0)
    np.testing.assert_allclose(np.linalg.norm(single["params"]["d16"]["W_dec"], axis=-1), 1.0, rtol=1e-5)


def test_sharded_transcoder_grid_equals_single_device():
    """SAEs and transcoders with and without the affine skip in one grid, one batch each step."""
    tc = ("mlp_in.0", "mlp_in.1")
    grid = {"d16": Stack(sites=("res.0",), d_model=16, width=64, l0_coefficients=(1e-3, 3e-2)),
            "tc_d16": Stack(sites=tc, d_model=16, width=64, l0_coefficients=(1e-3, 3e-2), transcoder=True),
            "tc_skip_d16": Stack(sites=tc, d_model=16, width=64, l0_coefficients=(1e-3,), transcoder=True, skip=True)}
    hp = step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=2, l0_warmup_steps=2)
    rng = np.random.default_rng(1)

    def pair():
        x = rng.normal(size=(2, 64, 16)).astype(np.float32)
        return x, (np.tanh(x) * 3 + rng.normal(size=x.shape) * 0.1).astype(np.float32)

    batches = []
    for _ in range(3):
        x, y = pair()
        batches.append({"d16": x[:1], "tc_d16": (x, y), "tc_skip_d16": (x, y)})
    per_dim = np.array([[1.5, 3.0], [2.0, 0.5]], np.float32)[..., None] * rng.uniform(0.5, 2.0, size=16)
    scales = {"d16": np.full((1, 16), 1.5, np.float32), "tc_d16": per_dim.astype(np.float32),
              "tc_skip_d16": per_dim.astype(np.float32)}
    single = _sharded_equals_single_device(grid, batches, scales, hp)
    params = single["params"]
    assert "W_skip" not in params["tc_d16"] and params["tc_skip_d16"]["W_skip"].shape == (2, 16, 16)
    assert np.abs(params["tc_skip_d16"]["W_skip"]).max() > 1e-3  # trained away from its zero init
    np.testing.assert_allclose(np.linalg.norm(params["tc_skip_d16"]["W_dec"], axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="transcoder stacks only"):
        Stack(sites=("res.0",), d_model=16, width=64, l0_coefficients=(1e-3,), skip=True)


def test_latent_axis_is_sharded_on_the_model_axis():
    grid = {"g": Stack(sites=("res.0",), d_model=16, width=64, l0_coefficients=(1e-3,))}
    state = step_lib.init_state(jax.random.key(0), grid, step_lib.Hyperparams(), mesh_lib.make_mesh(2, 4))
    w_enc = state["params"]["g"]["W_enc"]
    assert {s.data.shape for s in w_enc.addressable_shards} == {(1, 16, 16)}  # M=64 split over 4 model devices
    assert {s.data.shape for s in state["params"]["g"]["b_dec"].addressable_shards} == {(1, 16)}


class _Interrupted(activations.NpyShardSource):
    """Dies (like a killed process) when asked for batch ``die_at``."""

    die_at = 10

    def batches(self, batch_size, start=0, mesh=None, stop=None):
        for number, batch in enumerate(super().batches(batch_size, start, mesh, stop), start):
            if number == self.die_at:
                raise KeyboardInterrupt
            yield batch


def _release_files(workdir):
    return sorted(pathlib.Path(workdir, "release").rglob("params.npz"))


def test_resume_after_interruption_equals_uninterrupted(tmp_path, make_npy_dir):
    data = make_npy_dir()
    straight = train.run(_config(tmp_path / "straight", data))
    config = _config(tmp_path / "resumed", data)
    with pytest.raises(KeyboardInterrupt):
        train.run(config, source=_Interrupted(str(data)))
    assert sorted(p.name for p in (tmp_path / "resumed/checkpoints").iterdir()) == ["4", "8"]
    resumed = train.run(config)
    assert [p.relative_to(tmp_path / "straight") for p in straight] == \
           [p.relative_to(tmp_path / "resumed") for p in resumed]
    for a, b in zip(straight, resumed):
        pa, pb = release.load_params(a), release.load_params(b)
        for key in pa:
            np.testing.assert_array_equal(pa[key], pb[key])
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 3, 6, 6, 9, 9, 12, 12]  # two SAEs per log step; no duplicates from the lost steps
    assert sorted(p.name for p in (tmp_path / "resumed/checkpoints").iterdir()) == ["12", "8"]  # keep last 2


def test_release_is_folded_and_measures_average_l0(tmp_path, make_npy_dir):
    data = make_npy_dir()
    config = _config(tmp_path / "run", data, steps=4, log_every=2)
    config.sae.l0_coefficient = (1e-3,)
    (path,) = train.run(config)
    assert "custom/layer_0/width_32/average_l0_" in str(path)
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert set(record) >= {"loss", "mse", "fvu", "l0", "dead_fraction", "lambda_now", "learning_rate", "tokens_per_s"}
    params = release.load_params(path)
    x = np.concatenate([np.load(f) for f in sorted(data.glob("*.npy"))])
    pre = x @ params["W_enc"] + params["b_enc"]
    l0 = ((pre > params["threshold"]) & (pre > 0)).sum(axis=1).mean()
    assert abs(l0 - int(path.parent.name.split("_")[-1])) <= 3  # the release name is the measured L0
    assert 4.0 < np.mean(np.linalg.norm(x, axis=1)) / np.sqrt(16) < 6.0  # raw inputs ~5 per dim
    assert np.median(params["threshold"]) > 0.004  # θ' = C·θ, C ≈ 20, θ ≈ 0.001


def test_nonfinite_loss_names_the_step_and_keeps_good_checkpoint(tmp_path, make_npy_dir):
    data = make_npy_dir()
    config = _config(tmp_path / "run", data, learning_rate=1e30, lr_warmup_steps=0)
    with pytest.raises(train.NonFiniteError, match=r"at step \d+") as err:
        train.run(config)
    assert "last good checkpoint" in str(err.value) or "no checkpoint" in str(err.value)
    assert not _release_files(tmp_path / "run")


def test_nonfinite_activations_are_rejected(tmp_path, make_npy_dir):
    data = make_npy_dir(rows=(64 * 3,))
    array = np.load(data / "part00.npy")
    array[5, 3] = np.nan
    np.save(data / "part00.npy", array)
    with pytest.raises(ValueError, match="non-finite values in batch"):
        train.run(_config(tmp_path / "run", data, norm_batches=1))


def test_a_default_lambda_is_recorded_as_its_value_so_a_resume_compares_values(tmp_path, make_npy_dir):
    data = make_npy_dir()
    config = _config(tmp_path / "run", data, steps=4)
    config.sae.l0_coefficient = None  # not given: λ·L0's default
    train.run(config)
    assert json.loads((tmp_path / "run/config.json").read_text())["sae"]["l0_coefficient"] == [1e-3]
    resumed = _config(tmp_path / "run", data, steps=8)
    resumed.sae.l0_coefficient = (1e-3,)  # the same λ, now given explicitly: the same run, resumed
    train.run(resumed)
    assert json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])["step"] == 8


@pytest.mark.parametrize("field, value, message", [
    ("sae.width", 0, "sae.width must be a positive integer"),
    ("sae.l0_coefficient", (-1.0,), "sae.l0_coefficient"),
    ("sae.dtype", "float16", "sae.dtype must be one of"),
    ("train.batch_size", 60, "divisible by the mesh's data size"),
    ("mesh.model", "3", "positive divisor of the device count 8"),
    ("mesh.model", "three", "mesh.model must be a positive integer or 'auto'"),
    ("data.path", "", "needs data.path"),
    ("data.site", "resid.3", "unknown site kind"),
])
def test_bad_configs_give_clear_errors(tmp_path, field, value, message, make_npy_dir):
    config = _config(tmp_path / "run", make_npy_dir())
    section, key = field.split(".")
    with config.unlocked():
        config[section][key] = value
    with pytest.raises(ValueError, match=message):
        train.run(config)


def test_width_must_split_over_the_model_axis(tmp_path, make_npy_dir):
    config = _config(tmp_path / "run", make_npy_dir())
    config.sae.width, config.mesh.model = 36, "8"
    with pytest.raises(ValueError, match="sae.width=36 must be divisible by the mesh's model size 8"):
        train.run(config)


def test_bad_data_dir_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        activations.NpyShardSource(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    np.save(tmp_path / "bad/a.npy", np.zeros((4, 3), np.float64))
    with pytest.raises(ValueError, match="float32"):
        activations.NpyShardSource(str(tmp_path / "bad"))


def test_npy_source_is_a_pure_function_of_batch_number_and_shuffles_blocks_on_the_devices(tmp_path, make_npy_dir):
    data = make_npy_dir(rows=(50, 30), d=4)
    everything = np.concatenate([np.load(f) for f in sorted(data.glob("*.npy"))])
    row_of = {tuple(r): i for i, r in enumerate(everything)}
    # Blocks of 32 rows ([0, 32), [32, 50) of file 0; file 1), one per buffer: 2 + 1 + 1 batches of 16 an epoch.
    source = activations.NpyShardSource(str(data), seed=3, buffer_rows=32)
    first = [np.asarray(b["d4"][0]) for _, b in zip(range(6), source.batches(16))]
    later = [np.asarray(b["d4"][0]) for _, b in
             zip(range(2), activations.NpyShardSource(str(data), seed=3, buffer_rows=32).batches(16, 4))]
    np.testing.assert_array_equal(first[4], later[0])
    np.testing.assert_array_equal(first[5], later[1])
    epoch = [[row_of[tuple(r)] for r in batch] for batch in first[:4]]
    assert len(set(sum(epoch, []))) == 64  # no row twice in an epoch
    blocks = {(0, 32): range(0, 32), (32, 50): range(32, 50), (50, 80): range(50, 80)}
    for batch in epoch:  # each batch from one block (one buffer), rows shuffled within it
        assert sum(set(batch) <= set(rows) for rows in blocks.values()) == 1
    assert epoch[0] != sorted(epoch[0])
    # On 2 devices each one shuffles its half of the buffer: the first half of every batch comes from slot 0.
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:2])
    two = [np.asarray(b["d4"][0]) for _, b in zip(range(4), source.batches(16, 0, mesh))]
    for batch in two:
        rows = [row_of[tuple(r)] for r in batch]
        block = next(r for r in blocks.values() if set(rows) <= set(r))
        half = block[0] + len(block) // 2
        assert all(r < half for r in rows[:8]) and all(r >= half for r in rows[8:])
    with pytest.raises(ValueError, match="raise data.buffer_rows"):
        next(activations.NpyShardSource(str(data), buffer_rows=8).batches(16))


def test_unknown_override_key_is_named(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gemma_scope.train", "--config=experiments/from_activations.py",
                             "--config.train.stpes=3"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "unknown config key 'stpes' under 'config.train'" in result.stderr


def test_benchmark_step_runs_the_real_step_on_a_sharded_mesh():
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    results = []
    for mesh in (mesh_lib.make_mesh(devices=jax.devices()[:1]), mesh_lib.make_mesh(4, 2)):
        state, step_fn = build_benchmark_step(16, 64, 64, "bfloat16", n_saes=3, mesh=mesh)
        before = np.asarray(state["params"]["bench"]["W_enc"])
        state = step_fn(step_fn(state, x), x)
        results.append(jax.device_get(state["params"]["bench"]))
        assert int(state["step"]) == 2 and not np.allclose(results[-1]["W_enc"], before)
        np.testing.assert_allclose(np.linalg.norm(results[-1]["W_dec"], axis=-1), 1.0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *results)


class _MlpSource:
    """A stand-in model source: sites res.0, mlp_in.0 and mlp.0 with mlp = x @ A + relu(x) @ B (a mostly linear
    map, as an affine skip can fit), batch ``b`` a pure function of b, placed on the mesh like ModelSource's."""

    num_layers = 1
    sites = ["mlp.0", "mlp_in.0", "res.0"]
    d_in = {site: 16 for site in sites}
    groups = activations.group_sites(sites, d_in)

    @staticmethod
    def host_batch(batch_size, number):
        rng = np.random.default_rng(0)
        a, b = rng.normal(size=(16, 16)) * 0.5, rng.normal(size=(16, 16)) * 0.2
        x = np.random.default_rng(number + 1).normal(size=(batch_size, 16))
        return {"mlp_in.0": (3 * x).astype(np.float32), "mlp.0": (x @ a + np.maximum(x, 0) @ b).astype(np.float32),
                "res.0": (x[:, ::-1] + 1).astype(np.float32)}

    def batches(self, batch_size, start=0, mesh=None, stop=None):
        sharding = mesh_lib.batch_sharding(mesh or mesh_lib.single_device_mesh())
        for number in range(start, 2**62 if stop is None else stop):
            batch = self.host_batch(batch_size, number)
            yield {"d16": jax.device_put(np.stack([batch[s] for s in self.sites]), sharding)}

    def check_finite(self):
        pass


def test_grid_batches_and_constants_are_gathered_from_the_source_groups():
    """SAE stacks and a transcoder's (mlp_in.L, mlp.L) pair are the source's rows, gathered on the mesh; a
    transcoder's constants are (C of mlp_in.L, C of mlp.L) and its b_dec that of mlp.L."""
    source_groups = {"d4": ["res.0", "mlp_in.1", "res.1", "mlp.1"], "d8": ["x"]}
    grid = Grid({"d4": Stack(("res.1", "res.0"), 4, 8, (1e-3,)), "tc_d4": Stack(("mlp_in.1",), 4, 8, (1e-3,),
                                                                              transcoder=True),
                 "d8": Stack(("x",), 8, 8, (1e-3,))}, source_groups)
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:2])
    rng = np.random.default_rng(0)
    host = {"d4": rng.normal(size=(4, 6, 4)).astype(np.float32), "d8": rng.normal(size=(1, 6, 8)).astype(np.float32)}
    batch = {g: jax.device_put(x, mesh_lib.batch_sharding(mesh)) for g, x in host.items()}
    out = grid.batches(mesh)(batch)
    np.testing.assert_array_equal(out["d4"], host["d4"][[2, 0]])
    np.testing.assert_array_equal(out["tc_d4"][0], host["d4"][[1]])
    np.testing.assert_array_equal(out["tc_d4"][1], host["d4"][[3]])
    assert out["d8"] is batch["d8"]  # a whole source group is passed through, not copied
    assert out["tc_d4"][1].sharding == mesh_lib.batch_sharding(mesh)
    scales = {"d4": np.array([1.0, 2.0, 3.0, 4.0], np.float32)[:, None] * np.arange(1, 5, dtype=np.float32),
              "d8": np.full((1, 8), 5.0, np.float32)}
    b_dec = {g: np.arange(len(c))[:, None] * np.ones(int(g[1:]), np.float32) for g, c in scales.items()}
    grid_scales, grid_b_dec = grid.constants(scales, b_dec)
    np.testing.assert_array_equal(grid_scales["d4"], scales["d4"][[2, 0]])
    np.testing.assert_array_equal(grid_scales["tc_d4"], scales["d4"][None, [1, 3]])  # [n_sites, (in, out), d]
    np.testing.assert_array_equal(grid_b_dec["d4"][:, 0], [2, 0])
    np.testing.assert_array_equal(grid_b_dec["tc_d4"][:, 0], [3])
    np.testing.assert_array_equal(grid_scales["d8"], scales["d8"])


def test_transcoders_train_beside_saes_and_release_in_both_layouts(tmp_path):
    config = _config(tmp_path / "run", tmp_path, steps=200, log_every=50, checkpoint_every=200, l0_warmup_steps=10,
                     learning_rate=3e-3, eval_batches=4)
    config.data.source, config.data.sites, config.data.model = "model", "res.0", "stand-in"
    config.transcoder.layers, config.transcoder.skip = "0", (False, True)
    config.sae.l0_coefficient = (1e-3,)
    paths = train.run(config, source=_MlpSource())
    root = tmp_path / "run"
    gs2 = sorted(str(p.parent.relative_to(root / "release_gs2")) for p in (root / "release_gs2").rglob("config.json"))
    assert [p.split("/")[0] for p in gs2] == ["resid_post_all", "transcoder_all", "transcoder_all"]
    assert gs2[2].endswith("_affine") and not gs2[1].endswith("_affine")
    for name in gs2:  # GS2's l0 and bucket say which text they come from (our key beside GS2's)
        gs2_config = json.loads((root / "release_gs2" / name / "config.json").read_text())
        assert gs2_config["model_name"] == "stand-in"  # not one of our registry names: written as given
        assert gs2_config["l0_measured_on"] == (f"train split: 4 batches x {config.train.batch_size} activations of "
                                                "the training stream after the last step")
    assert [p.suffix for p in paths] == [".npz", ".safetensors", ".safetensors"]
    assert release.sae_info(paths[1]) == {"site": "mlp_in.0", "site_out": "mlp.0", "l0_coefficient": None,
        "target_l0": None}
    labels = {json.loads(line)["site"] for line in (root / "metrics.jsonl").read_text().splitlines()}
    assert labels == {"res.0", "mlp_in.0→mlp.0", "mlp_in.0→mlp.0 +skip"}
    # The released transcoders work on raw activations; the affine one fits the mostly linear map better.
    batch = _MlpSource.host_batch(2048, 1000)
    x, y = batch["mlp_in.0"], batch["mlp.0"]
    fvu = {}
    for path in paths[1:]:
        params = release.load_params(path)
        fvu["W_skip" in params] = np.sum((np.asarray(sae.predict(params, x)) - y) ** 2) / np.sum((y - y.mean(0)) ** 2)
    assert fvu[True] < fvu[False] < 0.9, fvu
    with pytest.raises(ValueError, match="transcoder.layers='0' needs data.source='model'"):
        config.data.source = "npy"
        train.run(config, source=_MlpSource())


@pytest.mark.parametrize("b_dec_init,normalisation", [("zero", "scalar"), ("mean", "scalar"),
                                                      ("geometric_median", "scalar"), ("mean", "per_dimension")])
def test_b_dec_is_estimated_with_the_normalisation_constant(tmp_path, b_dec_init, normalisation):
    """C is √E||x||² (scalar) or σ_j·√d per dimension; b_dec starts at 0, the mean or the geometric median of the
    norm batches, in normalised units (÷ C); the release reconstructs raw activations either way."""
    rng = np.random.default_rng(3)
    path = tmp_path / "acts"
    path.mkdir()
    spread = np.geomspace(0.1, 30.0, 16)  # dimensions of very different scales, as in a residual stream
    x = (rng.normal(size=(512, 16)) * spread + np.arange(16) * 2.0).astype(np.float32)  # a mean far from 0
    np.save(path / "part00.npy", x)
    source = activations.NpyShardSource(str(path))
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:2])
    scales, b_dec = normalisation_lib.normalisation_constants(source, mesh, 128, 4, b_dec_init, normalisation)
    x64 = x.astype(np.float64)  # 4 × 128 rows: every row once
    c = (np.full(16, np.sqrt(np.mean(np.sum(x64**2, axis=1)))) if normalisation == "scalar"
         else x64.std(axis=0) * np.sqrt(16))
    # E u_j² and (E u_j)² ≤ E u_j² of u = x − (the first batch's mean) come from float32 means of 128 rows added over
    # 4 batches; their difference, the variance, is smaller by their ratio (about 1 here: the shift is near the mean;
    # 1 for the scalar C, which does not cancel); C is its square root, so its relative error is half the variance's.
    (first,) = source.batches(128, 0, mesh, stop=1)
    shift = np.asarray(first["d16"][0], np.float64).mean(axis=0)
    cancellation = 1.0 if normalisation == "scalar" else np.max(np.mean((x64 - shift)**2, axis=0) / x64.var(axis=0))
    rtol = f32_tol(128 + 4, 3 * cancellation) / 2
    np.testing.assert_allclose(scales["d16"], [c], rtol=rtol)
    expected = {"zero": np.zeros(16), "mean": x.mean(axis=0) / c,
                "geometric_median": np.asarray(normalisation_lib.geometric_median(x)) / c}[b_dec_init]
    # and the mean (or each Weiszfeld step's weighted mean) sums over the 512 rows
    np.testing.assert_allclose(b_dec["d16"][0], expected, rtol=rtol,
                               atol=f32_tol(len(x), np.max(np.abs(x64).mean(axis=0) / c)))
    config = _config(tmp_path / "run", path, steps=1, norm_batches=4, batch_size=128)
    config.sae.update(b_dec_init=b_dec_init, normalisation=normalisation, l0_coefficient=(1e-3,))
    config.train.learning_rate = 1e-12  # the one step leaves b_dec where it started
    (released,) = train.run(config)
    np.testing.assert_allclose(release.load_params(released)["b_dec"], c * expected, rtol=1e-4, atol=1e-4)
    metadata = json.loads((released.parent / "cfg.json").read_text())["metadata"]
    assert metadata["normalisation"] == normalisation
    assert ("normalisation_constant" in metadata) == (normalisation == "scalar")


def test_target_l0_sweep_trains_as_one_grid_and_records_its_recipe(tmp_path, make_npy_dir):
    config = _config(tmp_path / "run", make_npy_dir(), steps=6, log_every=3)
    config.sae.l0_coefficient = (0.5,)
    config.sae.update(sparsity_loss="target_l0", target_l0=(4.0, 12.0), b_dec_init="mean", frequency_coefficient=0.1,
                      matryoshka_prefixes=(8, 16))
    assert settings.sweep_of(config) == ((0.5, 0.5), (4.0, 12.0))
    paths = train.run(config)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["target_l0"] for r in records] == [4.0, 12.0, 4.0, 12.0]
    metas = [json.loads((p.parent / "cfg.json").read_text())["metadata"] for p in paths]
    assert metas  # (6 steps may leave both at one rounded L0: then one is released)
    for meta in metas:
        assert meta["target_l0"] in (4.0, 12.0)
        assert meta["sparsity_loss"] == "target_l0" and meta["b_dec_init"] == "mean"
        assert meta["l0_coefficient"] == 0.5 and meta["frequency_coefficient"] == 0.1
        assert meta["matryoshka_prefixes"] == [8, 16] and meta["average_l0"] >= 0
        assert meta["average_l0_measured_on"] == (f"train split: {config.train.eval_batches} batches x "
                                                  f"{config.train.batch_size} activations of the training stream "
                                                  "after the last step")
        assert meta["model_name"] is None and meta["context_size"] is None  # .npy files without a manifest


@pytest.mark.parametrize("field, value, message", [
    ("sparsity_loss", "l1", "sae.sparsity_loss must be one of"),
    ("b_dec_init", "median", "sae.b_dec_init must be one of"),
    ("target_l0", (0.0,), "sae.target_l0 must be a number > 0"),
    ("l0_coefficient", (0.1, 0.2, 0.3), "one value or one per target L0"),
    ("matryoshka_prefixes", (16, 8), "strictly increasing"),
    ("frequency_threshold", 0.0, "frequency_threshold in"),
])
def test_bad_recipe_configs_give_clear_errors(tmp_path, make_npy_dir, field, value, message):
    config = _config(tmp_path / "run", make_npy_dir())
    config.sae.sparsity_loss = "target_l0"
    config.sae.target_l0 = (4.0, 8.0)
    with config.unlocked():
        config.sae[field] = value
    with pytest.raises(ValueError, match=message):
        train.run(config)


def test_summary_shows_the_target_l0_and_the_loss_recovered():
    record = {"site": "res.8", "l0_coefficient": 0.1, "target_l0": 100.0, "width": 2048, "l0": 98.2, "fvu": 0.031,
              "delta_lm_loss": 1.0, "clean_loss": 3.0, "zero_ablation_loss": 13.0}
    row = train.summary([record], 409_600).splitlines()[-1].split()
    assert row == ["res.8", "0.1", "100", "2048", "98.2", "0.031", "1.0000", "10.000", "90.0%"]
    unknown = record | {"site": "mlp_in.3→mlp.3", "l0_coefficient": None, "target_l0": None}  # e.g. GS2 transcoders
    assert train.summary([unknown], 409_600).splitlines()[-1].split()[1:3] == ["—", "—"]
