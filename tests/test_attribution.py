"""Attribution graphs on a tiny random Gemma 3: the replacement map equals the model, edges are complete and equal
finite differences of the frozen model, identity transcoders give the residual path, per-layer transcoders are
the CLT's diagonal; pruning, scores and the JSON against circuit-tracer (when its venv exists); the command and
the offline view in headless Chromium."""

import json
import os
import pathlib
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PASS_TOL, f32_tol

from gemma_scope import attribute, model
from gemma_scope.attribution import graph as graphs
from gemma_scope.attribution import graph_json, replacement, view
from gemma_scope.release import gs2
from gemma_scope.sites import Site

# A venv with circuit-tracer (pip install torch==2.13.0 circuit-tracer==0.5.0), for the parity tests.
CIRCUIT_TRACER_PYTHON = pathlib.Path(os.environ.get("CIRCUIT_TRACER_PYTHON", "/work/venvs/attr/bin/python"))
TOKENS = np.array([2, 17, 301, 44, 9, 250, 77, 480], np.int32)
WIDTH = 16


@pytest.fixture(scope="module")
def tiny():
    cfg = model.get_config("gemma3_tiny")
    return cfg, model.init_params(cfg, jax.random.key(0))


def random_transcoders(cfg, seed, clt=False, skip=True):
    n, d = cfg.num_layers, cfg.d_model
    k = jax.random.split(jax.random.key(seed), 5)
    shape = (n, WIDTH, n, d) if clt else (n, WIDTH, d)
    tc = {"W_enc": jax.random.normal(k[0], (n, d, WIDTH)) * 0.3, "b_enc": jax.random.normal(k[1], (n, WIDTH)) * 0.1,
          "threshold": jnp.full((n, WIDTH), 0.2), "W_dec": jax.random.normal(k[2], shape) * 0.1,
          "b_dec": jax.random.normal(k[3], (n, d)) * 0.1}
    if skip:
        tc["W_skip"] = jax.random.normal(k[4], (n, d, d)) * 0.05
    return tc


@pytest.fixture(scope="module", params=["per_layer", "clt"])
def attributed(request, tiny):
    cfg, params = tiny
    tc = random_transcoders(cfg, 1, clt=request.param == "clt")
    prompt = replacement.prepare(params, cfg, tc, TOKENS, max_logits=4)
    return tc, prompt, graphs.attribute(params, cfg, tc, prompt, batch_size=128)


def test_replacement_map_gives_the_model_and_edges_are_complete(tiny, attributed):
    cfg, params = tiny
    tc, prompt, graph = attributed
    out = model.forward(params, cfg, jnp.asarray(TOKENS)[None], capture=[Site("mlp_in", j) for j in range(7)])
    x = np.stack([out.acts[Site("mlp_in", j)][0] for j in range(cfg.num_layers)])
    pre = np.einsum("ntd,ndf->ntf", x, tc["W_enc"]) + np.asarray(tc["b_enc"])[:, None]
    a = len(graph.active)
    assert a > 50 and (graph.active[:, 1] > 0).all()  # no latent node at BOS
    expected = pre[tuple(graph.active.T)]
    # JumpReLU's output is the pre-activation, here from a pass compiled apart (conftest.PASS_TOL)
    np.testing.assert_allclose(graph.activations, expected, rtol=0, atol=PASS_TOL * np.abs(expected).max())
    logits = np.asarray(out.logits[0, -1], np.float64)
    expected = np.concatenate([expected, logits[graph.logit_tokens] - logits.mean()])
    scale = np.abs(expected).max()
    np.testing.assert_allclose(graph.values, expected, rtol=0, atol=PASS_TOL * scale)  # two passes compiled apart
    # completeness: a target's edges plus its bias are its value, up to the rounding of a sum over every node
    rows = np.concatenate([graph.adjacency[:a], graph.adjacency[-len(graph.logit_tokens):]])
    magnitude = np.abs(rows).sum(axis=1).max() + np.abs(graph.bias).max()
    np.testing.assert_allclose(rows.sum(axis=1) + graph.bias, graph.values, rtol=0,
                               atol=f32_tol(rows.shape[1], magnitude) + PASS_TOL * scale)
    assert not graph.adjacency[a:-len(graph.logit_tokens)].any()  # errors and tokens are sources only
    assert not np.isclose(graph.bias, graph.values, atol=0.1 * scale).all()


def test_edges_equal_finite_differences_of_the_frozen_model(tiny, attributed):
    """Each edge into every target equals the change of the target when the source alone is zeroed in the model
    with patterns and norms frozen and the other latents and errors held (the direct effect), computed with
    `model.forward` and the transcoders' full matrices rather than the graph's gathered rows."""
    cfg, params = tiny
    tc, prompt, graph = attributed
    n, clt = cfg.num_layers, replacement.is_clt(tc)
    latents, errors, embeddings = np.asarray(prompt.latents), np.asarray(prompt.errors), np.asarray(prompt.embeddings)
    residue = np.asarray(prompt.const) - np.asarray(tc["b_dec"])[:, None]

    def targets(f, err, emb):
        seen = {}

        def keep(j):
            def fn(x):
                seen[j] = x[0]
                return x
            return fn

        def write(j):
            def fn(_):
                dec = sum(f[i] @ tc["W_dec"][i, :, j] for i in range(j + 1)) if clt else f[j] @ tc["W_dec"][j]
                return (dec + tc["b_dec"][j] + seen[j] @ tc["W_skip"][j] + err[j] + residue[j])[None]
            return fn

        replace = {Site("mlp_in", j): keep(j) for j in range(n)} | {Site("mlp", j): write(j) for j in range(n)}
        out = model.forward(params, cfg, jnp.asarray(TOKENS)[None], replace=replace, embeddings=jnp.asarray(emb)[None],
                            frozen=prompt.frozen)
        pre = [seen[j] @ tc["W_enc"][j] + tc["b_enc"][j] for j in range(n)]
        layer, pos, idx = graph.active.T
        logits = np.asarray(out.logits[0, -1], np.float64)
        return np.concatenate([np.stack(pre)[layer, pos, idx], logits[graph.logit_tokens] - logits.mean()])

    base = targets(latents, errors, embeddings)
    a, n_errors, t, k = graph.sizes
    scale = np.abs(base).max()
    rng = np.random.default_rng(0)
    for source in [*rng.choice(a, 4, replace=False), a + 2 * t + 3, a + (n - 2) * t + t - 1, a + n_errors,
                   a + n_errors + 5]:
        f, err, emb = latents.copy(), errors.copy(), embeddings.copy()
        if source < a:
            f[tuple(graph.active[source])] = 0
        elif source < a + n_errors:
            err[divmod(source - a, t)] = 0
        else:
            emb[source - a - n_errors] = 0
        change = base - targets(f, err, emb)
        edges = np.concatenate([graph.adjacency[:a, source], graph.adjacency[-k:, source]])
        assert np.abs(edges).max() > 1e-3 or source < a  # the error and token sources chosen do reach targets
        # two passes of the frozen model compiled apart (conftest.PASS_TOL), each at the targets' scale
        np.testing.assert_allclose(edges, change, rtol=0, atol=2 * PASS_TOL * scale)


def test_identity_transcoders_give_the_residual_path(tiny):
    """With W_O = 0 the only path from layer i's MLP output to layer j's MLP input is the residual stream through
    pre_ffw_norm, so with W_enc = W_dec = I latent (i, t, k) reaches latent (j, t, k) alone, for j > i, with weight
    a · inv_j[t] · (1 + scale_j[k]), and the logit of token v with a · inv_final · (1 + scale_final[k]) ·
    (E_v − mean E)[k] from the last position."""
    cfg, params = tiny
    params = jax.tree.map(lambda p: p, params)
    for j in range(cfg.num_layers):
        w = params[f"layer_{j}"]["attn"]["attn_vec_einsum"]["w"]
        params[f"layer_{j}"]["attn"]["attn_vec_einsum"]["w"] = jnp.zeros_like(w)
    n, d = cfg.num_layers, cfg.d_model
    eye = jnp.broadcast_to(jnp.eye(d), (n, d, d))
    tc = {"W_enc": eye, "b_enc": jnp.zeros((n, d)), "threshold": jnp.zeros((n, d)), "W_dec": eye,
          "b_dec": jnp.zeros((n, d))}
    prompt = replacement.prepare(params, cfg, tc, TOKENS, max_logits=3)
    graph = graphs.attribute(params, cfg, tc, prompt, batch_size=256)
    a, n_errors, t, k = graph.sizes
    inv = np.stack([np.asarray(prompt.frozen[model.frozen_key(j, "pre_ffw_norm")])[0, :, 0] for j in range(n)])
    gain = inv[:, :, None] * (1 + np.stack([params[f"layer_{j}"]["pre_ffw_norm"]["scale"] for j in range(n)]))[:, None]
    layer, pos, idx = graph.active.T
    expected = np.zeros((a + k, a + n_errors + t), np.float32)
    later = (layer[:, None] > layer[None, :]) & (pos[:, None] == pos[None, :]) & (idx[:, None] == idx[None, :])
    expected[:a, :a] = later * graph.activations[None, :] * gain[layer, pos, idx][:, None]
    for row, (j, p, i) in enumerate(graph.active):  # errors of every earlier layer and the token, same position
        expected[row, a + np.arange(j) * t + p] = np.asarray(prompt.errors)[:j, p, i] * gain[j, p, i]
        expected[row, a + n_errors + p] = np.asarray(prompt.embeddings)[p, i] * gain[j, p, i]
    unembed = np.asarray(params["embedder"]["input_embedding"])
    dirs = unembed[graph.logit_tokens] - unembed.mean(axis=0)
    final = np.asarray(prompt.frozen["final_norm"])[0, -1, 0] * (1 + np.asarray(params["final_norm"]["scale"]))
    last = pos == t - 1
    expected[a:, :a] = (dirs[:, idx] * final[idx] * graph.activations)[:, :] * last
    expected[a:, a + np.arange(n) * t + t - 1] = (dirs * final) @ np.asarray(prompt.errors)[:, -1].T
    expected[a:, a + n_errors + t - 1] = (dirs * final) @ np.asarray(prompt.embeddings)[-1]
    actual = np.concatenate([graph.adjacency[:a, :-k], graph.adjacency[-k:, :-k]])
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PASS_TOL * np.abs(expected).max())
    assert (np.abs(expected[:a, :a]) > 0).sum() > a  # many latent-to-latent edges, each checked


def test_per_layer_transcoders_are_the_clt_diagonal(tiny, attributed):
    cfg, params = tiny
    tc, prompt, graph = attributed
    if replacement.is_clt(tc):
        pytest.skip("the per-layer case is compared with its diagonal CLT")
    diagonal = dict(tc, W_dec=jnp.einsum("nfd,nm->nfmd", tc["W_dec"], jnp.eye(cfg.num_layers)))
    as_clt = graphs.attribute(params, cfg, diagonal, replacement.prepare(params, cfg, diagonal, TOKENS, 4), 128)
    np.testing.assert_array_equal(as_clt.active, graph.active)
    np.testing.assert_allclose(as_clt.adjacency, graph.adjacency, rtol=0,
                               atol=PASS_TOL * np.abs(graph.adjacency).max())
