"""Gemma Scope 2's CLT and crosscoder layouts: round trip through our writer and reader, the dispatching reader."""

import json

import numpy as np
import pytest
import safetensors.numpy

from gemma_scope import release
from gemma_scope.release import gs2_crosslayer as gs2x


def random_clt(n=3, d=8, width=5, skip=True, seed=0):
    """A CLT in ``sae.crosslayer``'s layout with its unused slots W_dec[i, :, j < i] zero."""
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(size=(n, d, width)), "b_enc": rng.normal(size=(n, width)),
              "threshold": rng.uniform(0, 1, size=(n, width)), "W_dec": rng.normal(size=(n, width, n, d)),
              "b_dec": rng.normal(size=(n, d))}
    if skip:
        params["W_skip"] = rng.normal(size=(n, d, d))
    params["W_dec"] *= np.triu(np.ones((n, n)))[:, None, :, None]
    return {k: v.astype(np.float32) for k, v in params.items()}


def random_crosscoder(n=4, d=6, width=12, block_diagonal=True, seed=1):
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(size=(n, d, width)), "b_enc": rng.normal(size=width),
              "threshold": rng.uniform(0, 1, size=width), "W_dec": rng.normal(size=(width, n, d)),
              "b_dec": rng.normal(size=(n, d))}
    if block_diagonal:
        blocks = np.array_split(np.arange(width), n)
        mask = np.zeros((n, 1, width))
        for k, block in enumerate(blocks):
            mask[k, 0, block] = 1
        params["W_enc"] *= mask
    return {k: v.astype(np.float32) for k, v in params.items()}


def test_clt_of_some_layers_round_trips_and_files_hold_gs2_slots(tmp_path):
    params = random_clt()
    layers = [1, 3, 4]
    out = release.write_clt(tmp_path, params, layers, n_layers=6, average_l0=[40.0, 50.0, 60.0],
                            metadata={"model_name": "google/gemma-3-270m", "seed": np.int64(3)})
    assert out == tmp_path / "clt" / "layer_1_3_4_width_15_l0_medium_affine"
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] + [f"params_layer_{i}.safetensors" for i in layers]
    raw = safetensors.numpy.load_file(out / "params_layer_3.safetensors")
    assert {k: v.shape for k, v in raw.items()} == {"w_enc": (8, 5), "b_enc": (5,), "threshold": (5,),
                                                    "w_dec": (5, 6, 8), "b_dec": (8,),
                                                    "affine_skip_connection": (8, 8)}
    np.testing.assert_array_equal(raw["w_dec"][:, 3], params["W_dec"][1, :, 1])
    np.testing.assert_array_equal(raw["w_dec"][:, 4], params["W_dec"][1, :, 2])
    assert not raw["w_dec"][:, [0, 1, 2, 5]].any()  # below the source layer, and layer 5 (not covered)
    np.testing.assert_array_equal(raw["b_dec"], params["b_dec"][1])
    config = json.loads((out / "config.json").read_text())
    assert config["type"] == "clt" and config["layers"] == layers and config["n_layers"] == 6
    assert config["width"] == 15 and config["l0"] == 50 and config["affine_connection"] is True
    assert config["hf_hook_point_in"] == "model.layers.{layer}.pre_feedforward_layernorm.output"
    assert config["model_name"] == "google/gemma-3-270m" and config["seed"] == 3
    back, info = release.read_clt(out)
    assert sorted(back) == sorted(params)
    for key in params:
        np.testing.assert_array_equal(back[key], params[key], err_msg=key)
    assert info["layers"] == layers and info["n_layers"] == 6 and info["affine"] is True
    assert info["average_l0"] == [40.0, 50.0, 60.0]


def test_clt_of_all_layers_drops_unused_slots_and_reads_through_the_dispatcher(tmp_path):
    params = random_clt(skip=False)
    params["W_dec"][2, :, 0] = 7.0  # an unused slot (j < i): crosslayer masks it; the file holds zero
    out = release.write_clt(tmp_path, params, [0, 1, 2], n_layers=3, average_l0=[100.0, 120.0, 110.0], metadata={})
    assert out.name == "width_15_l0_big"
    assert release.find_saes(tmp_path) == [out] and release.find_saes(out) == [out]
    assert release.find_saes(out / "params_layer_1.safetensors") == [out]
    info = release.sae_info(out)
    assert info == {"site": "mlp_in.0", "site_out": "mlp.0", "l0_coefficient": None, "target_l0": None,
                    "kind": "clt", "layers": [0, 1, 2]}
    with pytest.raises(ValueError, match=r"is a clt \(several layers\); this command takes one SAE or transcoder"):
        release.load_sae(out, None)  # browse / steer
    back = release.load_params(out)
    assert back["W_dec"][2, :, 0].max() == 0
    params["W_dec"][2, :, 0] = 0
    for key in params:
        np.testing.assert_array_equal(back[key], params[key], err_msg=key)


@pytest.mark.parametrize("block_diagonal", [True, False])
def test_crosscoder_round_trips_in_gs2_blocks(tmp_path, block_diagonal):
    params = random_crosscoder(block_diagonal=block_diagonal)
    out = release.write_crosscoder(tmp_path, params, [7, 13, 17, 22], average_l0=45.2,
                                   metadata={"model_name": "google/gemma-3-1b-pt"})
    assert out == tmp_path / "crosscoder" / "layer_7_13_17_22_width_12_l0_medium"
    raw = safetensors.numpy.load_file(out / "params_layer_2.safetensors")
    expected = {"w_enc": (6, 3), "b_enc": (3,), "threshold": (3,), "w_dec": (3, 4, 6), "b_dec": (6,)}
    if not block_diagonal:
        expected["w_enc_all_layers"] = (4, 6, 3)
    assert {k: v.shape for k, v in raw.items()} == expected
    np.testing.assert_array_equal(raw["w_enc"], params["W_enc"][2][:, 6:9])  # block 2 = latents 6..8, layer 17
    np.testing.assert_array_equal(raw["b_dec"], params["b_dec"][2])
    assert json.loads((out / "config.json").read_text())["encoder"] == ("per_layer" if block_diagonal
                                                                       else "all_layers")
    back, info = release.read_crosscoder(out)
    for key in params:
        np.testing.assert_array_equal(back[key], params[key], err_msg=key)
    assert info["layers"] == [7, 13, 17, 22] and info["width"] == 12 and info["average_l0"] == 45.2
    assert release.sae_info(out)["kind"] == "crosscoder" and release.sae_info(out)["site"] == "res.7"


def test_a_release_root_lists_saes_clts_and_crosscoders(tmp_path):
    rng = np.random.default_rng(0)
    sae = {"W_enc": rng.normal(size=(8, 4)), "W_dec": rng.normal(size=(4, 8)), "b_enc": np.zeros(4),
           "b_dec": np.zeros(8), "threshold": np.zeros(4)}
    from gemma_scope.sites import Site
    sae_file = release.write_gs2(tmp_path, Site("res", 1), sae, 20.0, model_name="m")
    clt = release.write_clt(tmp_path, random_clt(skip=False), [0, 1, 2], n_layers=3, average_l0=[5, 5, 5])
    cc = release.write_crosscoder(tmp_path, random_crosscoder(d=8), [0, 1, 2, 3], average_l0=5)
    assert release.find_saes(tmp_path) == sorted([sae_file, clt, cc])
    assert gs2x.crosslayer_layers(cc) == [0, 1, 2, 3]


def test_writers_refuse_bad_params(tmp_path):
    params = random_clt()
    with pytest.raises(ValueError, match=r"key 'W_dec' has shape \(3, 5, 2, 8\); expected \(3, 5, 3, 8\)"):
        release.write_clt(tmp_path, params | {"W_dec": params["W_dec"][:, :, :2]}, [0, 1, 2], n_layers=3,
                          average_l0=[1, 1, 1])
    with pytest.raises(ValueError, match="outside a model of n_layers=3"):
        release.write_clt(tmp_path, params, [0, 1, 3], n_layers=3, average_l0=[1, 1, 1])
    with pytest.raises(ValueError, match="one per covered layer"):
        release.write_clt(tmp_path, params, [0, 1, 2], n_layers=3, average_l0=[1, 1])
    with pytest.raises(ValueError, match=r"metadata keys \['layers'\]"):
        release.write_clt(tmp_path, params, [0, 1, 2], n_layers=3, average_l0=[1, 1, 1], metadata={"layers": 1})
    assert not (tmp_path / "clt").exists()


def rewrite(file, **changes):
    """Rewrites one safetensors file with some arrays replaced (None deletes the key)."""
    raw = safetensors.numpy.load_file(file)
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = np.asarray(value, np.float32)
    safetensors.numpy.save_file(raw, file)


@pytest.mark.parametrize("change,message", [
    # the layer axis of w_dec does not match the model's 6 layers
    (lambda f: rewrite(f, w_dec=np.zeros((5, 7, 8))),
     r"params_layer_3.safetensors: key 'w_dec' has shape \(5, 7, 8\); expected \(5, 6, 8\)"),
    # shapes disagree with the first file's w_enc
    (lambda f: rewrite(f, b_enc=np.zeros(4)), r"params_layer_3.safetensors: key 'b_enc' has shape \(4,\); expected "
                                              r"\(5,\) \(d_model=8, width=5 from params_layer_1.safetensors"),
    (lambda f: rewrite(f, w_enc=np.zeros((8, 4))), r"params_layer_3.safetensors: key 'w_enc' has shape \(8, 4\)"),
    (lambda f: rewrite(f, threshold=None), r"params_layer_3.safetensors: missing key 'threshold'; expected shape "
                                           r"\(5,\)"),
    (lambda f: rewrite(f, affine_skip_connection=None), r"params_layer_3.safetensors: missing key "
                                                        r"'affine_skip_connection'; expected shape \(8, 8\)"),
    (lambda f: rewrite(f, b_dec=np.full(8, np.nan)), r"params_layer_3.safetensors: key 'b_dec' \(8,\) holds 8 "
                                                     r"non-finite values"),
    # weights below the source layer (3) are non-zero
    (lambda f: rewrite(f, w_dec=np.eye(5, 6 * 8).reshape(5, 6, 8)),
     r"params_layer_3.safetensors: key 'w_dec' \(5, 6, 8\) has non-zero slots below source layer 3 \(max \|w\| 1\); "
     r"expected w_dec\[:, :3, :\] zero"),
    # a decoder to layer 5, which the CLT does not cover
    (lambda f: rewrite(f, w_dec=np.ones((5, 6, 8)) * (np.arange(6) == 5)[None, :, None]),
     r"params_layer_3.safetensors: key 'w_dec' writes to layers \[5\], which have no params_layer file"),
])
def test_bad_gs2_clt_files_name_the_file_key_and_expected_shape(tmp_path, change, message):
    out = release.write_clt(tmp_path, random_clt(), [1, 3, 4], n_layers=6, average_l0=[40.0, 50.0, 60.0])
    change(out / "params_layer_3.safetensors")
    with pytest.raises(ValueError, match=message):
        release.read_clt(out, n_layers=6)


def test_gs2_clt_against_the_model_and_its_config(tmp_path):
    out = release.write_clt(tmp_path, random_clt(), [1, 3, 4], n_layers=6, average_l0=[40.0, 50.0, 60.0])
    with pytest.raises(ValueError, match=r"config.json: 'n_layers' is 6; expected 18 \(the model's\)"):
        release.read_clt(out, n_layers=18)
    (out / "config.json").unlink()  # without its config, the files' layer axis is checked against the model's
    with pytest.raises(ValueError, match=r"params_layer_1.safetensors: key 'w_dec' has shape \(5, 6, 8\); expected "
                                         r"\(5, 18, 8\)"):
        release.read_clt(out, n_layers=18)
    assert release.sae_info(out)["kind"] == "clt"  # no config.json: the folder above, clt/, says what it is
    (tmp_path / "elsewhere").mkdir()
    moved = out.rename(tmp_path / "elsewhere" / out.name)
    with pytest.raises(ValueError, match="cannot tell a CLT from a crosscoder: config.json 'type' is None and the "
                                         "folder above is 'elsewhere'"):
        release.load_params(moved)


def test_bad_gs2_crosscoder_files(tmp_path):
    out = release.write_crosscoder(tmp_path, random_crosscoder(), [7, 13, 17, 22], average_l0=45.0)
    rewrite(out / "params_layer_1.safetensors", w_dec=np.zeros((3, 5, 6)))
    with pytest.raises(ValueError, match=r"params_layer_1.safetensors: key 'w_dec' has shape \(3, 5, 6\); expected "
                                         r"\(3, 4, 6\)"):
        release.read_crosscoder(out)
    (out / "params_layer_3.safetensors").rename(out / "params_layer_4.safetensors")
    with pytest.raises(ValueError, match=r"numbered \[0, 1, 2, 4\]; expected params_layer_0 .. params_layer_3"):
        release.read_crosscoder(out)


def test_gs2_config_naming_type_transcoder_and_a_rounded_width_still_reads_by_its_folder(tmp_path):
    params = random_clt(skip=False)
    out = release.write_clt(tmp_path, params, [0, 1, 2], n_layers=3, average_l0=[5, 5, 5])
    (out / "config.json").write_text(json.dumps({"architecture": "jump_relu", "type": "transcoder", "width": 16,
                                                 "affine_connection": False}))
    assert release.sae_info(out)["kind"] == "clt"
    np.testing.assert_array_equal(release.load_params(out)["W_enc"], params["W_enc"])
