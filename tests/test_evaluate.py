"""Evaluation metrics (Gemma Scope §4): L0, FVU, frequencies, delta LM loss, the CLI."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PASS_TOL, f32_tol, nll_tol
from test_release import write_gs2_by_hand

from gemma_scope import evaluate, model, release
from gemma_scope.evaluation import reconstruction, releases, splice
from gemma_scope.release import gs2 as release_gs2
from gemma_scope.sites import Site


def random_sae(d=8, width=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(d, width)).astype(np.float32) / np.sqrt(d),
        "W_dec": rng.normal(size=(width, d)).astype(np.float32) / np.sqrt(width),
        "b_enc": rng.normal(size=width).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=d).astype(np.float32),
        "threshold": rng.uniform(0, 1.0, size=width).astype(np.float32),
    }


def identity_sae(d):
    """Latents relu(x) and relu(-x) with threshold 0: decode(encode(x)) == x exactly."""
    eye = np.eye(d, dtype=np.float32)
    return {
        "W_enc": np.concatenate([eye, -eye], axis=1),
        "W_dec": np.concatenate([eye, -eye], axis=0),
        "b_enc": np.zeros(2 * d, np.float32),
        "b_dec": np.zeros(d, np.float32),
        "threshold": np.zeros(2 * d, np.float32),
    }


def numpy_metrics(params, x):
    x = x.astype(np.float64)
    pre = x @ params["W_enc"] + params["b_enc"]
    f = np.where(pre > params["threshold"], np.maximum(pre, 0), 0)
    x_hat = f @ params["W_dec"] + params["b_dec"]
    mse = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    var = np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))
    fires = (f > 0).mean(0)
    return {"l0": (f > 0).sum(1).mean(), "mse": mse, "fvu": mse / var, "frequencies": fires,
            "dead_fraction": np.mean(fires == 0)}


def activations(n=300, d=8, seed=1, offset=20.0):
    # A large common offset checks the streamed variance does not cancel catastrophically.
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=d) + offset).astype(np.float32)


def test_activation_metrics_match_numpy():
    params, x = random_sae(), activations()
    params["b_dec"] += 20.0  # keep FVU < 1 so the test sees a realistic regime
    got, want = reconstruction.activation_metrics(params, x, batch_size=64), numpy_metrics(params, x)
    assert got["n_tokens"] == 300
    for key in ("l0", "mse", "fvu", "dead_fraction"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(got["frequencies"], want["frequencies"], rtol=1e-6)
    assert 0 < got["dead_fraction"] < 1 and got["l0"] > 0


def test_streamed_batches_equal_one_array():
    params, x = random_sae(), activations()
    whole = reconstruction.activation_metrics(params, x)
    streamed = reconstruction.activation_metrics(params, iter([x[:7], x[7:150], x[150:]]), batch_size=32)
    # float32 sums per batch (of 32 or 300 rows) over d = 8 (encode, squared error, variance), the width (decode)
    # and the rows, for the MSE and the variance
    for key in ("l0", "mse", "fvu", "dead_fraction", "n_tokens"):
        np.testing.assert_allclose(streamed[key], whole[key], rtol=f32_tol(2 * len(x) + 3 * 8 + 32), err_msg=key)
    np.testing.assert_array_equal(streamed["frequencies"], whole["frequencies"])


def test_identity_sae_has_zero_fvu_and_mean_predictor_has_fvu_one():
    x = activations()
    assert reconstruction.activation_metrics(identity_sae(8), x)["fvu"] == 0.0
    mean_only = dict(identity_sae(8), threshold=np.full(16, 1e9, np.float32), b_dec=x.mean(0))
    metrics = reconstruction.activation_metrics(mean_only, x)
    np.testing.assert_allclose(metrics["fvu"], 1.0, rtol=1e-4)
    assert metrics["l0"] == 0 and metrics["dead_fraction"] == 1


def test_wrong_activation_width_and_empty_input_errors():
    with pytest.raises(ValueError, match=r"expected \[tokens, 8\]"):
        reconstruction.activation_metrics(random_sae(), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="no tokens"):
        reconstruction.activation_metrics(random_sae(), iter([]))


def test_written_release_file_evaluates_like_in_memory(tmp_path):
    params, x = random_sae(), activations()
    path = release.write_sae(tmp_path, Site("res", 0), params, average_l0=3.0)
    from_file = reconstruction.activation_metrics(release.load_params(path), x)
    in_memory = reconstruction.activation_metrics(params, x)
    for key in ("l0", "mse", "fvu", "dead_fraction", "n_tokens"):
        assert from_file[key] == in_memory[key], key
    np.testing.assert_array_equal(from_file["frequencies"], in_memory["frequencies"])


# A stand-in LM honouring the Model contract (token_nll / forward with capture and replace): one site "res.0",
# a causal running mean of embeddings, read out by the tied embedding.
class ToyConfig(types.SimpleNamespace):
    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, ToyConfig)

    num_layers = 1
    check_site = model.Config.check_site

    def site_width(self, kind):
        return self.d_model


def toy_forward(params, cfg, tokens, capture=(), replace=None, attention_mask=None, logits=True):
    emb = params["embedding"][tokens]
    h = jnp.cumsum(emb, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[None, :, None]
    site = Site("res", 0)
    acts = {site: h} if site in capture else {}
    if replace and site in replace:
        h = replace[site](h)
    return types.SimpleNamespace(logits=h @ params["embedding"].T if logits else None, acts=acts)


def toy_token_nll(params, cfg, tokens, replace=None):
    logits = toy_forward(params, cfg, tokens, replace=replace).logits[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@pytest.fixture
def toy_lm(monkeypatch):
    monkeypatch.setattr(splice, "model", types.SimpleNamespace(forward=toy_forward, token_nll=toy_token_nll))
    cfg = ToyConfig(name="toy", d_model=8)
    params = {"embedding": jax.random.normal(jax.random.key(0), (50, 8)) * 2}
    tokens = np.random.default_rng(1).integers(3, 50, size=(5, 12)).astype(np.int32)
    tokens[:, 0] = 2
    tokens[4, 9:] = 0  # padding at the end of one sequence
    mask = tokens > 2
    return params, cfg, tokens, mask


def test_identity_splice_gives_zero_delta_lm_loss(toy_lm):
    params, cfg, tokens, mask = toy_lm
    out = splice.delta_lm_loss(params, cfg, tokens, mask, Site("res", 0), identity_sae(8), batch_size=2, progress=False)
    assert out["delta_lm_loss"] == 0.0
    assert out["spliced_loss"] == out["clean_loss"]
    assert out["loss_recovered"] == 1.0
    # Zero-ablated content positions give uniform logits (NLL log V); the BOS position keeps its activation.
    target = mask[:, 1:]
    clean = np.asarray(toy_token_nll(params, cfg, tokens))
    zero = np.where(mask[:, :-1], np.log(50), clean)
    np.testing.assert_allclose(out["zero_ablation_loss"], zero[target].mean(), rtol=1e-5)
    assert out["fvu"] == 0.0 and out["n_tokens"] == mask.sum() and out["n_targets"] == mask[:, 1:].sum()
    np.testing.assert_array_equal(out["by_position"]["delta_lm_loss"], np.zeros(11))
    assert np.isnan(out["by_position"]["mse"][0])  # BOS position: nothing counts


def test_delta_lm_loss_matches_direct_computation(toy_lm):
    params, cfg, tokens, mask = toy_lm
    sae_params = random_sae(d=8, width=24, seed=3)
    out = splice.delta_lm_loss(params, cfg, tokens, mask, Site("res", 0), sae_params, batch_size=2, progress=False)

    def spliced_act(act):
        pre = act @ sae_params["W_enc"] + sae_params["b_enc"]
        x_hat = jnp.where(pre > sae_params["threshold"], jax.nn.relu(pre), 0) @ sae_params["W_dec"] + sae_params["b_dec"]
        return jnp.where(mask[..., None], x_hat, act)

    target = mask[:, 1:]
    clean = np.asarray(toy_token_nll(params, cfg, tokens))
    spliced = np.asarray(toy_token_nll(params, cfg, tokens, replace={Site("res", 0): spliced_act}))
    np.testing.assert_allclose(out["clean_loss"], clean[target].mean(), rtol=1e-5)
    np.testing.assert_allclose(out["delta_lm_loss"], spliced[target].mean() - clean[target].mean(), rtol=1e-4)
    per_pos = (np.where(target, spliced - clean, 0).sum(0)) / target.sum(0)
    # jitted and eager passes: sums over 12 positions (running mean), 8 (logits, encode), 50 (log-softmax), 24
    # (decode) and 5 sequences, of the size of the NLLs
    np.testing.assert_allclose(out["by_position"]["delta_lm_loss"], per_pos, rtol=0,
                               atol=f32_tol(12 + 8 + 50 + 8 + 24 + 5, max(spliced.max(), clean.max())))
    acts = np.asarray(toy_forward(params, cfg, tokens, capture=[Site("res", 0)]).acts[Site("res", 0)])
    want = numpy_metrics(sae_params, acts[mask])
    for key in ("l0", "mse", "fvu"):
        np.testing.assert_allclose(out[key], want[key], rtol=1e-4, err_msg=key)


def test_delta_lm_loss_rejects_wrong_sae_width(toy_lm):
    params, cfg, tokens, mask = toy_lm
    with pytest.raises(ValueError, match="does not match site res.0"):
        splice.delta_lm_loss(params, cfg, tokens, mask, Site("res", 0), random_sae(d=5), progress=False)


def test_identity_splice_on_tiny_gemma_gives_zero_delta():
    from gemma_scope import model

    site = Site("att", 1)

    cfg = model.get_config("gemma3_tiny")
    params = model.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(3, 12)).astype(np.int32)
    tokens[:, 0] = 2
    mask = tokens > 2
    d = cfg.site_width(site.kind)
    out = splice.delta_lm_loss(params, cfg, tokens, mask, site, identity_sae(d), batch_size=2, progress=False)
    assert out["delta_lm_loss"] == 0.0 and out["fvu"] == 0.0
    assert out["zero_ablation_loss"] != out["clean_loss"]
    clean = np.asarray(model.token_nll(params, cfg, tokens))
    # passes on batches of 2 and 3 (conftest.nll_tol; the logits of this random tiny model stay below 1)
    np.testing.assert_allclose(out["clean_loss"], clean[mask[:, 1:]].mean(), rtol=0,
                               atol=nll_tol(cfg.vocab_size, 1.0))


def test_cli_on_cached_activations_prints_metrics_and_writes_report(tmp_path, capsys):
    x = activations(n=500)
    (tmp_path / "acts").mkdir()
    np.save(tmp_path / "acts" / "shard_000.npy", x[:200])
    np.save(tmp_path / "acts" / "shard_001.npy", x[200:])
    sweep = [random_sae(seed=s) for s in (0, 1)]
    for lam, params in zip((1e-3, 1e-4), sweep):
        release.write_sae(tmp_path / "release", Site("res", 4), params, average_l0=lam * 1e4, metadata={"l0_coefficient": lam})
    records = evaluate.main([f"--sae={tmp_path / 'release'}", f"--activations={tmp_path / 'acts'}", "--batch_size=128",
                             f"--out={tmp_path / 'out'}"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 == len(records)
    for line, params in zip(lines, sweep[::-1]):  # sorted paths: average_l0_1 (λ=1e-4) before average_l0_10
        want = reconstruction.activation_metrics(params, x)
        assert line["site"] == "res.4" and line["width"] == 32 and line["n_tokens"] == 500
        # batches of 128 or 500 rows (as in test_streamed_batches_equal_one_array)
        for key in ("l0", "fvu", "mse", "dead_fraction"):
            np.testing.assert_allclose(line[key], want[key], rtol=f32_tol(2 * len(x) + 3 * 8 + 32), err_msg=key)
    assert [line["l0_coefficient"] for line in lines] == [1e-4, 1e-3]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [m["l0"] for m in metrics] == [line["l0"] for line in lines]
    assert "| res.4 |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "frequencies.png").exists()


def test_cli_max_tokens_and_malformed_sae(tmp_path, capsys):
    x = activations(n=100)
    (tmp_path / "acts").mkdir()
    np.save(tmp_path / "acts" / "a.npy", x)
    params = random_sae()
    np.savez(tmp_path / "params.npz", **params)
    evaluate.main([f"--sae={tmp_path / 'params.npz'}", f"--activations={tmp_path / 'acts'}", "--max_tokens=30"])
    assert json.loads(capsys.readouterr().out)["n_tokens"] == 30
    del params["b_dec"]
    np.savez(tmp_path / "params.npz", **params)
    with pytest.raises(ValueError, match=r"params\.npz: missing key\(s\) \['b_dec'\]"):
        evaluate.main([f"--sae={tmp_path / 'params.npz'}", f"--activations={tmp_path / 'acts'}"])
    np.savez(tmp_path / "params.npz", **dict(random_sae(), W_dec=np.zeros((32, 7), np.float32)))
    with pytest.raises(ValueError, match=r"'W_dec' has shape \(32, 7\); expected \(32, 8\)"):
        evaluate.main([f"--sae={tmp_path / 'params.npz'}", f"--activations={tmp_path / 'acts'}"])


def test_cli_gs2_directory_evaluates_like_the_same_weights_in_gs1_layout(tmp_path, capsys):
    """A Gemma Scope 2 directory written from the published key names (not by release.py) and the same weights in
    a Gemma Scope 1 params.npz give identical metrics; and both reach those of the weights in memory."""
    x = activations(n=300)
    (tmp_path / "acts").mkdir()
    np.save(tmp_path / "acts" / "a.npy", x)
    params = random_sae()
    np.savez(tmp_path / "params.npz", **params)
    gs2 = write_gs2_by_hand(tmp_path / "gs2" / "resid_post_all" / "layer_4_width_32_l0_small", params,
                            "model.layers.4.output")
    for sae in (tmp_path / "params.npz", gs2, tmp_path / "gs2"):
        evaluate.main([f"--sae={sae}", f"--activations={tmp_path / 'acts'}"])
    gs1, gs2_dir, gs2_root = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert gs2_dir["site"] == gs2_root["site"] == "res.4"
    want = reconstruction.activation_metrics(params, x)
    for key in ("l0", "fvu", "mse", "dead_fraction", "n_tokens"):
        assert gs1[key] == gs2_dir[key] == gs2_root[key], key
        # other batches (as in test_streamed_batches_equal_one_array)
        np.testing.assert_allclose(gs1[key], want[key], rtol=f32_tol(2 * len(x) + 3 * 8 + 32), err_msg=key)


@pytest.mark.slow
def test_identity_splice_on_real_gemma3_270m_gives_zero_delta():
    from gemma_scope import model

    lm = model.load("gemma3_270m")
    text = "The cathedral was completed in 1250, and the market town around it grew quickly over the next century."
    ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(text)
    tokens = np.array([ids[:20]], np.int32)
    mask = tokens > 2
    site = Site("res", 6)
    out = splice.delta_lm_loss(lm.params, lm.config, tokens, mask, site, identity_sae(640), batch_size=1, progress=False)
    assert out["delta_lm_loss"] == 0.0 and out["fvu"] == 0.0
    assert 0.5 < out["clean_loss"] < 6 < out["zero_ablation_loss"]


def test_grid_equals_each_sae_alone_on_tiny_gemma():
    """One grid evaluation (shared clean and zero-ablation passes) gives each SAE's single-SAE results."""
    from gemma_scope import model

    cfg = model.get_config("gemma2_tiny")
    params = model.init_params(cfg, jax.random.key(1))
    tokens = np.random.default_rng(2).integers(3, cfg.vocab_size, size=(3, 10)).astype(np.int32)
    tokens[:, 0] = 2
    mask = tokens > 2
    grid = [(Site("res", 0), random_sae(d=cfg.d_model, width=16, seed=4)),
            (Site("res", 0), random_sae(d=cfg.d_model, width=16, seed=5)),
            (Site("att", 1), random_sae(d=cfg.site_width("att"), width=16, seed=6))]
    together = splice.evaluate_grid(params, cfg, tokens, mask, grid, batch_size=2, progress=False)
    for (site, sae_params), got in zip(grid, together):
        alone = splice.delta_lm_loss(params, cfg, tokens, mask, site, sae_params, batch_size=2, progress=False)
        # The clean pass compiles with other captures: its NLLs (conftest.nll_tol; logits below 1 in this random
        # model) and its activations, hence the metrics (conftest.PASS_TOL of their scale), may round differently.
        for key in ("clean_loss", "spliced_loss", "zero_ablation_loss", "l0", "fvu"):
            np.testing.assert_allclose(got[key], alone[key], rtol=PASS_TOL, atol=nll_tol(cfg.vocab_size, 1.0),
                                       err_msg=f"{site} {key}")
    assert together[0]["spliced_loss"] != together[1]["spliced_loss"]
    assert together[0]["zero_ablation_loss"] != together[2]["zero_ablation_loss"]


def random_transcoder(d_in, d_out, width=16, seed=0, affine=True):
    rng = np.random.default_rng(seed)
    params = dict(random_sae(d=d_in, width=width, seed=seed), W_dec=rng.normal(size=(width, d_out)).astype(np.float32),
                  b_dec=rng.normal(size=d_out).astype(np.float32))
    if affine:
        params["W_skip"] = rng.normal(size=(d_in, d_out)).astype(np.float32) * 0.1
    return params


def test_transcoder_giving_the_true_mlp_output_has_zero_delta(tiny_gemma, monkeypatch):
    """The splice feeds the prediction the same pass's mlp_in.L and writes mlp.L: a "transcoder" that computes the
    layer's own MLP (and post-FFN norm) from it leaves the loss unchanged."""
    from gemma_scope import sae
    from gemma_scope.model.layers import FeedForward, RMSNorm

    params, cfg, tokens, mask = tiny_gemma
    layer = params["layer_1"]  # modules bound here: flax forbids making them inside the model's own apply
    ffn = FeedForward(cfg).bind({"params": layer["mlp"]})
    post_norm = RMSNorm(cfg.norm_eps).bind({"params": layer["post_ffw_norm"]})

    def true_mlp(_, x):  # x [B, T, d] in the splice, [n, d] in the metrics
        return post_norm(ffn(x.reshape(-1, 1, x.shape[-1]))).reshape(x.shape).astype(jnp.float32)

    fake = types.SimpleNamespace(encode=sae.encode, predict=true_mlp)
    monkeypatch.setattr(splice, "sae", fake)  # the splice
    monkeypatch.setattr(reconstruction, "sae", fake)  # the metrics
    d = cfg.d_model
    out = splice.evaluate_grid(params, cfg, tokens, mask, [(Site("mlp_in", 1), random_sae(d=d), Site("mlp", 1))],
                                 batch_size=2, progress=False)[0]
    # The MLP recomputed here rounds differently from the pass's own (conftest.PASS_TOL, here of the spread: FVU
    # below its square); the two passes' NLLs then differ within conftest.nll_tol (logits below 1 in this model).
    assert abs(out["delta_lm_loss"]) < nll_tol(cfg.vocab_size, 1.0) and out["fvu"] < PASS_TOL**2
    assert out["zero_ablation_loss"] - out["clean_loss"] > 1e-3


def test_transcoder_splice_matches_direct_computation(tiny_gemma):
    from gemma_scope import model, sae

    params, cfg, tokens, mask = tiny_gemma
    site, site_out = Site("mlp_in", 0), Site("mlp", 0)
    tc = random_transcoder(cfg.d_model, cfg.d_model, seed=7)
    out = splice.evaluate_grid(params, cfg, tokens, mask, [(site, tc, site_out)], batch_size=2, progress=False)[0]
    clean = model.forward(params, cfg, jnp.asarray(tokens), capture=[site, site_out])
    x, y = np.asarray(clean.acts[site]), np.asarray(clean.acts[site_out])
    pred = np.asarray(sae.predict(tc, x.reshape(-1, cfg.d_model))).reshape(y.shape)
    target = mask[:, 1:]
    nll = lambda replace: np.asarray(model.token_nll(params, cfg, jnp.asarray(tokens), replace))[target].mean()  # noqa: E731
    spliced = nll({site_out: lambda act: jnp.where(mask[..., None], pred, act)})
    zero = nll({site_out: lambda act: jnp.where(mask[..., None], 0.0, act)})
    # passes compiled apart (conftest.nll_tol; the logits of this random tiny model stay below 1)
    np.testing.assert_allclose(out["spliced_loss"], spliced, rtol=0, atol=nll_tol(cfg.vocab_size, 1.0))
    np.testing.assert_allclose(out["zero_ablation_loss"], zero, rtol=0, atol=nll_tol(cfg.vocab_size, 1.0))
    assert abs(out["delta_lm_loss"]) > 1e-3
    # FVU and MSE of the output site; L0 of the latents; numpy formulas on the content tokens.
    f = (np.maximum(x @ tc["W_enc"] + tc["b_enc"], 0) * (x @ tc["W_enc"] + tc["b_enc"] > tc["threshold"]))[mask]
    y_hat = f @ tc["W_dec"] + tc["b_dec"] + x[mask] @ tc["W_skip"]
    mse = np.mean(np.sum((y[mask] - y_hat) ** 2, axis=-1))
    np.testing.assert_allclose(out["mse"], mse, rtol=1e-4)
    np.testing.assert_allclose(out["fvu"], mse / np.mean(np.sum((y[mask] - y[mask].mean(0)) ** 2, axis=-1)), rtol=1e-4)
    np.testing.assert_allclose(out["l0"], (f > 0).sum(-1).mean(), rtol=1e-6)


def test_grid_of_saes_and_transcoders_equals_each_alone(tiny_gemma):
    params, cfg, tokens, mask = tiny_gemma
    d = cfg.d_model
    grid = [(Site("mlp", 1), random_sae(d=d, width=16, seed=1)),
            (Site("mlp_in", 1), random_transcoder(d, d, seed=2), Site("mlp", 1)),
            (Site("mlp_in", 1), random_transcoder(d, d, seed=3, affine=False), Site("mlp", 1))]
    together = splice.evaluate_grid(params, cfg, tokens, mask, grid, batch_size=2, progress=False)
    for entry, got in zip(grid, together):
        alone = splice.evaluate_grid(params, cfg, tokens, mask, [entry], batch_size=2, progress=False)[0]
        # as in test_grid_equals_each_sae_alone_on_tiny_gemma
        for key in ("clean_loss", "spliced_loss", "zero_ablation_loss", "l0", "fvu"):
            np.testing.assert_allclose(got[key], alone[key], rtol=PASS_TOL, atol=nll_tol(cfg.vocab_size, 1.0),
                                       err_msg=f"{entry[0]} {key}")
    assert together[0]["zero_ablation_loss"] == together[1]["zero_ablation_loss"]  # both ablate mlp.1


def test_transcoder_grid_errors(tiny_gemma):
    params, cfg, tokens, mask = tiny_gemma
    d = cfg.d_model
    with pytest.raises(ValueError, match="from mlp_in.L of the same layer; got mlp_in.0 -> mlp.1"):
        splice.evaluate_grid(params, cfg, tokens, mask, [(Site("mlp_in", 0), random_transcoder(d, d), Site("mlp", 1))])
    with pytest.raises(ValueError, match="output width 5 does not match site mlp.0"):
        splice.evaluate_grid(params, cfg, tokens, mask, [(Site("mlp_in", 0), random_transcoder(d, 5), Site("mlp", 0))])


def test_cli_evaluates_gs2_transcoders_with_the_model_only(tiny_gemma, tmp_path, monkeypatch, capsys):
    params, cfg, tokens, mask = tiny_gemma
    d = cfg.d_model
    for affine in (False, True):
        release_gs2.write_gs2(tmp_path / "rel", Site("mlp_in", 1), random_transcoder(d, d, affine=affine), 15,
                          model_name="tiny", site_out=Site("mlp", 1))
    release_gs2.write_gs2(tmp_path / "rel", Site("mlp", 1), random_sae(d=d, width=16), 40, model_name="tiny")
    lm = types.SimpleNamespace(params=params, config=cfg)
    monkeypatch.setattr(releases, "_load_lm", lambda *args: (lm, (tokens, mask)))
    records = evaluate.main([f"--sae={tmp_path / 'rel'}", "--model=tiny", "--lm_batch_size=2"])
    assert [r["site"] for r in records] == ["mlp.1", "mlp_in.1→mlp.1", "mlp_in.1→mlp.1 +skip"]
    want = splice.evaluate_grid(params, cfg, tokens, mask, [
        (Site("mlp_in", 1), release.load_params(tmp_path / "rel" / "transcoder_all" / "layer_1_width_16_l0_small_affine"),
         Site("mlp", 1))], batch_size=2, progress=False)[0]
    assert records[2]["delta_lm_loss"] == want["delta_lm_loss"] and records[2]["fvu"] == want["fvu"]
    assert len(capsys.readouterr().out.splitlines()) == 3
    (tmp_path / "acts").mkdir()
    np.save(tmp_path / "acts" / "a.npy", activations(n=10, d=d))
    with pytest.raises(ValueError, match="needs activations of both sites; evaluate it with --model"):
        evaluate.main([f"--sae={tmp_path / 'rel' / 'transcoder_all'}", f"--activations={tmp_path / 'acts'}"])


def test_model_config_reaches_model_load_from_the_cli_and_the_trainer(tmp_path, monkeypatch):
    from gemma_scope import configs, train

    asked = []

    def load(name, config=None):
        asked.append((name, config))
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(releases.model, "load", load)
    release.write_sae(tmp_path / "release", Site("res", 4), random_sae(), average_l0=5.0)
    with pytest.raises(FileNotFoundError, match="stop here"):
        evaluate.main([f"--sae={tmp_path / 'release'}", "--model=/ckpt/orbax", "--model_config=gemma2_2b"])
    config = configs.paper_run("gemma2_2b", "res", (4,), None)
    config.data.model, config.workdir = "/ckpt/orbax", str(tmp_path)
    with pytest.raises(FileNotFoundError, match="stop here"):
        train.evaluate_run(config, sorted((tmp_path / "release").rglob("params.npz")))
    assert asked == [("/ckpt/orbax", "gemma2_2b")] * 2


def test_by_source_evaluates_each_sources_documents_alone(tiny_gemma, tmp_path, monkeypatch, capsys):
    """--by_source: one record per train source and SAE, each the grid's metrics on sequences made of that source's
    documents only (a source whose text the SAE reconstructs worse shows it); ood sources are left out."""
    from test_data import ByteTokenizer

    from gemma_scope.data import SequenceReader, TextFiles, build_corpus

    params, cfg, _, _ = tiny_gemma
    for name, letters in (("abc", "abc "), ("xyz", "xyz\n"), ("novel", "q")):
        (tmp_path / name).mkdir()
        rng = np.random.default_rng(len(name))
        for k in range(12):
            (tmp_path / name / f"{k}.txt").write_text("".join(rng.choice(list(letters), size=300)))
    sources = [TextFiles([str(tmp_path / n / "*.txt")], name=n) for n in ("abc", "xyz")]
    sources.append(TextFiles([str(tmp_path / "novel" / "*.txt")], name="novel", role="ood"))
    build_corpus(sources, tmp_path / "corpus", ByteTokenizer(), heldout_fraction=0.3, log=lambda *_: None)
    lm = types.SimpleNamespace(params=params, config=cfg, tokenizer=ByteTokenizer())
    monkeypatch.setattr(releases.model, "load", lambda name, config=None: lm)
    path = release.write_sae(tmp_path / "rel", Site("res", 1), random_sae(d=cfg.d_model, width=16), 10)
    records = evaluate.main([f"--sae={path}", "--model=tiny", "--by_source", f"--corpus={tmp_path / 'corpus'}",
                             "--seq_len=32", "--num_sequences=3", "--lm_batch_size=2"])
    assert [(r["source"], r["split"], r["site"]) for r in records] == [("abc", "heldout", "res.1"),
                                                                      ("xyz", "heldout", "res.1")]
    assert len(capsys.readouterr().out.splitlines()) == 2
    for record in records:
        seqs = SequenceReader(tmp_path / "corpus", split="heldout", seq_len=32, sources=[record["source"]])
        batch = seqs.sequences(0, 3)
        letters = set(ByteTokenizer.decode(batch["tokens"][batch["mask"]]))
        assert letters <= set({"abc": "abc ", "xyz": "xyz\n"}[record["source"]]), letters
        want = splice.evaluate_grid(params, cfg, batch["tokens"], batch["mask"],
                                    [(Site("res", 1), release.load_params(path))], batch_size=2, progress=False)[0]
        assert all(record[k] == want[k] for k in ("l0", "fvu", "delta_lm_loss", "n_targets")), record
    assert records[0]["fvu"] != records[1]["fvu"]
    # --no_splice: L0 and FVU alone, from one forward pass without logits; the same numbers up to float32 rounding
    # of two differently compiled passes (PASS_TOL of the activations; L0 counts latents, FVU is a ratio of sums).
    quick = releases.by_source([path], "tiny", corpus=tmp_path / "corpus", num_sequences=3, seq_len=32,
                               lm_batch_size=2, splice=False)
    assert [sorted(r) for r in quick] == [["fvu", "l0", "n_tokens", "sae", "site", "source", "split"]] * 2
    for fast, full in zip(quick, records):
        assert fast["n_tokens"] == full["n_tokens"] and abs(fast["l0"] - full["l0"]) <= 0.05 * full["l0"]
        np.testing.assert_allclose(fast["fvu"], full["fvu"], rtol=1e-3)
