"""Training the CLT and the crosscoder (gemma_scope/sae/crosslayer_train.py): gradients against the formulas, parity
with the per-layer transcoders and the SAE they contain, the decoder constraint, init and the fold."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f32_tol

from gemma_scope.sae import crosslayer, losses
from gemma_scope.sae import crosslayer_train as xt

N, B, D, F = 3, 96, 8, 24
EPS = 0.05  # a wide kernel, so that the θ gradient is exercised on many tokens


def _clt(rng, skip=False, diagonal=False):
    w_dec = rng.normal(size=(N, F, N, D)) * np.triu(np.ones((N, N)))[:, None, :, None]
    if diagonal:  # decoders to other layers zero
        w_dec = w_dec * np.eye(N)[:, None, :, None]
    params = {"W_enc": rng.normal(size=(N, D, F)) / np.sqrt(D), "b_enc": rng.normal(size=(N, F)) * 0.1,
              "threshold": rng.uniform(0.05, 0.6, size=(N, F)), "W_dec": np.asarray(xt.normalise_decoder(w_dec)),
              "b_dec": rng.normal(size=(N, D)) * 0.1}
    if skip:
        params["W_skip"] = rng.normal(size=(N, D, D)) * 0.1
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def _xy(rng):
    x = rng.normal(size=(N, B, D)) / np.sqrt(D)
    y = np.tanh(x) + 0.1 * rng.normal(size=x.shape) + 0.2
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("sparsity_loss", ["l0", "target_l0"])
def test_clt_with_zero_cross_layer_decoders_trains_as_its_per_layer_transcoders(skip, sparsity_loss):
    """Loss, metrics and every gradient of the per-layer parts equal those of the n transcoders ``losses.loss``
    trains (the penalty per layer)."""
    rng = np.random.default_rng(0)
    params, (x, y) = _clt(rng, skip, diagonal=True), _xy(rng)
    lam, target = 0.3, 5.0
    kw = dict(sparsity_loss=sparsity_loss, target_l0=target, frequency_coefficient=0.2, frequency_threshold=0.3)
    clt_fn = jax.jit(jax.value_and_grad(functools.partial(xt.clt_loss, bandwidth=EPS, **kw), has_aux=True))
    (loss, aux), grads = clt_fn(params, x, y, lam)
    tc_fn = jax.jit(jax.value_and_grad(functools.partial(losses.loss, bandwidth=EPS, **kw), has_aux=True))
    per_layer = {k: v for k, v in params.items() if k != "W_dec"}
    total = 0.0
    for i in range(N):
        one = {k: v[i] for k, v in per_layer.items()} | {"W_dec": params["W_dec"][i, :, i]}
        (loss_i, aux_i), g_i = tc_fn(one, x[i], lam, y=y[i])
        total += loss_i
        # Float32 sums over d (encode, skip), F (decode, ∂f) and the batch, ordered differently.
        tol = f32_tol(3 * D + F + B)
        np.testing.assert_allclose(aux["l0_layers"][i], aux_i["l0"], rtol=tol)
        np.testing.assert_allclose(aux["fvu_layers"][i], aux_i["fvu"], rtol=tol)
        np.testing.assert_array_equal(aux["fired"][i], aux_i["fired"])
        for key, g in g_i.items():
            got = grads[key][i, :, i] if key == "W_dec" else grads[key][i]
            np.testing.assert_allclose(got, g, rtol=0, atol=tol * np.abs(g).max() * 4 + 1e-9, err_msg=key)
    assert aux["l0_layers"].min() > 0 and np.abs(grads["threshold"]).max() > 0
    np.testing.assert_allclose(loss, total, rtol=f32_tol(3 * D + F + B + N))


def test_clt_gradients_equal_the_formulas():
    """With g_j = 2(ŷ_j − y_j)/B: ∂W_dec[i, :, j] = f_iᵀ g_j (j ≥ i, else 0), ∂b_dec[j] = Σ_B g_j,
    ∂f_i = Σ_{j ≥ i} g_j W_dec[i, :, j]ᵀ, ∂W_enc[i] = x_iᵀ (H(z_i − θ_i)·∂f_i), ∂W_skip[j] = x_jᵀ g_j and
    ∂θ_i = Σ_B K((z_i − θ_i)/ε)·(−(θ_i/ε)·∂f_i − λ/(εB)) (λ·L0; JumpReLU paper Eq. 11–12)."""
    rng = np.random.default_rng(1)
    params, (x, y) = _clt(rng, skip=True), _xy(rng)
    lam = 0.02
    grads = jax.jit(jax.grad(lambda p: xt.clt_loss(p, x, y, lam, EPS)[0]))(params)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    z = np.einsum("nbd,ndf->nbf", xs, p["W_enc"]) + p["b_enc"][:, None]
    active, kernel = z > p["threshold"][:, None], np.abs((z - p["threshold"][:, None]) / EPS) < 0.5
    assert kernel.any() and active.any()
    f = z * active
    y_hat = np.stack([sum(f[i] @ p["W_dec"][i, :, j] for i in range(j + 1)) + p["b_dec"][j]
                      + xs[j] @ p["W_skip"][j] for j in range(N)])
    g = 2 * (y_hat - ys) / B
    d_f = np.stack([sum(g[j] @ p["W_dec"][i, :, j].T for j in range(i, N)) for i in range(N)])
    want = {"W_dec": np.einsum("ibf,jbd->ifjd", f, g) * np.triu(np.ones((N, N)))[:, None, :, None],
            "b_dec": g.sum(1), "W_enc": np.einsum("nbd,nbf->ndf", xs, d_f * active), "b_enc": (d_f * active).sum(1),
            "W_skip": np.einsum("nbd,nbe->nde", xs, g),
            "threshold": np.sum(kernel * (-(p["threshold"][:, None] / EPS) * d_f - lam / (EPS * B)), 1)}
    assert sorted(grads) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(grads[key], value, rtol=1e-4, atol=1e-4 * np.abs(value).max(), err_msg=key)
    _, aux = xt.clt_loss(params, x, y, lam, EPS)
    mse = np.mean(np.sum((ys - y_hat) ** 2, -1), -1)
    np.testing.assert_allclose(aux["mse"], mse.sum(), rtol=f32_tol(3 * D + N * F + B + N))
    np.testing.assert_allclose(aux["l0"], active.sum(-1).mean(-1).sum(), rtol=f32_tol(B + N * F))


def test_clt_total_target_l0_pulls_the_sum_of_the_layers():
    rng = np.random.default_rng(2)
    params, (x, y) = _clt(rng), _xy(rng)
    lam, target = 0.5, 12.0
    loss_total, aux = xt.clt_loss(params, x, y, lam, EPS, sparsity_loss="target_l0", target_l0=target,
                                  l0_per_layer=False)
    loss_layers, _ = xt.clt_loss(params, x, y, lam, EPS, sparsity_loss="target_l0", target_l0=target)
    l0 = np.asarray(aux["l0_layers"], np.float64)
    tol = f32_tol(3 * D + N * F + B + N, float(loss_total))
    np.testing.assert_allclose(loss_total - aux["mse"], lam * (l0.sum() / target - 1) ** 2, atol=tol)
    np.testing.assert_allclose(loss_layers - aux["mse"], lam * np.sum((l0 / target - 1) ** 2), atol=tol)


@pytest.mark.parametrize("n", [1, 3])
def test_crosscoder_is_an_sae_on_the_concatenated_layers(n):
    """Loss, metrics and gradients of a crosscoder equal those of the SAE (``losses.loss``, pre-encoder bias
    included) on the layers concatenated, ``[B, n·d]``: for n = 1 it is that SAE."""
    rng = np.random.default_rng(3)
    w_dec = np.asarray(xt.normalise_decoder(rng.normal(size=(F, n, D))))
    params = {"W_enc": rng.normal(size=(n, D, F)) / np.sqrt(D), "b_enc": rng.normal(size=F) * 0.1,
              "threshold": rng.uniform(0.05, 0.6, size=F), "W_dec": w_dec, "b_dec": rng.normal(size=(n, D)) * 0.1}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    x = jnp.asarray(rng.normal(size=(n, B, D)) / np.sqrt(D), jnp.float32)
    kw = dict(sparsity_loss="target_l0", target_l0=4.0)
    (loss, aux), grads = jax.jit(jax.value_and_grad(functools.partial(xt.crosscoder_loss, bandwidth=EPS, **kw),
                                                    has_aux=True))(params, x, 0.3)
    flat = {"W_enc": params["W_enc"].reshape(n * D, F), "b_enc": params["b_enc"], "threshold": params["threshold"],
            "W_dec": params["W_dec"].reshape(F, n * D), "b_dec": params["b_dec"].reshape(-1)}
    x_flat = jnp.swapaxes(x, 0, 1).reshape(B, n * D)
    (want, want_aux), want_grads = jax.jit(jax.value_and_grad(functools.partial(losses.loss, bandwidth=EPS, **kw),
                                                              has_aux=True))(flat, x_flat, 0.3)
    tol = f32_tol(3 * n * D + F + B + n)
    np.testing.assert_allclose(loss, want, rtol=tol)
    for key in ("mse", "fvu", "l0"):
        np.testing.assert_allclose(aux[key], want_aux[key], rtol=tol, err_msg=key)
    for key, g in want_grads.items():
        np.testing.assert_allclose(grads[key].reshape(g.shape), g, rtol=0, atol=4 * tol * np.abs(g).max(),
                                   err_msg=key)


def test_decoder_constraint_is_per_latent_over_its_target_layers():
    rng = np.random.default_rng(4)
    w = np.asarray(xt.normalise_decoder(_clt(rng)["W_dec"] * 3.0))
    np.testing.assert_allclose(np.linalg.norm(w.reshape(N, F, -1), axis=-1), 1.0, rtol=1e-6)
    assert np.all(w[2, :, :2] == 0) and np.all(w[1, :, 0] == 0)  # unused slots j < i stay zero
    grad = rng.normal(size=w.shape) * np.triu(np.ones((N, N)))[:, None, :, None]
    projected = np.asarray(xt.remove_parallel_component(jnp.asarray(w), jnp.asarray(grad, jnp.float32)))
    np.testing.assert_allclose(np.sum(projected * w, axis=(-2, -1)), 0.0, atol=1e-5)
    assert np.all(projected[2, :, :2] == 0)


def test_init_has_unit_decoders_causal_zeros_and_tied_encoders():
    clt = xt.init_clt(jax.random.key(0), N, D, F, threshold=0.002, skip=True)
    assert {k: v.shape for k, v in clt.items()} == {"W_enc": (N, D, F), "b_enc": (N, F), "threshold": (N, F),
                                                     "W_dec": (N, F, N, D), "b_dec": (N, D), "W_skip": (N, D, D)}
    np.testing.assert_allclose(np.linalg.norm(np.asarray(clt["W_dec"]).reshape(N, F, -1), axis=-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(clt["W_dec"])[1, :, 0] == 0) and np.all(np.asarray(clt["threshold"]) == 0.002)
    own = np.asarray(clt["W_dec"])[1, :, 1]  # the encoder is the same-layer decoder's direction
    np.testing.assert_allclose(np.asarray(clt["W_enc"])[1].T, own / np.linalg.norm(own, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    xc = xt.init_crosscoder(jax.random.key(1), N, D, F)
    np.testing.assert_array_equal(np.transpose(np.asarray(xc["W_enc"]), (2, 0, 1)), xc["W_dec"])
    with pytest.raises(ValueError, match="width=0"):
        xt.init_clt(jax.random.key(0), N, D, 0)


@pytest.mark.parametrize("skip", [False, True])
def test_folded_clt_on_raw_activations_gives_the_scaled_prediction(skip):
    rng = np.random.default_rng(5)
    params, (x, _) = _clt(rng, skip), _xy(rng)
    c_in, c_out = rng.uniform(0.5, 4.0, size=(N, D)), rng.uniform(0.5, 4.0, size=(N, D))
    folded = xt.fold_clt(params, c_in, c_out)
    x_raw = np.asarray(x, np.float64) * c_in[:, None]
    got = np.asarray(crosslayer.clt_predict(folded, jnp.asarray(x_raw, jnp.float32)))
    want = np.asarray(crosslayer.clt_predict(params, x)) * c_out[:, None]
    np.testing.assert_allclose(got, want, rtol=0, atol=f32_tol(4 * (D + N * F), np.abs(want).max() + 10))
    w = np.asarray(folded["W_dec"])
    np.testing.assert_allclose(np.linalg.norm(w.reshape(N, F, -1), axis=-1), 1.0, rtol=1e-5)
    assert np.all(w[2, :, :2] == 0)
    f_raw = np.asarray(crosslayer.clt_encode(folded, jnp.asarray(x_raw, jnp.float32)))
    np.testing.assert_array_equal(f_raw > 0, np.asarray(crosslayer.clt_encode(params, x)) > 0)


def test_folded_crosscoder_on_raw_activations_gives_the_scaled_reconstruction():
    rng = np.random.default_rng(6)
    xc = xt.init_crosscoder(jax.random.key(2), N, D, F)
    xc = xc | {"b_enc": jnp.asarray(rng.normal(size=F) * 0.1, jnp.float32),
               "b_dec": jnp.asarray(rng.normal(size=(N, D)) * 0.3, jnp.float32),
               "threshold": jnp.asarray(rng.uniform(0.0, 0.2, size=F), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(N, B, D)) / np.sqrt(D), jnp.float32)
    c = rng.uniform(0.5, 4.0, size=(N, D))
    folded = xt.fold_crosscoder(xc, c)
    trained = xc | {"b_enc": xc["b_enc"] - jnp.einsum("nd,ndf->f", xc["b_dec"], xc["W_enc"])}  # pre-encoder bias
    want = np.asarray(crosslayer.crosscoder_predict(trained, x)) * c[:, None]
    got = np.asarray(crosslayer.crosscoder_predict(folded, jnp.asarray(np.asarray(x) * c[:, None], jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=0, atol=f32_tol(4 * (N * D + F), np.abs(want).max() + 10))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(folded["W_dec"]).reshape(F, -1), axis=-1), 1.0, rtol=1e-5)
