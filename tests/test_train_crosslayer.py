"""CLTs and crosscoders in the trainer: sharded == single device, resume == uninterrupted, the Gemma Scope 2
release read back, clear config errors."""

import json
import pathlib

import jax
import numpy as np
import pytest
from test_train import _config, _sharded_equals_single_device

from gemma_scope import activations, train
from gemma_scope import mesh as mesh_lib
from gemma_scope.release import gs2_crosslayer
from gemma_scope.sae import crosslayer
from gemma_scope.training import settings
from gemma_scope.training import step as step_lib
from gemma_scope.training.grid import Stack

D, LAYERS = 8, 3


def test_sharded_crosslayer_grid_equals_single_device():
    """Two CLTs (two λ), one with the skip, and a crosscoder in one step, on one device and on 8 (data 8 × model 1,
    data 2 × model 4: F split over 'model')."""
    tc = tuple(f"mlp_in.{i}" for i in range(LAYERS))
    grid = {"clt_d8": Stack(tc, D, 64, (1e-3, 3e-2), transcoder=True, crosslayer="clt"),
            "clt_skip_d8": Stack(tc, D, 64, (1e-3,), transcoder=True, skip=True, crosslayer="clt"),
            "xc_d8": Stack(("res.0", "res.2"), D, 64, (1e-3,), crosslayer="crosscoder")}
    hp = step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=2, l0_warmup_steps=2)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(3):
        x = rng.normal(size=(LAYERS, 64, D)).astype(np.float32)
        y = (np.tanh(np.cumsum(x, axis=0)) + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
        batches.append({"clt_d8": (x, y), "clt_skip_d8": (x, y), "xc_d8": x[[0, 2]] + 1})
    per_dim = rng.uniform(0.5, 2.0, size=(LAYERS, 2, D)).astype(np.float32)
    scales = {"clt_d8": per_dim, "clt_skip_d8": per_dim,
              "xc_d8": per_dim[[0, 2], 0]}
    single = _sharded_equals_single_device(grid, batches, scales, hp)
    w_dec = single["params"]["clt_d8"]["W_dec"]
    assert w_dec.shape == (2, LAYERS, 64, LAYERS, D) and np.all(w_dec[:, 2, :, :2] == 0)  # causal slots stay zero
    np.testing.assert_allclose(np.linalg.norm(w_dec.reshape(2, LAYERS, 64, -1), axis=-1), 1.0, rtol=1e-5)
    assert np.abs(single["params"]["clt_skip_d8"]["W_skip"]).max() > 1e-3
    state = step_lib.init_state(jax.random.key(0), grid, hp, mesh_lib.make_mesh(2, 4))
    assert {s.data.shape for s in state["params"]["clt_d8"]["W_dec"].addressable_shards} == {(2, 3, 16, 3, D)}
    assert {s.data.shape for s in state["last_fired"]["clt_d8"].addressable_shards} == {(2, 3, 16)}


class _LayersSource:
    """A stand-in model source of LAYERS layers (res, mlp_in, mlp), where mlp.L depends on mlp_in of L and of the
    layer before (a cross-layer map); batch ``b`` a pure function of b."""

    num_layers = LAYERS
    sites = [f"{k}.{i}" for i in range(LAYERS) for k in ("mlp", "mlp_in", "res")]
    d_in = {site: D for site in sites}
    groups = activations.group_sites(sites, d_in)
    die_at = None

    @staticmethod
    def host_batch(batch_size, number):
        a = np.random.default_rng(0).normal(size=(LAYERS, D, D)) * 0.5
        x = np.random.default_rng(number + 1).normal(size=(LAYERS, batch_size, D)) * 2
        out = {}
        for i in range(LAYERS):
            out[f"mlp_in.{i}"], out[f"res.{i}"] = x[i], x[i][:, ::-1] + 1
            out[f"mlp.{i}"] = np.maximum(x[i], 0) @ a[i] + (np.maximum(x[i - 1], 0) if i else 0)
        return {k: v.astype(np.float32) for k, v in out.items()}

    def batches(self, batch_size, start=0, mesh=None, stop=None):
        sharding = mesh_lib.batch_sharding(mesh or mesh_lib.single_device_mesh())
        for number in range(start, 2**62 if stop is None else stop):
            if number == self.die_at:
                raise KeyboardInterrupt
            batch = self.host_batch(batch_size, number)
            yield {"d8": jax.device_put(np.stack([batch[s] for s in self.sites]), sharding)}

    def check_finite(self):
        pass


def _crosslayer_config(workdir):
    config = _config(workdir, workdir, learning_rate=3e-3)
    config.data.source, config.data.sites, config.data.model = "model", "", "stand-in"
    config.sae.sparsity_loss, config.sae.target_l0, config.sae.l0_coefficient = "target_l0", (2.0, 4.0), (1.0,)
    config.clt.layers, config.clt.skip, config.clt.width = "*", (False, True), 16
    config.crosscoder.layers, config.crosscoder.width = "0,2", 24
    config.sae.b_dec_init = "mean"
    return config


def test_clts_and_crosscoder_resume_exactly_and_release_in_gs2_layout(tmp_path):
    straight = train.run(_crosslayer_config(tmp_path / "straight"), source=_LayersSource())
    config = _crosslayer_config(tmp_path / "resumed")
    interrupted = _LayersSource()
    interrupted.die_at = 10
    with pytest.raises(KeyboardInterrupt):
        train.run(config, source=interrupted)
    resumed = train.run(config, source=_LayersSource())
    names = [str(p.relative_to(tmp_path / "straight")) for p in straight]
    assert names == [str(p.relative_to(tmp_path / "resumed")) for p in resumed]
    assert [n.rsplit("_l0_", 1)[0] for n in names] == ["release_gs2/clt/width_48"] * 4 + [
        "release_gs2/crosscoder/layer_0_2_width_24"] * 2
    assert sum(n.endswith("_affine") for n in names) == 2
    for a, b in zip(straight, resumed):
        for file in sorted(a.iterdir()):
            assert file.read_bytes() == (b / file.name).read_bytes(), file
    records = [json.loads(line) for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [s for s in (3, 6, 9, 12) for _ in range(6)]
    assert {r["site"] for r in records} == {"clt.0-2", "clt.0-2 +skip", "crosscoder.res.0,2"}
    assert all(len(r["fvu_layers"]) == (2 if r["site"].startswith("crosscoder") else 3) for r in records)
    # Read back: the release's L0 is what its own params give on the batches after training (fold, writer and
    # reader agree; the fold itself is tested in test_crosslayer_train.py).
    eval_batches = [_LayersSource.host_batch(64, n) for n in (12, 13)]
    for path in straight:
        params, info = gs2_crosslayer.read_crosslayer(path, n_layers=LAYERS)
        if info["kind"] == "clt":
            x = np.stack([[b[f"mlp_in.{i}"] for i in range(LAYERS)] for b in eval_batches])
            l0 = np.mean([np.mean(np.sum(np.asarray(crosslayer.clt_encode(params, xb)) > 0, -1), -1) for xb in x], 0)
            np.testing.assert_allclose(info["average_l0"], l0, rtol=1e-6)
            assert info["affine"] == path.name.endswith("_affine") and info["layers"] == [0, 1, 2]
        else:
            x = np.stack([[b[f"res.{i}"] for i in (0, 2)] for b in eval_batches])
            l0 = np.mean([np.mean(np.sum(np.asarray(crosslayer.crosscoder_encode(params, xb)) > 0, -1)) for xb in x])
            np.testing.assert_allclose(info["config"]["average_l0"], l0, rtol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("clt.l0", "mean", "clt.l0 must be one of ('per_layer', 'total'), got 'mean'"),
    ("clt.width", 0, "clt.width must be a positive integer (latents per layer) or None (sae.width), got 0"),
    ("clt.skip", (True, True), "clt.skip must be (False,), (True,) or (False, True), got (True, True)"),
    ("crosscoder.width", -3, "crosscoder.width must be a positive integer (latents) or None (sae.width), got -3"),
])
def test_bad_crosslayer_configs_give_one_clear_line(tmp_path, field, value, message):
    config = _crosslayer_config(tmp_path)
    block, key = field.split(".")
    config[block][key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings.validate_config(config)


def test_crosslayer_needs_a_model_source_and_no_matryoshka(tmp_path):
    config = _crosslayer_config(tmp_path)
    config.sae.matryoshka_prefixes = (4,)
    with pytest.raises(ValueError, match=r"clt.layers='\*' cannot train with sae.matryoshka_prefixes=\(4,\)"):
        settings.validate_config(config)
    config.sae.matryoshka_prefixes, config.data.source = (), "npy"
    with pytest.raises(ValueError, match="clt.layers='\\*' needs data.source='model'"):
        settings.validate_config(config)
    assert pathlib.Path(config.workdir) == tmp_path


def test_clt_learns_a_planted_cross_layer_map_that_per_layer_transcoders_cannot():
    """mlp.1 is written by sparse codes read at mlp_in.0 only (mlp_in.1 is independent noise): the CLT's layer-0
    latents learn to write to layer 1, the per-layer transcoder of layer 1 cannot, both trained in one step."""
    rng = np.random.default_rng(0)
    n_true, d, batch, steps = 16, 8, 256, 400
    read, write0, write1 = (rng.normal(size=(n_true, d)) for _ in range(3))
    read, write0, write1 = (w / np.linalg.norm(w, axis=1, keepdims=True) for w in (read, write0, write1))

    def sample(r):
        codes = np.zeros((batch, n_true))
        np.put_along_axis(codes, np.argsort(r.random((batch, n_true)), 1)[:, :2], r.uniform(1, 2, (batch, 2)), 1)
        x = np.stack([codes @ read + 0.01 * r.normal(size=(batch, d)), r.normal(size=(batch, d))])
        return (x.astype(np.float32), np.stack([codes @ write0, codes @ write1]).astype(np.float32))

    sites = ("mlp_in.0", "mlp_in.1")
    common = dict(sites=sites, d_model=d, width=32, l0_coefficients=(1.0,), target_l0s=(2.0,), transcoder=True)
    stacks = {"clt": Stack(**common, crosslayer="clt"), "tc": Stack(**common)}
    hp = step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=10, l0_warmup_steps=50, sparsity_loss="target_l0")
    x, y = sample(rng)
    scale = np.sqrt(np.stack([np.mean(np.sum(x**2, -1), -1), np.mean(np.sum(y**2, -1), -1)], 1))[..., None]
    scales = {g: np.broadcast_to(scale, (2, 2, d)).astype(np.float32) for g in stacks}
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    state = step_lib.init_state(jax.random.key(0), stacks, hp, mesh, scales)
    fn = step_lib.make_train_step(stacks, hp, mesh)
    for _ in range(steps):
        state, metrics = fn(state, {g: sample(rng) for g in stacks})
    clt, tc = jax.device_get(metrics["clt"]), jax.device_get(metrics["tc"])
    # Measured 0.21 and 1.00 at layer 1, 0.27 and 0.32 at layer 0 (the last batch; one seed).
    assert clt["fvu_layers"][0, 1] < 0.4 and tc["fvu"][1] > 0.9, (clt["fvu_layers"], tc["fvu"])
    assert clt["fvu_layers"][0, 0] < 0.4 and tc["fvu"][0] < 0.4
