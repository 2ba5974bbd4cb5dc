"""Cross-layer dictionaries at inference (gemma_scope/sae/crosslayer.py) against the per-layer ones and a loop."""

import numpy as np
import pytest
from conftest import f32_tol

from gemma_scope import sae
from gemma_scope.sae import crosslayer

N, B, D, F = 3, 5, 8, 16


def _clt(rng, skip=False):
    params = {
        "W_enc": rng.normal(size=(N, D, F)).astype(np.float32),
        "b_enc": rng.normal(size=(N, F)).astype(np.float32),
        "threshold": rng.uniform(0, 1, size=(N, F)).astype(np.float32),
        "W_dec": rng.normal(size=(N, F, N, D)).astype(np.float32),
        "b_dec": rng.normal(size=(N, D)).astype(np.float32),
    }
    if skip:
        params["W_skip"] = rng.normal(size=(N, D, D)).astype(np.float32)
    return params


@pytest.mark.parametrize("skip", [False, True])
def test_clt_with_only_same_layer_decoders_equals_its_per_layer_transcoders(skip):
    rng = np.random.default_rng(0)
    params = _clt(rng, skip)
    for i in range(N):  # zero every decoder to another layer
        for j in range(N):
            if i != j:
                params["W_dec"][i, :, j] = 0
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    got = np.asarray(crosslayer.clt_predict(params, x))
    for j in range(N):
        per_layer = {k: v[j] for k, v in params.items() if k != "W_dec"} | {"W_dec": params["W_dec"][j, :, j]}
        want = np.asarray(sae.predict(per_layer, x[j]))
        scale = np.abs(x[j]) @ np.abs(params["W_enc"][j]) + np.abs(params["b_enc"][j])
        magnitude = scale.max() * np.abs(params["W_dec"][j, :, j]).sum(0).max() + np.abs(x[j]).sum(1).max() * (
            np.abs(params["W_skip"][j]).max() if skip else 0) + np.abs(params["b_dec"]).max()
        np.testing.assert_allclose(got[j], want, atol=f32_tol(D + F + D, magnitude), rtol=0)


def test_clt_output_is_the_causal_sum_over_source_layers():
    rng = np.random.default_rng(1)
    params = _clt(rng)
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    f = np.asarray(crosslayer.clt_encode(params, x)).astype(np.float64)
    for i in range(N):  # the encoder is the per-layer JumpReLU
        pre = x[i].astype(np.float64) @ params["W_enc"][i] + params["b_enc"][i]
        np.testing.assert_array_equal(f[i] > 0, pre > params["threshold"][i])
    got = np.asarray(crosslayer.clt_decode(params, f.astype(np.float32)))
    magnitude = np.abs(f).sum(-1).max() * np.abs(params["W_dec"]).max() * N + np.abs(params["b_dec"]).max()
    for j in range(N):
        want = sum(f[i] @ params["W_dec"][i, :, j] for i in range(j + 1)) + params["b_dec"][j]
        np.testing.assert_allclose(got[j], want, atol=f32_tol(N * F, magnitude), rtol=0)
    # The unused slots (target below source) never leak backwards in time.
    params["W_dec"][2, :, 0] = 1e6
    np.testing.assert_array_equal(np.asarray(crosslayer.clt_decode(params, f.astype(np.float32)))[0], got[0])


def test_one_layer_crosscoder_is_an_sae_and_encoders_sum_over_layers():
    rng = np.random.default_rng(2)
    params = {
        "W_enc": rng.normal(size=(N, D, F)).astype(np.float32),
        "b_enc": rng.normal(size=(F,)).astype(np.float32),
        "threshold": rng.uniform(0, 1, size=(F,)).astype(np.float32),
        "W_dec": rng.normal(size=(F, N, D)).astype(np.float32),
        "b_dec": rng.normal(size=(N, D)).astype(np.float32),
    }
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    pre = sum(x[i].astype(np.float64) @ params["W_enc"][i] for i in range(N)) + params["b_enc"]
    f = np.asarray(crosslayer.crosscoder_encode(params, x))
    np.testing.assert_array_equal(f > 0, pre > params["threshold"])
    np.testing.assert_allclose(f, (pre > params["threshold"]) * pre, atol=f32_tol(N * D, np.abs(pre).max() + 4 * D))
    one = {"W_enc": params["W_enc"][:1], "b_enc": params["b_enc"], "threshold": params["threshold"],
           "W_dec": params["W_dec"][:, :1], "b_dec": params["b_dec"][:1]}
    single = {"W_enc": params["W_enc"][0], "b_enc": params["b_enc"], "threshold": params["threshold"],
              "W_dec": params["W_dec"][:, 0], "b_dec": params["b_dec"][0]}
    f_one = np.asarray(crosslayer.crosscoder_encode(one, x[:1]))
    f_single = np.asarray(sae.encode(single, x[0]))
    enc_scale = (np.abs(x[0]) @ np.abs(single["W_enc"]) + np.abs(single["b_enc"])).max()
    np.testing.assert_allclose(f_one, f_single, atol=f32_tol(D, enc_scale), rtol=0)
    got = np.asarray(crosslayer.crosscoder_decode(one, f_single))[0]
    want = np.asarray(sae.decode(single, f_single))
    dec_scale = (np.abs(f_single) @ np.abs(single["W_dec"])).max() + np.abs(single["b_dec"]).max()
    np.testing.assert_allclose(got, want, atol=f32_tol(F, dec_scale), rtol=0)


def test_kind_reads_the_decoder_rank():
    assert crosslayer.kind({"W_dec": np.zeros((4, 2))}) == "sae"
    assert crosslayer.kind({"W_dec": np.zeros((4, 3, 2))}) == "crosscoder"
    assert crosslayer.kind({"W_dec": np.zeros((3, 4, 3, 2))}) == "clt"
    with pytest.raises(ValueError, match="rank"):
        crosslayer.kind({"W_dec": np.zeros(3)})
