"""The real embedded Gemma 3 270M against transformers' outputs on the same GGUF weights (tests/golden, made by
scripts/make_golden.py): logits, residual stream, per-token loss, greedy completion and the score command; the
sites the goldens lack (mlp_in, mlp, att) by recomputing golden-checked blocks from them."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import check_block_sites

from gemma_scope import model, score
from gemma_scope.sites import Site

GOLDEN = pathlib.Path(__file__).parent / "golden"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def gemma3_270m():
    """The embedded model (the first load dequantises the GGUF; later loads read the float32 cache)."""
    return model.load("gemma3_270m")


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "gemma3_270m.npz"))


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_tokenizer_matches_reference(gemma3_270m, golden):
    tok = gemma3_270m.tokenizer
    assert [tok.bos_id] + tok.encode((GOLDEN / "prose.txt").read_text()) == golden["tokens"].tolist()


def test_logits_and_residuals_match_reference(gemma3_270m, golden):
    cfg = gemma3_270m.config
    short = golden["logits"].shape[0]
    tokens = jnp.asarray(golden["tokens"][None, :short])
    sites = [Site("res", int(layer)) for layer in golden["res_layers"]]
    out = jax.jit(lambda p, t: model.forward(p, cfg, t, capture=sites))(gemma3_270m.params, tokens)
    logits = out.logits[0]
    assert rel_l2(logits[:, golden["vocab_ids"]], golden["logits"]) <= 1e-4
    # logsumexp over the whole vocabulary checks every logit, not only the sampled ids
    assert rel_l2(jax.nn.logsumexp(logits, axis=-1), golden["logsumexp"]) <= 1e-4
    for site, expected in zip(sites, golden["res"]):
        assert rel_l2(out.acts[site][0], expected) <= 1e-4


def test_block_sites_recompute_the_reference_residuals(gemma3_270m, golden):
    """At the golden layers 5 and 11 (res checked against transformers above), res = h + mlp with
    mlp_in = pre_ffw_norm(h) and mlp = post_ffw_norm(FFN(mlp_in)); replacing mlp_in by itself changes nothing."""
    cfg, params = gemma3_270m.config, gemma3_270m.params
    tokens = jnp.asarray(golden["tokens"][None, :64])
    layers = [int(layer) for layer in golden["res_layers"] if layer > 0]
    sites = [Site(kind, layer) for layer in layers for kind in ("att", "mlp_in", "mlp", "res")]
    sites += [Site("res", layer - 1) for layer in layers]
    acts = jax.jit(lambda p, t: model.forward(p, cfg, t, capture=sites, logits=False).acts)(params, tokens)
    for layer in layers:
        check_block_sites(cfg, params, tokens, acts, layer)
    nll = jax.jit(lambda p, t, replace: model.token_nll(p, cfg, t, replace), static_argnums=2)
    identity = tuple((Site("mlp_in", layer), lambda x: x) for layer in layers)
    np.testing.assert_array_equal(nll(params, tokens, identity), nll(params, tokens, ()))


def test_prose_loss_matches_reference(gemma3_270m, golden):
    cfg = gemma3_270m.config
    nll = jax.jit(lambda p, t: model.token_nll(p, cfg, t))(gemma3_270m.params, jnp.asarray(golden["tokens"][None]))[0]
    np.testing.assert_allclose(nll, golden["nll"], atol=2e-3)
    assert 2.3 <= float(nll.mean()) <= 2.8


def test_greedy_completion(gemma3_270m, golden):
    cfg, tok = gemma3_270m.config, gemma3_270m.tokenizer
    ids = [tok.bos_id] + tok.encode("The capital of France is")
    assert ids == golden["prompt"].tolist()
    width = len(ids) + len(golden["greedy"])
    step = jax.jit(lambda p, t, n: model.forward(p, cfg, t).logits[0, n - 1].argmax())
    for _ in range(len(golden["greedy"])):  # fixed width (right padding is invisible to causal attention)
        ids.append(int(step(gemma3_270m.params, jnp.asarray([ids + [0] * (width - len(ids))]), len(ids))))
    assert ids[len(golden["prompt"]):] == golden["greedy"].tolist()
    assert "France" in tok.decode(ids[len(golden["prompt"]):])


def test_score_command(gemma3_270m, golden, capsys, monkeypatch):
    monkeypatch.setattr(model, "load", lambda name: gemma3_270m)
    score.main(["--model=gemma3_270m", f"--text-file={GOLDEN / 'prose.txt'}"])
    result = json.loads(capsys.readouterr().out.strip())
    assert result["tokens"] == len(golden["tokens"]) - 1
    assert result["nats_per_token"] == pytest.approx(float(golden["nll"].mean()), abs=1e-3)
