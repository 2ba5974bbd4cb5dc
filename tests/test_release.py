"""Gemma Scope / SAELens release files: layout, round trip, validation errors."""

import json

import numpy as np
import pytest
import safetensors.numpy

from gemma_scope import release
from gemma_scope.sites import Site


def random_params(d=6, width=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(d, width)).astype(np.float32),
        "W_dec": rng.normal(size=(width, d)).astype(np.float32),
        "b_enc": rng.normal(size=width).astype(np.float32),
        "b_dec": rng.normal(size=d).astype(np.float32),
        "threshold": rng.uniform(0, 1, size=width).astype(np.float32),
    }


@pytest.mark.parametrize(
    "width,label",
    [(2**14, "16k"), (2**15, "32k"), (2**16, "65k"), (2**17, "131k"), (2**19, "524k"), (2**20, "1m"),
     (4096, "4k"), (1024, "1k"), (1536, "1536"), (3 * 4096, "12288"), (16, "16")],
)
def test_width_label_matches_gemma_scope_names(width, label):
    assert release.width_label(width) == label


def test_width_label_rejects_non_positive():
    with pytest.raises(ValueError, match="positive integer"):
        release.width_label(0)


def test_write_load_round_trip_in_gemma_scope_layout(tmp_path):
    params = random_params()
    path = release.write_sae(tmp_path, Site("res", 3), params, average_l0=71.6, metadata={"model_name": "gemma3_270m"})
    assert path == tmp_path / "res" / "layer_3" / "width_16" / "average_l0_72" / "params.npz"
    with np.load(path) as npz:
        assert sorted(npz.files) == sorted(release.PARAM_KEYS)
        assert all(npz[k].dtype == np.float32 for k in npz.files)
    loaded = release.load_params(path)
    for key in release.PARAM_KEYS:
        np.testing.assert_array_equal(loaded[key], params[key])
    # No temporary files are left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["cfg.json", "params.npz", "sae_weights.safetensors"]


def test_custom_site_and_float64_input_stored_as_float32(tmp_path):
    params = {k: v.astype(np.float64) for k, v in random_params(width=2**12).items()}
    path = release.write_sae(tmp_path, None, params, average_l0=5.0)
    assert path.relative_to(tmp_path).parts[:4] == ("custom", "layer_0", "width_4k", "average_l0_5")
    assert release.load_params(path)["W_enc"].dtype == np.float32


def test_saelens_files_match_saelens_jumprelu_format(tmp_path):
    params = random_params()
    path = release.write_sae(tmp_path, Site("att", 2), params, average_l0=10, metadata={"model_name": "gemma3_270m"})
    cfg = json.loads((path.parent / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert (cfg["d_in"], cfg["d_sae"]) == (6, 16)
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    assert cfg["reshape_activations"] == "hook_z"
    assert cfg["metadata"]["hook_name"] == "blocks.2.attn.hook_z"
    assert cfg["metadata"]["model_name"] == "gemma3_270m"
    weights = safetensors.numpy.load_file(path.parent / "sae_weights.safetensors")
    for key in release.PARAM_KEYS:
        np.testing.assert_array_equal(weights[key], params[key])
    loaded = release.load_params(path.parent / "sae_weights.safetensors")
    np.testing.assert_array_equal(loaded["b_enc"], params["b_enc"])


def test_saelens_apply_b_dec_to_input_is_folded(tmp_path):
    params = random_params()
    path = release.write_sae(tmp_path, Site("res", 0), params, average_l0=3)
    cfg_path = path.parent / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["apply_b_dec_to_input"] = True
    cfg_path.write_text(json.dumps(cfg))
    loaded = release.load_params(path.parent / "sae_weights.safetensors")
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_allclose(
        x @ loaded["W_enc"] + loaded["b_enc"], (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], rtol=1e-5, atol=1e-5
    )


def test_directory_path_prefers_params_npz(tmp_path):
    params = random_params()
    path = release.write_sae(tmp_path, Site("mlp", 1), params, average_l0=3)
    (path.parent / "sae_weights.safetensors").write_bytes(b"garbage")
    np.testing.assert_array_equal(release.load_params(path.parent)["W_dec"], params["W_dec"])


def write_npz(path, params):
    np.savez(path, **params)
    return path


def test_missing_key_is_named(tmp_path):
    params = random_params()
    del params["threshold"]
    path = write_npz(tmp_path / "params.npz", params)
    with pytest.raises(ValueError, match=r"params\.npz: missing key\(s\) \['threshold'\]"):
        release.load_params(path)


@pytest.mark.parametrize(
    "key,bad,expected",
    [
        ("W_dec", np.zeros((16, 5), np.float32), r"'W_dec' has shape \(16, 5\); expected \(16, 6\)"),
        ("b_enc", np.zeros(15, np.float32), r"'b_enc' has shape \(15,\); expected \(16,\)"),
        ("W_enc", np.zeros(6, np.float32), r"'W_enc' has shape \(6,\); expected 2-D"),
        ("threshold", np.full(16, -1.0, np.float32), r"'threshold' has negative entries"),
        ("b_dec", np.full(6, np.nan, np.float32), r"'b_dec' holds 6 non-finite values"),
        ("b_dec", np.zeros(6, np.int32), r"'b_dec' has dtype int32; expected a float dtype"),
    ],
)
def test_malformed_params_errors_name_file_key_and_expectation(tmp_path, key, bad, expected):
    params = random_params()
    params[key] = bad
    path = write_npz(tmp_path / "params.npz", params)
    with pytest.raises(ValueError, match=expected) as info:
        release.load_params(path)
    assert str(path) in str(info.value)


def test_unreadable_and_absent_files(tmp_path):
    (tmp_path / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read SAE parameters"):
        release.load_params(tmp_path / "params.npz")
    with pytest.raises(FileNotFoundError):
        release.load_params(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither"):
        release.load_params(tmp_path / "empty")


def test_write_rejects_bad_params_and_average_l0(tmp_path):
    params = random_params()
    with pytest.raises(ValueError, match="average_l0"):
        release.write_sae(tmp_path, None, params, average_l0=float("nan"))
    params["b_dec"] = params["b_dec"][:3]
    with pytest.raises(ValueError, match="params to write: key 'b_dec'"):
        release.write_sae(tmp_path, None, params, average_l0=1)
    assert not any(tmp_path.iterdir())
