"""The train step's own pieces: bfloat16 steps match float32, the grid layout, the mesh's model axis."""

import jax
import numpy as np
import pytest

from gemma_scope import mesh as mesh_lib
from gemma_scope.training import step as step_lib
from gemma_scope.training.grid import Stack


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_bfloat16_step_follows_float32_step(mesh_shape):
    """Odd sizes, a λ sweep and latent-axis sharding: bfloat16 matmul inputs give the float32 step's result."""
    grid = {"g": Stack(sites=("res.0", "res.1"), d_model=24, width=72, l0_coefficients=(1e-3, 1e-2))}
    rng = np.random.default_rng(1)
    batches = [{"g": rng.normal(size=(2, 40, 24)).astype(np.float32)} for _ in range(3)]
    data, model = mesh_shape
    mesh = mesh_lib.make_mesh(data, model, devices=jax.devices()[:data * model])

    def run(compute_dtype):
        hp = step_lib.Hyperparams(learning_rate=1e-3, lr_warmup_steps=0, l0_warmup_steps=0, compute_dtype=compute_dtype)
        state = step_lib.init_state(jax.random.key(0), grid, hp, mesh)
        train_step = step_lib.make_train_step(grid, hp, mesh)
        for batch in batches:
            state, metrics = train_step(state, batch)
        return jax.device_get(state), jax.device_get(metrics)

    (f32, f32_metrics), (bf16, bf16_metrics) = run("float32"), run("bfloat16")
    assert f32["opt_state"][0]._fields == ("count", "nu")  # β1 = 0 keeps no first moment
    np.testing.assert_allclose(bf16_metrics["g"]["loss"], f32_metrics["g"]["loss"], rtol=2e-2)
    init = jax.device_get(step_lib.init_state(jax.random.key(0), grid, step_lib.Hyperparams(), mesh)["params"]["g"])
    # θ is left out: its pseudo-gradient counts pre-activations within ε/2 of θ, a set bfloat16 rounding changes.
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        moved32, moved16 = (np.ravel(s["params"]["g"][key] - init[key]) for s in (f32, bf16))
        cosine = moved16 @ moved32 / (np.linalg.norm(moved16) * np.linalg.norm(moved32))
        assert np.linalg.norm(moved32) > 0 and cosine > 0.95, (key, cosine)


def test_group_layout_is_site_major():
    grp = Stack(sites=("res.0", "res.1", "res.2"), d_model=8, width=16, l0_coefficients=(1e-3, 2e-3))
    assert [grp.sae(i) for i in range(grp.n)] == [(s, lam, None) for s in range(3) for lam in (1e-3, 2e-3)]
    assert [grp.sae(i) for i in range(6)[grp.saes_of_site(1)]] == [(1, 1e-3, None), (1, 2e-3, None)]
    with pytest.raises(IndexError, match="outside"):
        grp.sae(6)
    targets = Stack(sites=("res.0", "res.1"), d_model=8, width=16, l0_coefficients=(0.1, 0.1),
                    target_l0s=(50.0, 100.0))
    assert [targets.sae(i) for i in range(targets.n)] == [(0, 0.1, 50.0), (0, 0.1, 100.0), (1, 0.1, 50.0),
                                                          (1, 0.1, 100.0)]


@pytest.mark.parametrize("value, width, devices, expected", [
    ("auto", 2**14, 8, 1), ("auto", 2**16, 8, 4), ("auto", 2**17, 6, 6), ("auto", 2**16, 6, 3), ("2", 2**10, 8, 2)])
def test_model_axis_size(value, width, devices, expected):
    assert mesh_lib.model_axis_size(value, width, devices) == expected


def test_model_axis_size_rejects_nonsense():
    with pytest.raises(ValueError, match="mesh.model"):
        mesh_lib.model_axis_size("wide", 2**14, 8)
