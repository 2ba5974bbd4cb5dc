"""The JumpReLU SAE core: pseudo-derivatives, initialisation, decoder constraint, normalisation fold, recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f32_tol

from gemma_scope import mesh as mesh_lib
from gemma_scope import sae
from gemma_scope.sae import losses
from gemma_scope.training import normalisation
from gemma_scope.training import step as step_lib
from gemma_scope.training.grid import Stack

EPS = 0.001


def _points(rng, threshold):
    """Pre-activations [64, M]: half within ε/2 of θ (where the kernel is 1), half far from it."""
    near = threshold + rng.uniform(-0.49, 0.49, size=(32, threshold.size)) * EPS
    far = threshold + rng.choice([-1, 1], size=(32, threshold.size)) * rng.uniform(2, 50, size=(32, threshold.size)) * EPS
    return np.concatenate([near, far]).astype(np.float32)


def test_jumprelu_vjp_equals_pseudo_derivatives():
    rng = np.random.default_rng(0)
    theta = rng.uniform(0.01, 0.5, size=16).astype(np.float32)
    z = _points(rng, theta)
    g = rng.normal(size=z.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda z_, t_: sae.jumprelu(z_, t_, EPS), jnp.asarray(z), jnp.asarray(theta))
    dz, dtheta = vjp(jnp.asarray(g))
    kernel = (np.abs((z - theta) / EPS) < 0.5).astype(np.float32)
    np.testing.assert_array_equal(out, z * (z > theta))
    np.testing.assert_allclose(dz, g * (z > theta), rtol=0, atol=0)
    # a sum over the batch in any order: f32_tol of its length and Σ|term|
    np.testing.assert_allclose(dtheta, np.sum(-(theta / EPS) * kernel * g, axis=0), rtol=0,
                               atol=f32_tol(len(z), np.sum(np.abs(theta / EPS * kernel * g), axis=0).max()))
    assert kernel[:32].all() and not kernel[32:].any()  # both regimes were exercised


def test_step_vjp_equals_pseudo_derivatives():
    rng = np.random.default_rng(1)
    theta = rng.uniform(0.01, 0.5, size=16).astype(np.float32)
    z = _points(rng, theta)
    g = rng.normal(size=z.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda z_, t_: sae.step(z_, t_, EPS), jnp.asarray(z), jnp.asarray(theta))
    dz, dtheta = vjp(jnp.asarray(g))
    kernel = (np.abs((z - theta) / EPS) < 0.5).astype(np.float32)
    np.testing.assert_array_equal(out, (z > theta).astype(np.float32))
    np.testing.assert_array_equal(dz, np.zeros_like(z))  # the L0 term trains θ only
    np.testing.assert_allclose(dtheta, np.sum(-(1 / EPS) * kernel * g, axis=0), rtol=0,
                               atol=f32_tol(len(z), np.sum(np.abs(kernel * g) / EPS, axis=0).max()))  # a batch sum


def test_loss_gradient_of_threshold_combines_both_estimators():
    """dL/dθ of Eq. 4 = reconstruction part through JumpReLU + λ·(−1/ε)·K summed over the batch, / B."""
    rng = np.random.default_rng(2)
    params = sae.init_params(jax.random.key(0), 8, 4)
    params = dict(params, threshold=jnp.full((4,), 0.05, jnp.float32), b_enc=jnp.asarray(rng.normal(size=4) * 0.05,
                                                                                          jnp.float32))
    x = jnp.asarray(rng.normal(size=(256, 8)) * 0.3, jnp.float32)
    lam = 0.01
    grad = jax.grad(lambda p: losses.loss(p, x, lam, EPS)[0])(params)["threshold"]
    z = np.asarray(sae.pre_activations_train(params, x))
    f = z * (z > 0.05)
    x_hat = f @ np.asarray(params["W_dec"]) + np.asarray(params["b_dec"])
    dL_df = (2 * (x_hat - np.asarray(x)) @ np.asarray(params["W_dec"]).T) / x.shape[0]
    kernel = np.abs((z - 0.05) / EPS) < 0.5
    expected = np.sum(dL_df * -(0.05 / EPS) * kernel, 0) + lam * np.sum(-(1 / EPS) * kernel, 0) / x.shape[0]
    # sums over d = 8 (encode, dL/df), width 4 (decode) and the batch, of terms up to |dL/df|·θ/ε
    magnitude = np.sum(np.abs(dL_df) * (0.05 / EPS) * kernel, 0) + lam * np.sum(kernel, 0) / (EPS * x.shape[0])
    np.testing.assert_allclose(grad, expected, rtol=0, atol=f32_tol(8 + 4 + 8 + x.shape[0], magnitude.max()))


def test_init_follows_the_paper():
    p = sae.init_params(jax.random.key(3), 16, 64)
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=f32_tol(2 * 16))  # two norms over d
    np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
    np.testing.assert_array_equal(p["threshold"], np.full(64, 0.001, np.float32))
    assert not np.any(p["b_enc"]) and not np.any(p["b_dec"])
    assert all(v.dtype == jnp.float32 for v in p.values())
    with pytest.raises(ValueError, match="width"):
        sae.init_params(jax.random.key(0), 16, 0)


def test_parallel_gradient_removed_and_rows_stay_unit():
    rng = np.random.default_rng(4)
    w = sae.normalise_decoder(jnp.asarray(rng.normal(size=(32, 8)), jnp.float32))
    g = sae.remove_parallel_component(w, jnp.asarray(rng.normal(size=(32, 8)), jnp.float32))
    # sums over d = 8 (w's norm, g·w, this check's), terms below the raw rows' norm (< 6 for these draws)
    np.testing.assert_allclose(np.sum(np.asarray(g) * np.asarray(w), axis=1), 0.0, atol=f32_tol(3 * 8, 6.0))


@pytest.mark.parametrize("per_dimension", [False, True])
def test_fold_normalisation_gives_scaled_latents_and_reconstruction(per_dimension):
    """Folded params on raw x give latents r ⊙ f and reconstruction C ⊙ x̂ of the trained SAE on x / C, with
    r_i = ||W_dec[i] ⊙ C|| (= C for a scalar C, Gemma Scope's fold) and unit-norm decoder rows."""
    rng = np.random.default_rng(5)
    d, m = 12, 40
    c = rng.uniform(0.2, 30.0, size=d).astype(np.float32) if per_dimension else np.float32(3.7)
    params = {
        "W_enc": jnp.asarray(rng.normal(size=(d, m)) / np.sqrt(d), jnp.float32),
        "b_enc": jnp.asarray(rng.normal(size=m) * 0.1, jnp.float32),
        "W_dec": sae.normalise_decoder(jnp.asarray(rng.normal(size=(m, d)), jnp.float32)),
        "b_dec": jnp.asarray(rng.normal(size=d) * 0.2, jnp.float32),
        "threshold": jnp.asarray(rng.uniform(0.05, 0.3, size=m), jnp.float32),
    }
    x_raw = jnp.asarray(rng.normal(size=(256, d)) * c / np.sqrt(d), jnp.float32)
    f_trained = sae.jumprelu(sae.pre_activations_train(params, x_raw / c), params["threshold"])
    x_hat_trained = sae.decode(params, f_trained)
    folded = sae.fold_normalisation(params, c)
    f = sae.encode(folded, x_raw)
    assert np.count_nonzero(f) > 100  # latents actually fire
    r = np.linalg.norm(np.asarray(params["W_dec"]) * c, axis=-1)
    # Float32 rounding of sums over d (x @ W_enc, b_dec @ W_enc, the norms r) and m (decode) on each side, relative
    # to the largest latent and reconstruction.
    np.testing.assert_allclose(f, r * f_trained, rtol=0, atol=f32_tol(4 * d, np.abs(r * f_trained).max()))
    np.testing.assert_allclose(sae.decode(folded, f), c * x_hat_trained, rtol=0,
                               atol=f32_tol(4 * d + m, np.abs(c * x_hat_trained).max()))
    np.testing.assert_allclose(np.linalg.norm(folded["W_dec"], axis=-1), 1.0, rtol=1e-5)
    if not per_dimension:  # Gemma Scope's fold: latents C·f, both weight matrices as trained
        np.testing.assert_allclose(r, c, rtol=f32_tol(2 * d))  # two norms over d
        np.testing.assert_allclose(folded["W_dec"], params["W_dec"], rtol=f32_tol(d), atol=0)  # scaled by C / r
        np.testing.assert_allclose(folded["W_enc"], params["W_enc"], rtol=f32_tol(d), atol=0)  # scaled by r / C


def test_bfloat16_compute_keeps_threshold_float32_and_matches_float32():
    rng = np.random.default_rng(6)
    params = sae.init_params(jax.random.key(1), 32, 64)
    x = jnp.asarray(rng.normal(size=(128, 32)) / np.sqrt(32), jnp.float32)
    l32, _ = losses.loss(params, x, 1e-3)
    l16, _ = losses.loss(params, x, 1e-3, compute_dtype=jnp.bfloat16)
    grads = jax.grad(lambda p: losses.loss(p, x, 1e-3, compute_dtype=jnp.bfloat16)[0])(params)
    assert grads["threshold"].dtype == jnp.float32 and grads["W_enc"].dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, rtol=2e-2)


def test_recovers_a_known_sparse_dictionary(sparse_dictionary_data):
    """More true latents (64) than dimensions (32), 3 active per token: the SAE finds the directions and L0 ≈ 3."""
    rng = np.random.default_rng(0)
    directions, pool = sparse_dictionary_data(rng, 32 * 1024)
    batch, steps = 1024, 2000
    scale = float(np.sqrt(np.mean(np.sum(pool**2, axis=1))))
    grid = {"g": Stack(sites=("custom",), d_model=32, width=128, l0_coefficients=(3e-2,))}
    hp = step_lib.Hyperparams(learning_rate=3e-3, lr_warmup_steps=100, l0_warmup_steps=500)
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    state = step_lib.init_state(jax.random.key(0), grid, hp, mesh, {"g": np.full((1, 32), scale, np.float32)})
    train_step = step_lib.make_train_step(grid, hp, mesh)
    batches = jnp.asarray(pool.reshape(32, 1, batch, 32))
    for s in range(steps):
        state, metrics = train_step(state, {"g": batches[s % 32]})
    w_dec = np.asarray(state["params"]["g"]["W_dec"][0])
    best_cos = (directions @ w_dec.T).max(axis=1)
    assert best_cos.mean() >= 0.9, best_cos
    folded = sae.fold_normalisation(jax.tree.map(lambda a: a[0], state["params"]["g"]), scale)
    l0 = float(jnp.mean(jnp.sum(sae.encode(folded, pool[:4096]) > 0, axis=1)))
    assert 2.0 <= l0 <= 4.5, l0


def _autodiff_loss(params, x, lam, compute_dtype, y=None):
    """Eq. 4 composed from the public pieces and differentiated by JAX (the hand-written backward's reference);
    a transcoder's (module docstring of sae.autoencoder) when y is given."""
    z = sae.pre_activations_train(params, x, compute_dtype, transcoder=y is not None)
    x_hat = sae.decode(params, sae.jumprelu(z, params["threshold"], EPS), compute_dtype)
    if "W_skip" in params:
        x_hat = x_hat + jnp.matmul(x.astype(compute_dtype), params["W_skip"].astype(compute_dtype),
                                   preferred_element_type=jnp.float32)
    mse = jnp.mean(jnp.sum(((x if y is None else y).astype(jnp.float32) - x_hat) ** 2, axis=-1))
    return mse + lam * jnp.mean(jnp.sum(sae.step(z, params["threshold"], EPS), axis=-1))


# float32: sums over d = 24 (encode, dL/df), m = 96 (decode) and the batch of 200 (weight gradients), in other
# orders; bfloat16: matmul inputs rounded at other points, 2^-8 relative each.
@pytest.mark.parametrize("compute_dtype,rtol", [(jnp.float32, f32_tol(2 * 24 + 96 + 200)),
                                                (jnp.bfloat16, 2e-2)])
def test_loss_gradients_equal_autodiff_of_the_pieces(compute_dtype, rtol):
    rng = np.random.default_rng(7)
    d, m, batch = 24, 96, 200
    params = dict(sae.init_params(jax.random.key(2), d, m),
                  b_enc=jnp.asarray(rng.normal(size=m) * 0.05, jnp.float32),
                  b_dec=jnp.asarray(rng.normal(size=d) * 0.1, jnp.float32),
                  threshold=jnp.asarray(rng.uniform(0.0, 0.05, size=m), jnp.float32))
    x = jnp.asarray(rng.normal(size=(batch, d)) / np.sqrt(d), jnp.float32)
    grad = jax.jit(jax.grad(lambda p: losses.loss(p, x, 0.02, EPS, compute_dtype)[0]))(params)
    ref = jax.jit(jax.grad(lambda p: _autodiff_loss(p, x, 0.02, compute_dtype)))(params)
    z = np.asarray(sae.pre_activations_train(params, x))
    assert np.any(np.abs(z - np.asarray(params["threshold"])) < EPS / 2)  # the θ kernel is exercised
    for key in sae.PARAM_KEYS:
        scale = np.abs(np.asarray(ref[key])).max()
        np.testing.assert_allclose(grad[key], ref[key], rtol=0, atol=rtol * scale, err_msg=key)
    x_grad = jax.grad(lambda x_: losses.loss(params, x_, 0.02, EPS)[0])(x)
    np.testing.assert_allclose(x_grad, jax.grad(lambda x_: _autodiff_loss(params, x_, 0.02, jnp.float32))(x),
                               rtol=0, atol=f32_tol(2 * (d + m), np.abs(x_grad).max()))  # sums over d and m, twice


# Transcoders: ŷ = JumpReLU(x W_enc + b_enc) W_dec + b_dec (+ x W_skip), no pre-encoder bias.


def _transcoder(rng, d, m, skip):
    params = dict(sae.init_params(jax.random.key(4), d, m, skip=skip),
                  b_enc=jnp.asarray(rng.normal(size=m) * 0.05, jnp.float32),
                  b_dec=jnp.asarray(rng.normal(size=d) * 0.1, jnp.float32),
                  threshold=jnp.asarray(rng.uniform(0.0, 0.05, size=m), jnp.float32))
    if skip:
        params["W_skip"] = jnp.asarray(rng.normal(size=(d, d)) * 0.1, jnp.float32)
    return params


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_loss_gradients_equal_the_formulas(skip):
    """L = mean_B ||y − ŷ||² + λ·mean_B Σ H(z − θ), z = x W_enc + b_enc: with g = 2(ŷ − y)/B,
    ∂W_dec = fᵀg, ∂b_dec = Σg, ∂W_skip = xᵀg, ∂W_enc = xᵀ(H(z−θ)·gW_decᵀ), ∂b_enc = Σ H(z−θ)·gW_decᵀ,
    ∂θ = Σ K((z−θ)/ε)·(−(θ/ε)·gW_decᵀ − λ/(εB)); ∂x = (H·gW_decᵀ)W_encᵀ + gW_skipᵀ, ∂y = −g."""
    rng = np.random.default_rng(8)
    d, m, batch, lam = 12, 48, 160, 0.02
    params = _transcoder(rng, d, m, skip)
    x = jnp.asarray(rng.normal(size=(batch, d)) / np.sqrt(d), jnp.float32)
    y = jnp.asarray(rng.normal(size=(batch, d)) / np.sqrt(d) + 0.3, jnp.float32)
    loss_fn = lambda p, x_, y_: losses.loss(p, x_, lam, EPS, y=y_)[0]  # noqa: E731
    grads, d_x, d_y = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(params, x, y)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    z = xs @ p["W_enc"] + p["b_enc"]
    np.testing.assert_allclose(sae.pre_activations_train(params, x, transcoder=True), z, rtol=0,  # a dot over d
                               atol=f32_tol(d + 1, (np.abs(xs) @ np.abs(p["W_enc"]) + np.abs(p["b_enc"])).max()))
    active, kernel = z > p["threshold"], np.abs((z - p["threshold"]) / EPS) < 0.5
    assert kernel.any()  # the θ kernel is exercised
    f = z * active
    y_hat = f @ p["W_dec"] + p["b_dec"] + (xs @ p["W_skip"] if skip else 0)
    g = 2 * (y_hat - ys) / batch
    d_f = g @ p["W_dec"].T
    d_z = d_f * active
    want = {"W_dec": f.T @ g, "b_dec": g.sum(0), "W_enc": xs.T @ d_z, "b_enc": d_z.sum(0),
            "threshold": np.sum(kernel * (-(p["threshold"] / EPS) * d_f - lam / (EPS * batch)), 0)}
    if skip:
        want["W_skip"] = xs.T @ g
    assert sorted(grads) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(grads[key], value, rtol=1e-4, atol=1e-4 * np.abs(value).max(), err_msg=key)
    # Float32 against float64: sums over d (encode, skip, dL/df), m (decode, back through W_enc) and the batch.
    np.testing.assert_allclose(d_x, d_z @ p["W_enc"].T + (g @ p["W_skip"].T if skip else 0), rtol=0,
                               atol=f32_tol(4 * d + 2 * m, np.abs(d_x).max()))
    np.testing.assert_allclose(d_y, -g, rtol=0,  # ŷ − y cancels: terms of the size of ŷ and y
                               atol=f32_tol(2 * d + m, 2 * (np.abs(y_hat) + np.abs(ys)).max() / batch))
    total, aux = losses.loss(params, x, lam, EPS, y=y)
    mse = np.mean(np.sum((ys - y_hat) ** 2, -1))
    np.testing.assert_allclose(aux["mse"], mse, rtol=f32_tol(3 * d + m + batch))  # and the squared error's over d
    np.testing.assert_allclose(aux["fvu"], mse / np.mean(np.sum((ys - ys.mean(0)) ** 2, -1)),
                               rtol=f32_tol(4 * d + m + 3 * batch))  # and the variance's over d and the batch
    np.testing.assert_allclose(total, mse + lam * active.sum(1).mean(), rtol=f32_tol(3 * d + m + batch))


# float32: sums over d = 16 (encode, skip, dL/df), m = 64 (decode) and the batch of 128, in other orders
@pytest.mark.parametrize("compute_dtype,rtol", [(jnp.float32, f32_tol(3 * 16 + 64 + 128)),
                                                (jnp.bfloat16, 2e-2)])
def test_transcoder_loss_gradients_equal_autodiff_of_the_pieces(compute_dtype, rtol):
    rng = np.random.default_rng(9)
    params = _transcoder(rng, 16, 64, skip=True)
    x = jnp.asarray(rng.normal(size=(128, 16)) / 4, jnp.float32)
    y = jnp.asarray(rng.normal(size=(128, 16)) / 4, jnp.float32)
    grad = jax.jit(jax.grad(lambda p: losses.loss(p, x, 0.01, EPS, compute_dtype, y=y)[0]))(params)
    ref = jax.jit(jax.grad(lambda p: _autodiff_loss(p, x, 0.01, compute_dtype, y)))(params)
    for key in params:
        assert grad[key].dtype == jnp.float32
        np.testing.assert_allclose(grad[key], ref[key], rtol=0, atol=rtol * np.abs(ref[key]).max(), err_msg=key)


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_fold_gives_scaled_output_on_raw_activations(skip):
    rng = np.random.default_rng(10)
    d, m, c_in, c_out = 12, 40, 3.7, 0.6
    params = _transcoder(rng, d, m, skip)
    params["threshold"] = jnp.asarray(rng.uniform(0.02, 0.1, size=m), jnp.float32)
    x_raw = jnp.asarray(rng.normal(size=(256, d)) * c_in / np.sqrt(d), jnp.float32)
    x = x_raw / c_in
    f = sae.jumprelu(sae.pre_activations_train(params, x, transcoder=True), params["threshold"])
    y_hat = sae.decode(params, f) + (x @ params["W_skip"] if skip else 0)
    folded = sae.fold_normalisation(params, c_in, c_out)
    assert sorted(folded) == sorted(params)
    assert np.count_nonzero(f) > 100
    np.testing.assert_allclose(sae.encode(folded, x_raw), c_out * f, rtol=1e-5, atol=1e-5)
    # sums over d (encode, skip, the norms r) and m (decode) on each side, relative to the largest output
    np.testing.assert_allclose(sae.predict(folded, x_raw), c_out * y_hat, rtol=0,
                               atol=f32_tol(4 * d + m, np.abs(c_out * y_hat).max()))
    np.testing.assert_allclose(folded["W_dec"], params["W_dec"], rtol=f32_tol(d), atol=0)  # scaled by C_out / r


def test_init_skip_is_zero():
    p = sae.init_params(jax.random.key(3), 16, 64, skip=True)
    np.testing.assert_array_equal(p["W_skip"], np.zeros((16, 16), np.float32))
    assert "W_skip" not in sae.init_params(jax.random.key(3), 16, 64)


def _recipe_setup(seed=11, d=12, m=48, batch=256):
    """Params with θ near many pre-activations (the step kernel is exercised) and normalised-ish inputs."""
    rng = np.random.default_rng(seed)
    params = dict(sae.init_params(jax.random.key(seed), d, m),
                  b_enc=jnp.asarray(rng.normal(size=m) * 0.05, jnp.float32),
                  b_dec=jnp.asarray(rng.normal(size=d) * 0.1, jnp.float32),
                  threshold=jnp.asarray(rng.uniform(0.0, 0.03, size=m), jnp.float32))
    x = jnp.asarray(rng.normal(size=(batch, d)) / np.sqrt(d), jnp.float32)
    z = np.asarray(sae.pre_activations_train(params, x))
    theta = np.asarray(params["threshold"])
    kernel_sum = (np.abs((z - theta) / EPS) < 0.5).sum(axis=0)  # Σ_B K((z − θ)/ε) per latent
    assert (kernel_sum > 0).sum() >= 5  # the θ kernel is exercised on several latents
    return params, x, z, theta, kernel_sum


def _penalty_gradient(params, x, **recipe):
    """∂(loss with the recipe) − ∂(reconstruction alone): the gradient of the sparsity terms only."""
    with_penalty = jax.grad(lambda p: losses.loss(p, x, recipe.pop("lam", 0.0), EPS, **recipe)[0])(params)
    without = jax.grad(lambda p: losses.loss(p, x, 0.0, EPS)[0])(params)
    return {k: np.asarray(with_penalty[k]) - np.asarray(without[k]) for k in sae.PARAM_KEYS}


def test_target_l0_penalty_gradient_is_its_formula():
    """λ·(L0/T − 1)²: ∂θ_i = λ·2(L0/T − 1)/T · (1/B)·Σ_B (−1/ε)·K((z_i − θ_i)/ε); no other parameter moves."""
    params, x, z, theta, kernel_sum = _recipe_setup()
    lam, target = 0.3, 7.0
    l0 = (z > theta).sum(axis=1).mean()
    loss, aux = losses.loss(params, x, lam, EPS, sparsity_loss="target_l0", target_l0=target)
    plain, _ = losses.loss(params, x, 0.0, EPS)
    np.testing.assert_allclose(aux["l0"], l0, rtol=1e-6)
    # The reconstruction terms cancel up to their float32 rounding: sums over d = 12 (encode, the squared error,
    # dL/df), m = 48 (decode) and the batch of 256, of the size of the reconstruction loss and its gradients.
    terms = 2 * 12 + 48 + 256
    np.testing.assert_allclose(loss - plain, lam * (l0 / target - 1) ** 2, rtol=1e-5, atol=f32_tol(terms, plain))
    grad = _penalty_gradient(params, x, lam=lam, sparsity_loss="target_l0", target_l0=target)
    expected = lam * 2 * (l0 / target - 1) / target * (-1 / EPS) * kernel_sum / x.shape[0]
    np.testing.assert_allclose(grad["threshold"], expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())
    reconstruction = jax.grad(lambda p: losses.loss(p, x, 0.0, EPS)[0])(params)
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(grad[key], 0.0, atol=f32_tol(terms, np.abs(reconstruction[key]).max()),
                                   err_msg=key)


def test_frequency_penalty_gradient_acts_only_on_frequent_latents():
    """c_f·Σ_i max(0, p_i − p_max): ∂θ_i = c_f·1[p_i > p_max]·(1/B)·Σ_B (−1/ε)·K((z_i − θ_i)/ε)."""
    params, x, z, theta, kernel_sum = _recipe_setup(seed=12)
    frequencies = (z > theta).mean(axis=0)
    p_max = float(np.median(frequencies))
    above = frequencies > p_max
    assert (above & (kernel_sum > 0)).any() and (~above & (kernel_sum > 0)).any()  # both kinds of latent
    c_f = 0.5
    loss, _ = losses.loss(params, x, 0.0, EPS, frequency_coefficient=c_f, frequency_threshold=p_max)
    plain, _ = losses.loss(params, x, 0.0, EPS)
    np.testing.assert_allclose(loss - plain, c_f * np.sum(np.maximum(frequencies - p_max, 0)), rtol=1e-4)
    grad = _penalty_gradient(params, x, frequency_coefficient=c_f, frequency_threshold=p_max)
    expected = c_f * above * (-1 / EPS) * kernel_sum / x.shape[0]
    np.testing.assert_allclose(grad["threshold"], expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())
    # the reconstruction gradients cancel up to their rounding (as in the target-L0 test)
    reconstruction = jax.grad(lambda p: losses.loss(p, x, 0.0, EPS)[0])(params)
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(grad[key], 0.0, atol=f32_tol(2 * 12 + 48 + 256, np.abs(reconstruction[key]).max()),
                                   err_msg=key)


def test_matryoshka_loss_and_decoder_gradient_are_the_formula():
    """Mean over prefixes m of ||x − f[:m] W_dec[:m] − b_dec||²; ∂W_dec row i = mean over prefixes containing i."""
    params, x, z, theta, _ = _recipe_setup(seed=13, m=48)
    prefixes = (8, 20)
    bounds = losses.matryoshka_bounds(prefixes, 48)
    assert bounds == (8, 20, 48)
    f = z * (z > theta)
    w_dec, b_dec, xs = np.asarray(params["W_dec"]), np.asarray(params["b_dec"]), np.asarray(x)
    errors = [f[:, :m] @ w_dec[:m] + b_dec - xs for m in bounds]
    loss, aux = losses.loss(params, x, 0.0, EPS, matryoshka_prefixes=prefixes)
    # sums over d = 12 (encode, the squared error, dL/df), m = 48 (decode) and the batch of 256
    terms = 2 * 12 + 48 + x.shape[0]
    np.testing.assert_allclose(loss, np.mean([np.mean(np.sum(e**2, axis=1)) for e in errors]), rtol=f32_tol(terms))
    np.testing.assert_allclose(aux["mse"], np.mean(np.sum(errors[-1] ** 2, axis=1)), rtol=f32_tol(terms))  # full
    grad = jax.grad(lambda p: losses.loss(p, x, 0.0, EPS, matryoshka_prefixes=prefixes)[0])(params)["W_dec"]
    expected = np.zeros_like(w_dec)
    for m, e in zip(bounds, errors):
        expected[:m] += 2 * f[:, :m].T @ e / x.shape[0] / len(bounds)
    magnitude = 2 * np.abs(f).T @ (np.abs(f) @ np.abs(w_dec) + np.abs(b_dec) + np.abs(xs)) / x.shape[0]
    np.testing.assert_allclose(grad, expected, rtol=0, atol=f32_tol(terms, magnitude.max()))


def test_hand_written_backward_equals_autodiff_with_the_whole_recipe():
    """The fast path (custom VJP, frequencies [M] and their cotangent) against the autodiff path (Matryoshka with
    the full width as its only prefix) under target L0 + frequency penalty: same loss and gradients."""
    params, x, *_ = _recipe_setup(seed=14)
    recipe = dict(sparsity_loss="target_l0", target_l0=5.0, frequency_coefficient=0.2, frequency_threshold=0.05)
    fast = jax.value_and_grad(lambda p: losses.loss(p, x, 0.1, EPS, **recipe)[0])(params)
    slow = jax.value_and_grad(lambda p: losses.loss(p, x, 0.1, EPS, matryoshka_prefixes=(48,), **recipe)[0])(params)
    # two programs: sums over d = 12 (encode, the squared error, dL/df), m = 48 (decode) and the batch of 256
    terms = 2 * 12 + 48 + 256
    np.testing.assert_allclose(fast[0], slow[0], rtol=f32_tol(terms))
    for key in sae.PARAM_KEYS:
        scale = np.abs(np.asarray(slow[1][key])).max()
        np.testing.assert_allclose(fast[1][key], slow[1][key], rtol=0, atol=f32_tol(terms, scale), err_msg=key)


def test_bad_recipe_arguments_are_named():
    params, x, *_ = _recipe_setup(seed=15)
    with pytest.raises(ValueError, match="sparsity_loss must be one of"):
        losses.loss(params, x, 0.1, EPS, sparsity_loss="l1")
    for prefixes in ((20, 8), (0, 8), (8, 64)):
        with pytest.raises(ValueError, match="strictly increasing integers in"):
            losses.loss(params, x, 0.1, EPS, matryoshka_prefixes=prefixes)


def test_geometric_median_is_the_minimiser_and_resists_outliers():
    rng = np.random.default_rng(16)
    points = rng.normal(size=(500, 6)).astype(np.float32) + 3.0
    points[:40] += 400.0  # 8% far outliers drag the mean, not the median
    median = np.asarray(normalisation.geometric_median(jnp.asarray(points)))
    unit = (points - median) / np.linalg.norm(points - median, axis=1, keepdims=True)
    assert np.linalg.norm(unit.sum(axis=0)) < 1e-2 * len(points)  # ∇ Σ_i ||x_i − m|| = 0 at the minimiser
    objective = lambda m: np.linalg.norm(points - m, axis=1).sum()  # noqa: E731
    for step in (np.eye(6) * 0.05):
        assert objective(median) <= min(objective(median + step), objective(median - step))
    assert np.abs(median - 3.0).max() < 0.3 and np.abs(points.mean(axis=0) - 3.0).min() > 30


def test_transcoder_matryoshka_and_target_l0_loss_equal_their_formulas():
    """With prefixes the reconstruction term is the mean over prefixes m of ||y − (f[:, :m] W_dec[:m] + b_dec +
    x W_skip)||²; the target-L0 term λ·(L0/target − 1)² is the SAE's (losses.sparsity_penalty)."""
    rng = np.random.default_rng(12)
    d, m, lam, target = 12, 48, 0.3, 5.0
    params = _transcoder(rng, d, m, skip=True)
    x = jnp.asarray(rng.normal(size=(200, d)) / np.sqrt(d), jnp.float32)
    y = jnp.asarray(rng.normal(size=(200, d)) / np.sqrt(d), jnp.float32)
    total, aux = losses.loss(params, x, lam, EPS, sparsity_loss="target_l0", target_l0=target,
                          matryoshka_prefixes=(8, 24), y=y)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    z = xs @ p["W_enc"] + p["b_enc"]
    f = z * (z > p["threshold"])
    mses = [np.mean(np.sum((ys - (f[:, :k] @ p["W_dec"][:k] + p["b_dec"] + xs @ p["W_skip"])) ** 2, -1))
            for k in (8, 24, m)]
    l0 = (z > p["threshold"]).sum(1).mean()
    # float32 against float64: sums over d (encode, skip, the squared error), m (decode) and the batch of 200
    np.testing.assert_allclose(aux["mse"], mses[-1], rtol=f32_tol(3 * d + m + 200))
    np.testing.assert_allclose(total, np.mean(mses) + lam * (l0 / target - 1) ** 2, rtol=f32_tol(3 * d + m + 200))
