"""circuit-tracer's CLT and transcoder-set layouts (release.circuit_tracer): round trip, the dispatching reader,
bad files, and our files loaded by the circuit-tracer package itself when its venv exists."""

import os
import pathlib
import subprocess

import numpy as np
import pytest
import safetensors.numpy
import yaml
from conftest import f32_tol
from test_release_crosslayer import random_clt

from gemma_scope import release
from gemma_scope.sae import crosslayer

# The python of a venv holding circuit-tracer==0.5.0 (torch==2.13.0 CPU first); README "CLTs and crosscoders".
CIRCUIT_TRACER_PYTHON = os.environ.get("CIRCUIT_TRACER_PYTHON",
                                       str(pathlib.Path(__file__).parents[1] / ".venv-circuit-tracer/bin/python"))


def diagonal(params):
    """The CLT with its cross-layer decoders zeroed: a set of per-layer transcoders."""
    n = params["W_enc"].shape[0]
    return params | {"W_dec": params["W_dec"] * np.eye(n, dtype=np.float32)[:, None, :, None]}


def test_native_clt_round_trips_with_a_skip_sidecar(tmp_path):
    params = random_clt(n=3, d=8, width=5)
    out = release.write_circuit_tracer(tmp_path / "ct", params, model_name="google/gemma-3-270m")
    assert sorted(p.name for p in out.iterdir()) == ["W_dec_0.safetensors", "W_dec_1.safetensors",
                                                     "W_dec_2.safetensors", "W_enc_0.safetensors",
                                                     "W_enc_1.safetensors", "W_enc_2.safetensors",
                                                     "W_skip.safetensors", "config.yaml"]
    assert yaml.safe_load((out / "config.yaml").read_text()) == {
        "model_kind": "cross_layer_transcoder", "model_name": "google/gemma-3-270m",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}
    enc = safetensors.numpy.load_file(out / "W_enc_1.safetensors")
    assert {k: v.shape for k, v in enc.items()} == {"W_enc_1": (5, 8), "b_enc_1": (5,), "b_dec_1": (8,),
                                                    "threshold_1": (5,)}
    np.testing.assert_array_equal(enc["W_enc_1"], params["W_enc"][1].T)
    dec = safetensors.numpy.load_file(out / "W_dec_1.safetensors")["W_dec_1"]
    assert dec.shape == (5, 2, 8)
    np.testing.assert_array_equal(dec, params["W_dec"][1, :, 1:])
    back, info = release.read_circuit_tracer(out, n_layers=3)
    for key in params:
        np.testing.assert_array_equal(back[key], params[key], err_msg=key)
    assert info["format"] == "cross_layer_transcoder" and info["layers"] == [0, 1, 2] and info["affine"]
    # The dispatching reader finds and loads it; a root lists it.
    assert release.find_saes(tmp_path) == [out] and release.sae_info(out)["kind"] == "clt"
    np.testing.assert_array_equal(release.load_params(out)["W_dec"], params["W_dec"])


def test_transcoder_set_round_trips_as_a_clt_without_cross_layer_decoders(tmp_path):
    params = diagonal(random_clt(n=3, d=8, width=5, seed=2))
    out = release.write_circuit_tracer(tmp_path / "set", params, model_name="m", kind="transcoder_set")
    raw = safetensors.numpy.load_file(out / "layer_2.safetensors")
    assert {k: v.shape for k, v in raw.items()} == {"W_enc": (5, 8), "W_dec": (5, 8), "b_enc": (5,), "b_dec": (8,),
                                                    "activation_function.threshold": (5,), "W_skip": (8, 8)}
    np.testing.assert_array_equal(raw["W_skip"], params["W_skip"][2].T)  # circuit-tracer computes x @ W_skip.T
    back, info = release.read_circuit_tracer(out)
    for key in params:
        np.testing.assert_array_equal(back[key], params[key], err_msg=key)
    assert info["format"] == "transcoder_set"
    with pytest.raises(ValueError, match="no cross-layer decoders; this CLT's W_dec"):
        release.write_circuit_tracer(tmp_path / "bad", random_clt(), model_name="m", kind="transcoder_set")


def test_bad_circuit_tracer_files_name_the_file_key_and_shape(tmp_path):
    out = release.write_circuit_tracer(tmp_path / "ct", random_clt(n=3, d=8, width=5, skip=False), model_name="m")
    with pytest.raises(ValueError, match=r"3 files W_enc_<i>.safetensors numbered from 0; expected 4"):
        release.read_circuit_tracer(out, n_layers=4)
    safetensors.numpy.save_file({"W_dec_1": np.zeros((5, 3, 8), np.float32)}, out / "W_dec_1.safetensors")
    with pytest.raises(ValueError, match=r"W_dec_1.safetensors: key 'W_dec_1' has shape \(5, 3, 8\); expected "
                                         r"\(5, 2, 8\)"):
        release.read_circuit_tracer(out)
    (out / "config.yaml").write_text("model_kind: sae\n")
    with pytest.raises(ValueError, match="'model_kind' is 'sae'; expected 'cross_layer_transcoder'"):
        release.read_circuit_tracer(out)


def test_relu_clt_without_thresholds_reads_with_threshold_zero(tmp_path):
    out = release.write_circuit_tracer(tmp_path / "ct", random_clt(n=2, d=4, width=3, skip=False), model_name="m")
    for i in range(2):
        raw = safetensors.numpy.load_file(out / f"W_enc_{i}.safetensors")
        del raw[f"threshold_{i}"]
        safetensors.numpy.save_file(raw, out / f"W_enc_{i}.safetensors")
    assert not release.read_circuit_tracer(out)[0]["threshold"].any()


@pytest.mark.skipif(not pathlib.Path(CIRCUIT_TRACER_PYTHON).is_file(),
                    reason=f"no circuit-tracer venv at {CIRCUIT_TRACER_PYTHON} (set CIRCUIT_TRACER_PYTHON; README "
                           "'CLTs and crosscoders' says how to build it)")
def test_circuit_tracer_itself_loads_our_files_and_computes_our_predictions(tmp_path):
    """Our native CLT (+ skip sidecar), transcoder set and GS2 CLT, loaded by circuit-tracer 0.5.0's own loaders
    (``load_clt``, ``load_transcoder_set``, ``load_gemma_scope_2_clt``), predict what ``crosslayer.clt_predict``
    does."""
    n, d, width = 3, 8, 5
    params = random_clt(n=n, d=d, width=width, seed=4)
    params["threshold"] *= 0.5
    tset = diagonal(random_clt(n=n, d=d, width=width, seed=5))
    native = release.write_circuit_tracer(tmp_path / "native", params, model_name="m")
    set_dir = release.write_circuit_tracer(tmp_path / "set", tset, model_name="m", kind="transcoder_set")
    gs2 = release.write_clt(tmp_path / "gs2", {k: v for k, v in params.items()}, list(range(n)), n_layers=n,
                            average_l0=[1.0] * n)
    x = np.random.default_rng(6).normal(size=(n, 7, d)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = pathlib.Path(__file__).with_name("circuit_tracer_check.py")
    run = subprocess.run([CIRCUIT_TRACER_PYTHON, str(script), str(native), str(set_dir), str(gs2),
                          str(tmp_path / "x.npy"), str(tmp_path / "out.npz")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for name, p in (("native", params), ("gs2", params), ("set", tset)):
        want = np.asarray(crosslayer.clt_predict(p, x))
        # torch's and XLA's float32 sums over d (encoder), n·F (decoder) and d (skip) terms, each within
        # (terms)·u of the computation on absolute values (conftest.f32_tol)
        a = {k: np.abs(v) for k, v in p.items()}
        f_bound = np.einsum("nbd,ndf->nbf", np.abs(x), a["W_enc"]) + a["b_enc"][:, None]
        magnitude = (np.einsum("ibf,ifjd->jbd", f_bound, a["W_dec"]) + np.einsum("jbd,jde->jbe", np.abs(x), a["W_skip"])
                     + a["b_dec"][:, None]).max()
        assert np.abs(got[name] - want).max() <= f32_tol(2 * d + n * width, magnitude), name
        assert np.abs(want).max() > 1  # not a trivially small output
