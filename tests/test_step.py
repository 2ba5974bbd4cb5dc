"""The train step's own pieces: Adam without a first moment equals optax.adam; bfloat16 steps match float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import f32_tol

from gemma_scope import mesh as mesh_lib
from gemma_scope.training import step as step_lib


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_adam_equals_optax_adam(b1):
    hp = step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=3, adam_b1=b1)
    rng = np.random.default_rng(0)
    params = {"W": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), "b": jnp.asarray(rng.normal(size=6), jnp.float32)}
    reference = optax.adam(step_lib.learning_rate_schedule(hp), b1=b1, b2=hp.adam_b2, eps=hp.adam_eps)
    ours, theirs = step_lib.adam_init(params, hp), reference.init(params)
    assert ("mu" in ours) == (b1 != 0)  # β1 = 0 keeps no first moment
    for _ in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        ours_update, ours = jax.jit(lambda g, s: step_lib.adam_update(g, s, hp))(grads, ours)
        their_update, theirs = jax.jit(reference.update)(grads, theirs)
        # elementwise, in other orders: per step two-term moment averages, then the update's few roundings, all of
        # the size of the update (a first moment near 0 would defeat a relative tolerance)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=f32_tol(2 * 6 + 4, np.abs(b).max())),
                     ours_update, their_update)
        assert np.abs(np.asarray(ours_update["W"])).max() > 1e-4  # the updates are not trivially zero


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_bfloat16_step_follows_float32_step(mesh_shape):
    """Odd sizes, a λ sweep and latent-axis sharding: bfloat16 matmul inputs give the float32 step's result."""
    grid = {"g": step_lib.Group(n_sites=2, d_model=24, width=72, l0_coefficients=(1e-3, 1e-2))}
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
    assert set(f32["opt_state"]) == {"count", "nu"}
    np.testing.assert_allclose(bf16_metrics["g"]["loss"], f32_metrics["g"]["loss"], rtol=2e-2)
    init = jax.device_get(step_lib.init_state(jax.random.key(0), grid, step_lib.Hyperparams(), mesh)["params"]["g"])
    # θ is left out: its pseudo-gradient counts pre-activations within ε/2 of θ, a set bfloat16 rounding changes.
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        moved32, moved16 = (np.ravel(s["params"]["g"][key] - init[key]) for s in (f32, bf16))
        cosine = moved16 @ moved32 / (np.linalg.norm(moved16) * np.linalg.norm(moved32))
        assert np.linalg.norm(moved32) > 0 and cosine > 0.95, (key, cosine)


def test_group_layout_is_site_major():
    grp = step_lib.Group(n_sites=3, d_model=8, width=16, l0_coefficients=(1e-3, 2e-3))
    assert [grp.sae(i) for i in range(grp.n)] == [(s, lam, None) for s in range(3) for lam in (1e-3, 2e-3)]
    assert [grp.sae(i) for i in range(6)[grp.saes_of_site(1)]] == [(1, 1e-3, None), (1, 2e-3, None)]
    with pytest.raises(IndexError, match="outside"):
        grp.sae(6)
    targets = step_lib.Group(n_sites=2, d_model=8, width=16, l0_coefficients=(0.1, 0.1), target_l0s=(50.0, 100.0))
    assert [targets.sae(i) for i in range(targets.n)] == [(0, 0.1, 50.0), (0, 0.1, 100.0), (1, 0.1, 50.0),
                                                          (1, 0.1, 100.0)]


@pytest.mark.parametrize("value, width, devices, expected", [
    ("auto", 2**14, 8, 1), ("auto", 2**16, 8, 4), ("auto", 2**17, 6, 6), ("auto", 2**16, 6, 3), ("2", 2**10, 8, 2)])
def test_model_axis_size(value, width, devices, expected):
    assert mesh_lib.model_axis_size(value, width, devices) == expected


def test_model_axis_size_rejects_nonsense():
    with pytest.raises(ValueError, match="mesh.model"):
        mesh_lib.model_axis_size("wide", 2**14, 8)
