"""CLT and crosscoder evaluation (evaluation.crosslayer) on a tiny random Gemma: against per-layer transcoders,
against direct computation, identity dictionaries, the command line, and files that do not fit the model."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import PASS_TOL, nll_tol
from test_evaluate import random_transcoder

from gemma_scope import evaluate, release, sae
from gemma_scope.evaluation import crosslayer, releases, splice
from gemma_scope.sites import Site

LAYERS = (1, 3)


def clt_of(transcoders, cross=None):
    """A CLT whose diagonal decoders are the transcoders' (W_dec[i, :, i]) and whose later-layer decoders are
    ``cross`` (default zero)."""
    n, (width, d) = len(transcoders), transcoders[0]["W_dec"].shape
    w_dec = np.zeros((n, width, n, d), np.float32)
    for i, tc in enumerate(transcoders):
        w_dec[i, :, i] = tc["W_dec"]
        for j in range(i + 1, n):
            w_dec[i, :, j] = 0 if cross is None else cross[i, :, j]
    stack = lambda key: np.stack([tc[key] for tc in transcoders])  # noqa: E731
    return {"W_enc": stack("W_enc"), "b_enc": stack("b_enc"), "threshold": stack("threshold"), "W_dec": w_dec,
            "b_dec": stack("b_dec"), "W_skip": stack("W_skip")}


def nll_with(params, cfg, tokens, mask, hooks):
    from gemma_scope import model

    nll = np.asarray(model.token_nll(params, cfg, jnp.asarray(tokens), hooks))
    return nll[mask[:, 1:]].mean()


def test_clt_without_cross_layer_decoders_equals_its_transcoders(tiny_gemma):
    params, cfg, tokens, mask = tiny_gemma
    d = cfg.d_model
    tcs = [random_transcoder(d, d, seed=s) for s in (5, 6)]
    got = crosslayer.evaluate_crosslayer(params, cfg, tokens, mask, clt_of(tcs), LAYERS, "clt", batch_size=2,
                                         progress=False)
    assert [r["replaced"] for r in got] == [[1, 3], [1], [3]]
    # All covered layers replaced at once by per-layer transcoders reading the same pass's mlp_in.
    seen = {}
    hooks = {}
    for layer, tc in zip(LAYERS, tcs):
        hooks[Site("mlp_in", layer)] = lambda act, layer=layer: seen.__setitem__(layer, act) or act
        hooks[Site("mlp", layer)] = lambda act, layer=layer, tc=tc: jnp.where(
            mask[..., None], sae.predict(tc, seen[layer].reshape(-1, d)).reshape(act.shape), act)
    together = nll_with(params, cfg, tokens, mask, hooks)
    tol = nll_tol(cfg.vocab_size, 1.0)  # passes compiled apart; logits of this random tiny model stay below 1
    np.testing.assert_allclose(got[0]["spliced_loss"], together, rtol=0, atol=tol)
    zero = nll_with(params, cfg, tokens, mask, {Site("mlp", x): lambda a: jnp.where(mask[..., None], 0.0, a)
                                                for x in LAYERS})
    np.testing.assert_allclose(got[0]["zero_ablation_loss"], zero, rtol=0, atol=tol)
    assert abs(got[0]["delta_lm_loss"] - got[1]["delta_lm_loss"]) > 10 * tol  # two layers differ from one
    # Each layer alone is exactly the transcoder spliced alone (splice.evaluate_grid).
    l0s = []
    for layer, tc, record in zip(LAYERS, tcs, got[1:]):
        alone = splice.evaluate_grid(params, cfg, tokens, mask, [(Site("mlp_in", layer), tc, Site("mlp", layer))],
                                     batch_size=2, progress=False)[0]
        for key in ("clean_loss", "spliced_loss", "zero_ablation_loss", "fvu", "mse"):
            np.testing.assert_allclose(record[key], alone[key], rtol=PASS_TOL, atol=tol, err_msg=f"{layer} {key}")
        l0s.append(alone["l0"])
    np.testing.assert_allclose(got[0]["l0_by_layer"], l0s, rtol=1e-6)
    np.testing.assert_allclose(got[0]["l0"], sum(l0s), rtol=1e-6)
    np.testing.assert_allclose(got[2]["l0"], sum(l0s), rtol=1e-6)  # layer 3 hears the latents of layers 1 and 3


def test_several_dictionaries_evaluated_together_equal_each_alone_with_per_sequence_sums(tiny_gemma):
    """``evaluate_crosslayers`` shares the clean and zero-ablation passes: each dictionary's records equal
    ``evaluate_crosslayer``'s of it alone, and the per-sequence sums add up to the pooled losses."""
    params, cfg, tokens, mask = tiny_gemma
    d = cfg.d_model
    clts = [clt_of([random_transcoder(d, d, seed=s) for s in seeds]) for seeds in ((5, 6), (7, 8))]
    clts[1].pop("W_skip")
    both = crosslayer.evaluate_crosslayers(params, cfg, tokens, mask, clts, LAYERS, "clt", per_layer=False,
                                           batch_size=2, progress=False)
    tol = nll_tol(cfg.vocab_size, 1.0)
    for clt, together in zip(clts, both):
        alone = crosslayer.evaluate_crosslayer(params, cfg, tokens, mask, clt, LAYERS, "clt", per_layer=False,
                                               batch_size=2, progress=False)
        assert len(together) == len(alone) == 1
        for a, b in zip(together, alone):
            for key in ("clean_loss", "spliced_loss", "zero_ablation_loss", "fvu", "l0"):
                np.testing.assert_allclose(a[key], b[key], rtol=PASS_TOL, atol=tol, err_msg=key)
        seq = together[0]["by_sequence"]
        np.testing.assert_array_equal(seq["n_targets"], mask[:, 1:].sum(1))
        for key, nll in (("clean_loss", "clean_nll"), ("spliced_loss", "spliced_nll"), ("zero_ablation_loss",
                                                                                          "zero_nll")):
            np.testing.assert_allclose(seq[nll].sum() / seq["n_targets"].sum(), together[0][key], rtol=1e-12)
    assert abs(both[0][0]["delta_lm_loss"] - both[1][0]["delta_lm_loss"]) > 10 * tol  # two different CLTs


def test_clt_replacement_model_reads_its_own_mlp_inputs(tiny_gemma):
    """With cross-layer decoders, layer 3's prediction uses layer 1's latents from the replacement model's
    mlp_in.1 (upstream of any replacement) and layer 3's from its replaced-upstream mlp_in.3."""
    params, cfg, tokens, mask = tiny_gemma
    d = cfg.d_model
    tcs = [random_transcoder(d, d, seed=s) for s in (7, 8)]
    cross = np.random.default_rng(9).normal(size=(2, 16, 2, d)).astype(np.float32)
    clt = clt_of(tcs, cross)
    got = crosslayer.evaluate_crosslayer(params, cfg, tokens, mask, clt, LAYERS, "clt", batch_size=2,
                                         per_layer=False, progress=False)
    assert len(got) == 1
    seen = {}

    def enc(tc, x):
        return sae.encode(tc, x.reshape(-1, d))

    def out(j, act):
        y = sae.predict(tcs[j], seen[j].reshape(-1, d))
        if j == 1:
            y = y + enc(tcs[0], seen[0]) @ cross[0, :, 1]
        return jnp.where(mask[..., None], y.reshape(act.shape), act)

    hooks = {Site("mlp_in", 1): lambda a: seen.__setitem__(0, a) or a, Site("mlp", 1): lambda a: out(0, a),
             Site("mlp_in", 3): lambda a: seen.__setitem__(1, a) or a, Site("mlp", 3): lambda a: out(1, a)}
    np.testing.assert_allclose(got[0]["spliced_loss"], nll_with(params, cfg, tokens, mask, hooks), rtol=0,
                               atol=nll_tol(cfg.vocab_size, 1.0))
    # FVU per layer on the clean activations, against numpy.
    from gemma_scope import model

    acts = model.forward(params, cfg, jnp.asarray(tokens), capture=[Site(k, x) for k in ("mlp_in", "mlp")
                                                                    for x in LAYERS]).acts
    x = [np.asarray(acts[Site("mlp_in", layer)])[mask] for layer in LAYERS]
    y = [np.asarray(acts[Site("mlp", layer)])[mask] for layer in LAYERS]
    f = [np.asarray(enc(tc, xi)) for tc, xi in zip(tcs, x)]
    pred = [f[0] @ tcs[0]["W_dec"] + tcs[0]["b_dec"] + x[0] @ tcs[0]["W_skip"],
            f[1] @ tcs[1]["W_dec"] + f[0] @ cross[0, :, 1] + tcs[1]["b_dec"] + x[1] @ tcs[1]["W_skip"]]
    mse = [np.mean(np.sum((yi - pi) ** 2, -1)) for yi, pi in zip(y, pred)]
    var = [np.mean(np.sum((yi - yi.mean(0)) ** 2, -1)) for yi in y]
    np.testing.assert_allclose(got[0]["fvu_by_layer"], np.array(mse) / var, rtol=1e-4)
    np.testing.assert_allclose(got[0]["fvu"], sum(mse) / sum(var), rtol=1e-4)


def identity_crosscoder(n, d):
    """Block k's latents relu(±x_k) read res.l_k alone and write it back: reconstructs every layer exactly."""
    eye = np.eye(d, dtype=np.float32)
    w_enc, w_dec = np.zeros((n, d, 2 * n * d), np.float32), np.zeros((2 * n * d, n, d), np.float32)
    for k in range(n):
        w_enc[k, :, 2 * k * d : 2 * (k + 1) * d] = np.concatenate([eye, -eye], 1)
        w_dec[2 * k * d : 2 * (k + 1) * d, k] = np.concatenate([eye, -eye], 0)
    return {"W_enc": w_enc, "b_enc": np.zeros(2 * n * d, np.float32), "threshold": np.zeros(2 * n * d, np.float32),
            "W_dec": w_dec, "b_dec": np.zeros((n, d), np.float32)}


def test_identity_crosscoder_gives_zero_delta_and_a_random_one_matches_direct_computation(tiny_gemma):
    params, cfg, tokens, mask = tiny_gemma
    d, tol = cfg.d_model, nll_tol(cfg.vocab_size, 1.0)
    got = crosslayer.evaluate_crosslayer(params, cfg, tokens, mask, identity_crosscoder(2, d), LAYERS, "crosscoder",
                                         batch_size=2, progress=False)
    for record in got:
        assert abs(record["delta_lm_loss"]) < tol and record["fvu"] < PASS_TOL**2, record["replaced"]
        assert record["zero_ablation_loss"] - record["clean_loss"] > 1e-3
    assert got[0]["l0_by_layer"] == [got[0]["l0"]] and got[0]["dead_fraction"] < 1
    rng = np.random.default_rng(3)
    cc = {"W_enc": rng.normal(size=(2, d, 24)) / 8, "b_enc": rng.normal(size=24), "threshold": rng.uniform(0, 1, 24),
          "W_dec": rng.normal(size=(24, 2, d)), "b_dec": rng.normal(size=(2, d))}
    cc = {k: v.astype(np.float32) for k, v in cc.items()}
    got = crosslayer.evaluate_crosslayer(params, cfg, tokens, mask, cc, LAYERS, "crosscoder", batch_size=2,
                                         progress=False)
    from gemma_scope import model

    clean = model.forward(params, cfg, jnp.asarray(tokens), capture=[Site("res", x) for x in LAYERS]).acts
    x = jnp.stack([clean[Site("res", layer)].reshape(-1, d) for layer in LAYERS])
    recon = np.asarray(sae.crosslayer.crosscoder_predict(cc, x)).reshape(2, *tokens.shape, d)
    setter = lambda k: lambda a: jnp.where(mask[..., None], recon[k], a)  # noqa: E731
    want = {(1, 3): {Site("res", 1): setter(0), Site("res", 3): setter(1)}, (1,): {Site("res", 1): setter(0)},
            (3,): {Site("res", 3): setter(1)}}
    for record in got:
        np.testing.assert_allclose(record["spliced_loss"], nll_with(params, cfg, tokens, mask,
                                                                    want[tuple(record["replaced"])]), rtol=0, atol=tol)
    # Overwriting res.3 screens off res.1 at the content positions; the only non-content positions here are BOS
    # (attends to itself) and trailing padding (no content after it), so all together = the last layer alone.
    np.testing.assert_allclose(got[0]["spliced_loss"], got[2]["spliced_loss"], rtol=0, atol=tol)
    assert abs(got[0]["spliced_loss"] - got[1]["spliced_loss"]) > 10 * tol


def test_cli_evaluates_clt_and_crosscoder_directories(tiny_gemma, tmp_path, monkeypatch, capsys):
    params, cfg, tokens, mask = tiny_gemma
    d = cfg.d_model
    tcs = [random_transcoder(d, d, seed=s) for s in (5, 6)]
    clt_dir = release.write_clt(tmp_path / "rel", clt_of(tcs), LAYERS, n_layers=cfg.num_layers,
                                average_l0=[12.0, 9.0],
                                metadata={"model_name": "tiny", "l0_coefficient": 1.0, "target_l0": 16.0})
    release.write_crosscoder(tmp_path / "rel", identity_crosscoder(2, d), LAYERS, average_l0=64.0)
    monkeypatch.setattr(releases, "_load_lm", lambda *args: (types.SimpleNamespace(params=params, config=cfg),
                                                             (tokens, mask)))
    records = evaluate.main([f"--sae={tmp_path / 'rel'}", "--model=tiny", "--lm_batch_size=2"])
    assert [r["site"] for r in records] == [
        "CLT mlp_in→mlp 1,3 +skip", "mlp_in.1→mlp.1 +skip (CLT)", "mlp_in.3→mlp.3 +skip (CLT)",
        "crosscoder res 1,3", "res.1 (crosscoder)", "res.3 (crosscoder)"]
    assert len(capsys.readouterr().out.splitlines()) == 6
    want = crosslayer.evaluate_crosslayer(params, cfg, tokens, mask, clt_of(tcs), LAYERS, "clt", batch_size=2,
                                          progress=False)
    assert [r["delta_lm_loss"] for r in records[:3]] == [r["delta_lm_loss"] for r in want]
    assert records[0]["width"] == 32 and records[3]["width"] == 4 * d
    # λ and target come from the trainer's config.json (the training summary printed nan before); unknown: None.
    assert [(r["l0_coefficient"], r["target_l0"]) for r in records] == [(1.0, 16.0)] * 3 + [(None, None)] * 3
    # A CLT written for a model of another depth names the file, the key and the shape it should have.
    other = release.write_clt(tmp_path / "other", clt_of(tcs), LAYERS, n_layers=5, average_l0=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"params_layer_1.safetensors: key 'w_dec' has a layer axis of 5; expected "
                                         r"shape \(16, 7, 64\)"):
        evaluate.main([f"--sae={other}", "--model=tiny"])
    with pytest.raises(ValueError, match="reads several layers; evaluate it with --model"):
        evaluate.main([f"--sae={clt_dir}", f"--activations={tmp_path}"])


def test_gs2_clt_written_independently_from_the_key_names_evaluates(tiny_gemma, tmp_path, monkeypatch):
    """A CLT directory as Gemma Scope 2 publishes one (every layer, full-length w_dec, no config.json), written with
    safetensors directly, reads into the CLT it describes and evaluates."""
    params, cfg, tokens, mask = tiny_gemma
    d, n_layers, width = cfg.d_model, cfg.num_layers, 4
    rng = np.random.default_rng(11)
    out = tmp_path / "clt" / "width_28_l0_small"
    out.mkdir(parents=True)
    files = []
    for layer in range(n_layers):
        w_dec = np.zeros((width, n_layers, d), np.float32)
        w_dec[:, layer:] = rng.normal(size=(width, n_layers - layer, d)) * 0.1
        files.append({"w_enc": rng.normal(size=(d, width)), "b_enc": rng.normal(size=width),
                      "threshold": rng.uniform(0, 1, size=width), "w_dec": w_dec, "b_dec": rng.normal(size=d) * 0.1})
        safetensors.numpy.save_file({k: np.asarray(v, np.float32) for k, v in files[-1].items()},
                                    out / f"params_layer_{layer}.safetensors")
    got, info = release.read_clt(out, n_layers=n_layers)
    assert info["layers"] == list(range(n_layers)) and info["affine"] is False and info["width"] == width
    for i in range(n_layers):
        np.testing.assert_array_equal(got["W_enc"][i], files[i]["w_enc"].astype(np.float32))
        for j in range(n_layers):
            np.testing.assert_array_equal(got["W_dec"][i, :, j], files[i]["w_dec"][:, j])
    monkeypatch.setattr(releases, "_load_lm", lambda *args: (types.SimpleNamespace(params=params, config=cfg),
                                                             (tokens, mask)))
    records = evaluate.main([f"--sae={out}", "--model=tiny", "--lm_batch_size=2", "--whole_only"])
    assert len(records) == 1 and records[0]["site"] == "CLT mlp_in→mlp 0,1,2,3,4,5,6" and records[0]["width"] == 28
    assert np.isfinite(records[0]["delta_lm_loss"]) and records[0]["zero_ablation_loss"] > records[0]["clean_loss"]
    assert len(records[0]["fvu_by_layer"]) == n_layers
