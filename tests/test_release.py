"""Gemma Scope / SAELens release files: layout, round trip, validation errors."""

import json

import numpy as np
import pytest
import safetensors.numpy
from conftest import f32_tol

from gemma_scope import release
from gemma_scope.release import gs2 as release_gs2
from gemma_scope.release import params as release_params
from gemma_scope.sae import PARAM_KEYS
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
    assert release_params.width_label(width) == label


def test_width_label_rejects_non_positive():
    with pytest.raises(ValueError, match="positive integer"):
        release_params.width_label(0)


def test_write_load_round_trip_in_gemma_scope_layout(tmp_path):
    params = random_params()
    path = release.write_sae(tmp_path, Site("res", 3), params, average_l0=71.6, metadata={"model_name": "gemma3_270m"})
    assert path == tmp_path / "res" / "layer_3" / "width_16" / "average_l0_72" / "params.npz"
    with np.load(path) as npz:
        assert sorted(npz.files) == sorted(PARAM_KEYS)
        assert all(npz[k].dtype == np.float32 for k in npz.files)
    loaded = release.load_params(path)
    for key in PARAM_KEYS:
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
    assert cfg["metadata"]["model_name"] == "google/gemma-3-270m"  # TransformerLens' name of our model
    assert cfg["metadata"]["gemma_scope_model"] == "gemma3_270m"
    weights = safetensors.numpy.load_file(path.parent / "sae_weights.safetensors")
    for key in PARAM_KEYS:
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
    # dot products over d = 6 (b_dec @ W_enc folded into b_enc, then x @ W_enc) and two additions
    magnitude = ((np.abs(x) + np.abs(params["b_dec"])) @ np.abs(params["W_enc"]) + np.abs(params["b_enc"])).max()
    np.testing.assert_allclose(
        x @ loaded["W_enc"] + loaded["b_enc"], (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], rtol=0,
        atol=f32_tol(2 * 6 + 2, magnitude)
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
    with pytest.raises(FileNotFoundError, match="holds none of"):
        release.load_params(tmp_path / "empty")


def test_write_rejects_bad_params_and_average_l0(tmp_path):
    params = random_params()
    with pytest.raises(ValueError, match="average_l0"):
        release.write_sae(tmp_path, None, params, average_l0=float("nan"))
    params["b_dec"] = params["b_dec"][:3]
    with pytest.raises(ValueError, match="params to write: key 'b_dec'"):
        release.write_sae(tmp_path, None, params, average_l0=1)
    assert not any(tmp_path.iterdir())


# Gemma Scope 2 layout


def random_transcoder(d_in=6, d_out=5, width=16, seed=0, affine=True):
    rng = np.random.default_rng(seed)
    params = dict(random_params(d_in, width, seed), W_dec=rng.normal(size=(width, d_out)).astype(np.float32),
                  b_dec=rng.normal(size=d_out).astype(np.float32))
    if affine:
        params["W_skip"] = rng.normal(size=(d_in, d_out)).astype(np.float32)
    return params


@pytest.mark.parametrize("l0,bucket", [(0, "small"), (5, "small"), (10, "small"), (20, "small"), (24.4, "small"),
                                       (24.5, "medium"), (30, "medium"), (60, "medium"), (73.4, "medium"),
                                       (73.5, "big"), (90, "big"), (150, "big"), (900, "big")])
def test_l0_bucket_bands_and_the_log_midpoints_between_them(l0, bucket):
    assert release_gs2.l0_bucket(l0) == bucket


def test_gs2_labels_name_per_bucket_the_l0_nearest_its_centre():
    # centres: small √200 ≈ 14.1, medium √1800 ≈ 42.4, big √13500 ≈ 116.2
    assert release_gs2.gs2_labels([8.0, 13.0, 22.0, 35.0, 50.0, 200.0, 120.4]) == [
        "8", "small", "22", "35", "medium", "200", "big"]
    assert release_gs2.gs2_labels([0.0, 3.0]) == ["0", "small"]
    assert release_gs2.gs2_labels([]) == []


def test_l0_bucket_rejects_negative_and_nan():
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="average_l0"):
            release_gs2.l0_bucket(bad)


@pytest.mark.parametrize("kind,folder,point", [("res", "resid_post_all", "model.layers.3.output"),
                                               ("att", "attn_out_all", "model.layers.3.self_attn.o_proj.input"),
                                               ("mlp", "mlp_out_all", "model.layers.3.post_feedforward_layernorm.output")])
def test_gs2_sae_round_trip_is_bitwise(tmp_path, kind, folder, point):
    params = random_params(width=2**14)
    path = release_gs2.write_gs2(tmp_path, Site(kind, 3), params, average_l0=41.6, model_name="google/gemma-3-270m-pt")
    assert path == tmp_path / folder / "layer_3_width_16k_l0_medium" / "params.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "params.safetensors"]
    config = json.loads((path.parent / "config.json").read_text())
    assert config == {"hf_hook_point_in": point, "hf_hook_point_out": point, "width": 2**14,
                      "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 42,
                      "affine_connection": False, "type": "sae"}
    assert list(config) == list(release_gs2.GS2_CONFIG_KEYS)
    tensors = safetensors.numpy.load_file(path)
    assert sorted(tensors) == ["b_dec", "b_enc", "threshold", "w_dec", "w_enc"]
    assert all(v.dtype == np.float32 for v in tensors.values())
    for loaded in (release.load_params(path), release.load_params(path.parent)):
        assert sorted(loaded) == sorted(PARAM_KEYS)
        for key in PARAM_KEYS:
            assert loaded[key].tobytes() == params[key].tobytes()
    assert release.sae_info(path) == {"site": f"{kind}.3", "site_out": f"{kind}.3", "l0_coefficient": None,
        "target_l0": None}


@pytest.mark.parametrize("affine", [False, True])
def test_gs2_transcoder_round_trip_is_bitwise(tmp_path, affine):
    params = random_transcoder(affine=affine)
    path = release_gs2.write_gs2(tmp_path, Site("mlp_in", 7), params, average_l0=12, model_name="m",
                             site_out=Site("mlp", 7))
    name = "layer_7_width_16_l0_small" + ("_affine" if affine else "")
    assert path == tmp_path / "transcoder_all" / name / "params.safetensors"
    config = json.loads((path.parent / "config.json").read_text())
    assert config["hf_hook_point_in"] == "model.layers.7.pre_feedforward_layernorm.output"
    assert config["hf_hook_point_out"] == "model.layers.7.post_feedforward_layernorm.output"
    assert (config["type"], config["affine_connection"], config["l0"]) == ("transcoder", affine, 12)
    assert ("affine_skip_connection" in safetensors.numpy.load_file(path)) == affine
    loaded = release.load_params(path)
    assert sorted(loaded) == sorted(params)
    for key, value in params.items():
        assert loaded[key].tobytes() == value.tobytes()
    assert release.sae_info(path) == {"site": "mlp_in.7", "site_out": "mlp.7", "l0_coefficient": None,
        "target_l0": None}


def test_write_gs2_with_a_sweep_label(tmp_path):
    path = release_gs2.write_gs2(tmp_path, Site("res", 1), random_params(), 37.2, model_name="m", l0_label="37")
    assert path.parent.name == "layer_1_width_16_l0_37"
    assert json.loads((path.parent / "config.json").read_text())["l0"] == 37


def test_write_gs2_rejects_what_gs2_has_no_layout_for(tmp_path):
    with pytest.raises(ValueError, match="no layout for SAEs on mlp_in.2"):
        release_gs2.write_gs2(tmp_path, Site("mlp_in", 2), random_params(), 20, model_name="m")
    with pytest.raises(ValueError, match="reads mlp_in.L and predicts mlp.L; got res.2 -> mlp.2"):
        release_gs2.write_gs2(tmp_path, Site("res", 2), random_transcoder(), 20, model_name="m", site_out=Site("mlp", 2))
    with pytest.raises(ValueError, match="got mlp_in.2 -> mlp.3"):
        release_gs2.write_gs2(tmp_path, Site("mlp_in", 2), random_transcoder(), 20, model_name="m", site_out=Site("mlp", 3))
    sae_with_skip = dict(random_params(), W_skip=np.zeros((6, 6), np.float32))
    with pytest.raises(ValueError, match="'W_skip' is an affine skip connection; expected one only in a transcoder"):
        release_gs2.write_gs2(tmp_path, Site("res", 2), sae_with_skip, 20, model_name="m")
    with pytest.raises(ValueError, match="'W_skip' is an affine skip connection"):
        release.write_sae(tmp_path, Site("res", 2), sae_with_skip, 20)
    assert not any(tmp_path.iterdir())


def write_gs2_by_hand(folder, params, hook_in, hook_out=None, kind="sae"):
    """Gemma Scope 2's files from its published key names alone (independent of release.py)."""
    folder.mkdir(parents=True)
    names = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
             "W_skip": "affine_skip_connection"}
    safetensors.numpy.save_file({names[k]: v for k, v in params.items()}, folder / "params.safetensors")
    config = {"hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out or hook_in,
              "width": params["W_enc"].shape[1], "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu",
              "l0": 20, "affine_connection": "W_skip" in params, "type": kind}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hand_written_gs2_directories_load(tmp_path):
    sae = random_params()
    folder = write_gs2_by_hand(tmp_path / "resid_post_all" / "layer_5_width_16_l0_small", sae, "model.layers.5.output")
    loaded = release.load_params(folder)
    for key in PARAM_KEYS:
        np.testing.assert_array_equal(loaded[key], sae[key])
    transcoder = random_transcoder()
    folder = write_gs2_by_hand(tmp_path / "transcoder_all" / "layer_5_width_16_l0_small_affine", transcoder,
                               "model.layers.5.pre_feedforward_layernorm.output",
                               "model.layers.5.post_feedforward_layernorm.output", kind="transcoder")
    loaded = release.load_params(folder)
    for key in transcoder:
        np.testing.assert_array_equal(loaded[key], transcoder[key])
    assert release.sae_info(folder / "params.safetensors")["site_out"] == "mlp.5"
    assert release.find_saes(tmp_path) == sorted(tmp_path.rglob("params.safetensors"))


def gs2_transcoder_dir(tmp_path, **changes):
    """A hand-written affine GS2 transcoder with ``changes``: tensors (None drops one) and config keys."""
    params = {k: v for k, v in dict(random_transcoder(), **changes.pop("tensors", {})).items() if v is not None}
    folder = write_gs2_by_hand(tmp_path / "t", params, "model.layers.1.pre_feedforward_layernorm.output",
                               "model.layers.1.post_feedforward_layernorm.output", kind="transcoder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, **changes)))
    return folder


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"tensors": {"threshold": None}}, r"params\.safetensors: missing key\(s\) \['threshold'\]"),
        ({"tensors": {"b_dec": np.zeros(6, np.float32)}}, r"key 'b_dec' has shape \(6,\); expected \(5,\)"),
        ({"tensors": {"W_dec": np.zeros(16, np.float32)}}, r"key 'w_dec' has shape \(16,\); expected 2-D"),
        ({"tensors": {"W_skip": np.zeros((5, 5), np.float32)}},
         r"key 'affine_skip_connection' has shape \(5, 5\); expected \(6, 5\)"),
        ({"tensors": {"W_enc": np.zeros((6, 16), np.int32)}}, r"key 'w_enc' has dtype int32"),
        ({"tensors": {"threshold": np.full(16, -1, np.float32)}}, r"key 'threshold' has negative entries"),
        ({"affine_connection": False}, r"'affine_connection' is False but params.safetensors holds "
                                       r"'affine_skip_connection'"),
        ({"tensors": {"W_skip": None}, "affine_connection": True}, r"'affine_connection' is True but params.safetensors lacks"),
        ({"width": 32}, r"'width' is 32; expected 16"),
        ({"architecture": "topk"}, r"'architecture' is 'topk'; expected one of \['jump_relu'\]"),
        ({"type": "clt"}, r"'type' is 'clt'; expected one of \['sae', 'transcoder'\]"),
        ({"hf_hook_point_in": "model.layers.1.mlp.input"}, r"'hf_hook_point_in' is 'model.layers.1.mlp.input'"),
        ({"hf_hook_point_in": "model.layers.1.output"}, r"a GS2 transcoder reading 'model.layers.1.output'"),
        ({"hf_hook_point_out": "model.layers.2.post_feedforward_layernorm.output"},
         r"writes 'model.layers.2.post_feedforward_layernorm.output'; expected hook points"),
    ],
)
def test_malformed_gs2_errors_name_the_key(tmp_path, changes, expected):
    folder = gs2_transcoder_dir(tmp_path, **changes)
    with pytest.raises(ValueError, match=expected) as info:
        release.load_params(folder)
    assert str(folder) in str(info.value)


def test_gs2_config_missing_or_not_json(tmp_path):
    folder = gs2_transcoder_dir(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        release.load_params(folder)
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        release.sae_info(folder / "params.safetensors")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        release.load_params(folder)
    (folder / "params.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read SAE parameters"):
        release.load_params(folder)


@pytest.mark.parametrize(
    "changes,expected",
    [
        ("{", r"cfg\.json: not valid JSON"),
        ({"architecture": "topk"}, r"cfg\.json: architecture 'topk'; only 'jumprelu'"),
        ({"d_sae": 32}, r"cfg\.json: d_sae=32 disagrees with the weights' 16"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations="),
    ],
)
def test_malformed_saelens_directory_errors_name_the_key(tmp_path, changes, expected):
    path = release.write_sae(tmp_path, Site("res", 0), random_params(), average_l0=3)
    (path.parent / "params.npz").unlink()  # the directory is then a SAELens one
    cfg_path = path.parent / "cfg.json"
    text = changes if isinstance(changes, str) else json.dumps(dict(json.loads(cfg_path.read_text()), **changes))
    cfg_path.write_text(text)
    with pytest.raises(ValueError, match=expected):
        release.load_params(path.parent)
