"""Gemma decoder on tiny configs: parity with transformers (golden files), site invariants, token_nll, masks,
param layout and loaders. The real Gemma 3 270M is tested in test_model_gemma3_270m.py."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PASS_TOL, f32_tol, nll_tol
from safetensors.numpy import load_file, save_file

from gemma_scope import model
from gemma_scope.model.layers import FeedForward, RMSNorm
from gemma_scope.model.params import expected_shapes
from gemma_scope.sites import Site

GOLDEN = pathlib.Path(__file__).parent / "golden"


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=["gemma2_tiny", "gemma3_tiny"])
def tiny(request):
    """A tiny random HF-layout model loaded by our HF loader, with its golden transformers outputs."""
    lm = model.load(GOLDEN / f"{request.param}_hf")
    return lm, dict(np.load(GOLDEN / f"{request.param}.npz"))


def all_sites(cfg):
    return [Site(kind, layer) for layer in range(cfg.num_layers) for kind in ("res", "att", "mlp_in", "mlp")]


def check_block_sites(cfg, params, tokens, acts, layer):
    """Recomputes block ``layer`` from its captured sites and ``res.{layer-1}`` (the embedding for layer 0):
    ``h = res_prev + post_attention_norm(att @ W_O)``, ``mlp_in = pre_ffw_norm(h)``,
    ``mlp = post_ffw_norm(FFN(mlp_in))`` (our ``mlp`` is after the post-FFN norm), ``res = h + mlp``."""
    p = params[f"layer_{layer}"]
    norm = lambda name, x: RMSNorm(cfg.norm_eps).apply({"params": p[name]}, x)  # noqa: E731
    if layer == 0:
        previous = params["embedder"]["input_embedding"][tokens] * np.sqrt(cfg.d_model)
    else:
        previous = acts[Site("res", layer - 1)]
    w_o = p["attn"]["attn_vec_einsum"]["w"].reshape(cfg.site_width("att"), cfg.d_model)
    h = previous + norm("post_attention_norm", acts[Site("att", layer)] @ w_o)
    mlp_in, mlp = acts[Site("mlp_in", layer)], acts[Site("mlp", layer)]
    ffn = FeedForward(cfg).apply({"params": p["mlp"]}, mlp_in)
    # The block redone outside the jitted pass rounds its sums differently: att @ W_O, three RMSNorms and the FFN's
    # gate and up projections over d_model, its down projection over hidden_dim.
    terms = cfg.site_width("att") + 5 * cfg.d_model + cfg.hidden_dim
    for actual, expected in [(mlp_in, norm("pre_ffw_norm", h)), (mlp, norm("post_ffw_norm", ffn)),
                             (acts[Site("res", layer)], h + mlp)]:
        np.testing.assert_allclose(actual, expected, rtol=0, atol=f32_tol(terms, float(jnp.abs(expected).max())))
    assert rel_l2(ffn, mlp) > 1e-2  # so the site is after the post-FFN norm, not before it


def test_tiny_parity_with_transformers(tiny):
    lm, golden = tiny
    cfg, tokens = lm.config, jnp.asarray(golden["tokens"])
    # The goldens exercise GQA, a sliding window shorter than the sequence, and (Gemma 2) both softcaps.
    assert cfg.num_kv_heads < cfg.num_heads and cfg.sliding_window < tokens.shape[1]
    assert "local" in cfg.attention_types and "global" in cfg.attention_types
    if not cfg.use_qk_norm:
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_scale) == (2.0, 3.0, 12**-0.5)
    out = jax.jit(lambda p, t: model.forward(p, cfg, t, capture=[Site("res", i) for i in range(cfg.num_layers)]))(
        lm.params, tokens)
    assert rel_l2(out.logits, golden["logits"]) <= 1e-4
    for layer in range(cfg.num_layers - 1):  # transformers reports the last layer's output only after final_norm
        assert rel_l2(out.acts[Site("res", layer)], golden["res"][layer]) <= 1e-4


def test_residual_decomposes_into_sites(tiny):
    """res_i = h_i + mlp_i with h_i = res_{i-1} + post_attention_norm(att_i @ W_O) (arXiv 2408.05147 §3.1),
    res_{-1} the embedding; mlp_in_i = pre_ffw_norm(h_i) and mlp_i = post_ffw_norm(FFN(mlp_in_i))."""
    lm, golden = tiny
    cfg, params, tokens = lm.config, lm.params, jnp.asarray(golden["tokens"])
    acts = jax.jit(lambda p, t: model.forward(p, cfg, t, capture=all_sites(cfg), logits=False).acts)(params, tokens)
    for layer in range(cfg.num_layers):
        check_block_sites(cfg, params, tokens, acts, layer)
        assert acts[Site("att", layer)].shape == tokens.shape + (cfg.num_heads * cfg.head_dim,)
        assert acts[Site("mlp_in", layer)].shape == tokens.shape + (cfg.d_model,)


def test_replacing_sites(tiny):
    lm, golden = tiny
    cfg, params, tokens = lm.config, lm.params, jnp.asarray(golden["tokens"])
    clean = jax.jit(lambda p, t: model.forward(p, cfg, t, capture=all_sites(cfg)))(params, tokens)
    identity = jax.jit(lambda p, t: model.forward(p, cfg, t, replace={s: (lambda x: x) for s in all_sites(cfg)}))(
        params, tokens)
    # Passes compiled with other captures and replacements round differently (conftest.PASS_TOL), here and below.
    np.testing.assert_allclose(identity.logits, clean.logits, rtol=0, atol=PASS_TOL * np.abs(clean.logits).max())

    last = Site("res", cfg.num_layers - 1)
    zeroed = model.forward(params, cfg, tokens, replace={last: jnp.zeros_like}).logits
    np.testing.assert_array_equal(zeroed, 0.0)  # final_norm(0) = 0, so every logit is 0
    assert float(jnp.abs(clean.logits).max()) > 0.1

    # Under jit, with a replacement closing over a traced array: downstream sees it, upstream does not, and the
    # captured value of the replaced site is the one before its replacement. (Scaling all of att would be undone
    # by post_attention_norm, so the replacement scales the first half of the heads.)
    site = Site("att", 1)

    @jax.jit
    def scale_heads(p, t, factor):
        return model.forward(p, cfg, t, capture=[Site("res", 0), site, Site("res", 1)],
                             replace={site: lambda x: x.at[..., : x.shape[-1] // 2].multiply(factor)})

    out = scale_heads(params, tokens, jnp.float32(0.0))
    np.testing.assert_allclose(out.acts[Site("res", 0)], clean.acts[Site("res", 0)], rtol=0,
                               atol=PASS_TOL * np.abs(clean.acts[Site("res", 0)]).max())
    np.testing.assert_allclose(out.acts[site], clean.acts[site], rtol=0, atol=PASS_TOL * np.abs(clean.acts[site]).max())
    assert rel_l2(out.acts[Site("res", 1)], clean.acts[Site("res", 1)]) > 1e-3
    assert rel_l2(out.logits, clean.logits) > 1e-3

    # mlp_in is replaceable: the MLP has no biases and RMSNorm(0) = 0, so a zero mlp_in zeroes the mlp site, and
    # the block output is then h alone; the captured mlp_in is the clean one.
    site = Site("mlp_in", 1)
    sites = [Site("res", 0), Site("att", 1), site, Site("mlp", 1), Site("res", 1)]
    zeroed = model.forward(params, cfg, tokens, capture=sites, replace={site: jnp.zeros_like})
    np.testing.assert_array_equal(zeroed.acts[Site("mlp", 1)], 0.0)
    # zeroed runs eagerly, clean under jit: float32 rounding differs (conftest.PASS_TOL)
    np.testing.assert_allclose(zeroed.acts[site], clean.acts[site], rtol=0,
                               atol=PASS_TOL * np.abs(clean.acts[site]).max())
    h = clean.acts[Site("res", 1)] - clean.acts[Site("mlp", 1)]
    np.testing.assert_allclose(zeroed.acts[Site("res", 1)], h, rtol=PASS_TOL, atol=PASS_TOL * float(jnp.abs(h).max()))
    assert rel_l2(zeroed.logits, clean.logits) > 1e-3


def test_logits_false_skips_later_layers(tiny):
    """Without logits, layers after the last requested site are not run: their params may even be absent."""
    lm, golden = tiny
    cfg, tokens = lm.config, jnp.asarray(golden["tokens"])
    site = Site("mlp", 1)
    truncated = {k: v for k, v in lm.params.items() if k in ("embedder", "layer_0", "layer_1")}
    out = model.forward(truncated, cfg, tokens, capture=[site], logits=False)
    assert out.logits is None and set(out.acts) == {site}
    full = model.forward(lm.params, cfg, tokens, capture=[site])
    # a pass stopping at layer 1 compiles apart from the full one (conftest.PASS_TOL)
    np.testing.assert_allclose(out.acts[site], full.acts[site], rtol=0, atol=PASS_TOL * np.abs(full.acts[site]).max())


def test_frozen_scalings_give_the_same_pass_and_make_it_affine(tiny):
    """Recording the norms' inverse RMS and the attention patterns changes nothing; a pass holding them frozen
    gives the same logits, and with the MLP outputs held fixed too its logits before the final softcap are affine
    in its embeddings (the local replacement model of attribution graphs), which the plain pass's are not."""
    lm, golden = tiny
    cfg, params, tokens = lm.config, lm.params, jnp.asarray(golden["tokens"])
    mlps = [Site("mlp", layer) for layer in range(cfg.num_layers)]
    plain = model.forward(params, cfg, tokens, capture=mlps)
    recorded = model.forward(params, cfg, tokens, capture=mlps, record_frozen=True)
    assert plain.frozen is None and len(recorded.frozen) == 5 * cfg.num_layers + 1
    assert recorded.frozen[model.frozen_key(0, "pattern")].shape == (
        *tokens.shape[:2], cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, tokens.shape[1])
    np.testing.assert_array_equal(recorded.logits, plain.logits)
    frozen = model.forward(params, cfg, tokens, frozen=recorded.frozen)
    scale = float(jnp.abs(plain.logits).max())
    np.testing.assert_allclose(frozen.logits, plain.logits, rtol=0, atol=PASS_TOL * scale)

    fixed = {site: (lambda a: lambda x: a)(plain.acts[site]) for site in mlps}
    embeddings = params["embedder"]["input_embedding"][tokens] * np.sqrt(cfg.d_model)

    def logits(e, freeze):  # before the final softcap (Gemma 2's), which no freezing makes linear
        out = model.forward(params, cfg, tokens, replace=fixed, embeddings=e, frozen=freeze).logits
        cap = cfg.final_logit_softcap
        return out if cap is None else cap * jnp.arctanh(out / cap)

    for freeze, affine in ((recorded.frozen, True), (None, False)):
        ends = [logits(c * embeddings, freeze) for c in (0.0, 1.0, 2.0)]
        if affine:  # g(2e) - g(e) = g(e) - g(0), up to the rounding of two passes (conftest.PASS_TOL)
            np.testing.assert_allclose(ends[2] - ends[1], ends[1] - ends[0], rtol=0, atol=4 * PASS_TOL * scale)
        else:
            assert rel_l2(ends[2] - ends[1], ends[1] - ends[0]) > 1e-2
    with pytest.raises(ValueError, match="frozen\\['layer_0/pre_attention_norm'\\] is nothing"):
        model.forward(params, cfg, tokens, frozen={})


def test_token_nll_equals_log_softmax(tiny):
    lm, golden = tiny
    cfg, params, tokens = lm.config, lm.params, jnp.asarray(golden["tokens"])
    replace = {Site("mlp", 0): lambda x: 0.5 * x}
    logits = jax.jit(lambda p, t: model.forward(p, cfg, t, replace=replace).logits)(params, tokens)
    direct = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
    # chunks of 7 positions: 30 positions -> 5 chunks, the last one padded
    nll = jax.jit(lambda p, t: model.token_nll(p, cfg, t, replace, chunk_bytes=7 * 4 * cfg.vocab_size))(params, tokens)
    assert nll.shape == (tokens.shape[0], tokens.shape[1] - 1) and nll.dtype == jnp.float32
    # the chunked NLL reruns the pass: its logits round differently (conftest.nll_tol)
    np.testing.assert_allclose(nll, direct, rtol=0, atol=nll_tol(cfg.vocab_size, float(jnp.abs(logits).max())))


def test_left_padding_is_masked(tiny):
    """Left-padded inputs with attention_mask give the unpadded logits at real positions (positions count real
    tokens, so RoPE and the sliding window are unchanged)."""
    lm, golden = tiny
    cfg, tokens = lm.config, jnp.asarray(golden["tokens"])
    pad = 5
    padded = jnp.concatenate([jnp.zeros((tokens.shape[0], pad), jnp.int32), tokens], axis=1)
    mask = padded != 0
    mask = mask.at[:, pad:].set(True)
    run = jax.jit(lambda p, t, m: model.forward(p, cfg, t, attention_mask=m).logits)
    out = run(lm.params, padded, mask)
    clean = run(lm.params, tokens, jnp.ones_like(tokens, bool))
    # the padded pass has other shapes, so XLA orders its sums differently (conftest.PASS_TOL)
    np.testing.assert_allclose(out[:, pad:], clean, rtol=0, atol=PASS_TOL * np.abs(clean).max())
    assert np.isfinite(np.asarray(out)).all()


def test_bad_inputs_raise_clear_errors(tiny):
    lm, golden = tiny
    cfg, tokens = lm.config, jnp.asarray(golden["tokens"])
    with pytest.raises(ValueError, match="beyond the model's layers"):
        model.forward(lm.params, cfg, tokens, capture=[Site("res", cfg.num_layers)])
    with pytest.raises(ValueError, match="returned shape"):
        model.forward(lm.params, cfg, tokens, replace={Site("res", 0): lambda x: x[..., :2]})
    with pytest.raises(ValueError, match=r"int \[batch, seq_len\]"):
        model.forward(lm.params, cfg, tokens[0])
    with pytest.raises(ValueError, match="attention_mask"):
        model.forward(lm.params, cfg, tokens, attention_mask=jnp.ones((1, 3), bool))
    with pytest.raises(TypeError, match="Site"):
        model.forward(lm.params, cfg, tokens, capture=["res.0"])


def test_param_tree_is_the_gemma_librarys():
    shapes = expected_shapes(model.get_config("gemma3_270m"))
    assert shapes["embedder/input_embedding"] == (262144, 640)
    assert shapes["layer_0/attn/q_einsum/w"] == (4, 640, 256)
    assert shapes["layer_0/attn/kv_einsum/w"] == (2, 1, 640, 256)
    assert shapes["layer_0/attn/attn_vec_einsum/w"] == (4, 256, 640)
    assert shapes["layer_0/attn/_query_norm/scale"] == (256,)
    assert shapes["layer_0/mlp/gating_einsum"] == (2, 2048, 640)
    assert shapes["layer_17/mlp/linear"] == (2048, 640)
    assert shapes["final_norm/scale"] == (640,)
    assert len(shapes) == 2 + 18 * 11
    g2 = expected_shapes(model.get_config("gemma2_2b"))
    assert g2["layer_0/mlp/gating_einsum"] == (2, 2304, 9216) and "layer_0/attn/_query_norm/scale" not in g2
    assert expected_shapes(model.get_config("gemma2_9b"))["layer_0/mlp/gating_einsum"] == (2, 14336, 3584)
    cfg27 = model.get_config("gemma2_27b")
    assert cfg27.query_scale == pytest.approx((4608 / 32) ** -0.5) and cfg27.site_width("att") == 4096
    assert model.get_config("gemma2_9b").site_width("att") == 4096
    assert model.get_config("gemma3_270m").attention_types[:6] == ("local",) * 5 + ("global",)
    # Without grouped heads the library fuses q, k, v into one weight.
    import dataclasses
    mha = dataclasses.replace(model.get_config("gemma2_tiny"), num_kv_heads=4)
    assert expected_shapes(mha)["layer_0/attn/qkv_einsum/w"] == (3, 4, 64, 16)


def test_orbax_checkpoint_roundtrip(tmp_path):
    """A Kaggle-style checkpoint (params under "transformer") loads with its config inferred."""
    import orbax.checkpoint as ocp

    cfg = model.get_config("gemma3_tiny")
    params = jax.tree.map(np.asarray, model.init_params(cfg, jax.random.key(0)))
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", {"transformer": params})
    lm = model.load(tmp_path / "ckpt")
    assert lm.config == cfg
    jax.tree.map(np.testing.assert_array_equal, lm.params, params)
    with pytest.raises(ValueError, match="do not fit config"):
        model.load(tmp_path / "ckpt", config="gemma2_tiny")


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="no weights ship"):
        model.load("gemma2_2b")
    with pytest.raises(FileNotFoundError):
        model.load(tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown model config"):
        model.get_config("gemma9_1t")
    with pytest.raises(ValueError, match="not a readable orbax"):
        model.load(tmp_path)  # an empty directory
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        model.load(not_gguf)

    partial = tmp_path / "partial"
    shutil.copytree(GOLDEN / "gemma2_tiny_hf", partial)
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, partial / "model.safetensors")
    with pytest.raises(ValueError, match="layers.2.mlp.up_proj.weight"):
        model.load(partial)
    config = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        model.load(partial)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        _ = model.load(GOLDEN / "gemma2_tiny_hf").tokenizer
