"""Attribution graphs on a tiny random Gemma 3: the replacement map equals the model, edges are complete and equal
finite differences of the frozen model, identity transcoders give the residual path, per-layer transcoders are
the CLT's diagonal; pruning, scores and the JSON against circuit-tracer (when its venv exists); the command and
the offline view in headless Chromium."""

import json
import os
import pathlib
import subprocess

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


def reference_rows(params, cfg, tc, prompt):
    """Today's (before the sweep) definition of the edges: the Jacobian of `replacement.linear_map` (which gathers
    the active latents' rows itself) times each source's value, rows [A + K, A + n·T + T]."""
    inputs = (prompt.embeddings, jnp.asarray(prompt.activations), prompt.errors)
    g_emb, g_act, g_err = jax.jit(jax.jacrev(replacement.linear_map(params, cfg, tc, prompt), argnums=(0, 1, 2)))(
        *inputs)
    by_error = jnp.sum(g_err * prompt.errors, axis=-1).reshape(g_act.shape[0], -1)
    return np.asarray(jnp.concatenate([g_act * inputs[1], by_error, jnp.sum(g_emb * prompt.embeddings, -1)], 1))


def test_every_latent_attributed_gives_the_jacobian_of_the_map(tiny, attributed):
    """With max_feature_nodes ≥ A (or None), any batch size, the graph is the whole Jacobian of the affine map."""
    cfg, params = tiny
    tc, prompt, graph = attributed
    a, k = len(prompt.active), len(prompt.logit_tokens)
    expected = reference_rows(params, cfg, tc, prompt)
    atol = PASS_TOL * np.abs(expected).max()
    assert graph.num_active == a and len(graph.active) == a
    for other in (graph, graphs.attribute(params, cfg, tc, prompt, batch_size=7, max_feature_nodes=a + 5)):
        np.testing.assert_array_equal(other.active, prompt.active)
        np.testing.assert_allclose(other.adjacency[:a, :-k], expected[:a], rtol=0, atol=atol)
        np.testing.assert_allclose(other.adjacency[-k:, :-k], expected[a:], rtol=0, atol=atol)
        assert not other.adjacency[:, -k:].any() and not other.adjacency[a:-k].any()


def test_influence_ordered_subset_keeps_the_top_latents(tiny, attributed):
    """max_feature_nodes = A/3: the latents attributed include the full graph's most influential ones, and the
    subset graph is the full graph restricted to them (their rows, their columns)."""
    cfg, params = tiny
    tc, prompt, full = attributed
    a, errors, t, k = full.sizes
    limit = a // 3
    part = graphs.attribute(params, cfg, tc, prompt, batch_size=8, max_feature_nodes=limit, update_interval=2)
    chosen = np.flatnonzero((prompt.active[:, None] == part.active[None]).all(-1).any(1))
    assert len(chosen) == len(part.active) == limit and part.num_active == a
    influence = graphs._influence(graphs._normalized(full.adjacency), graphs._logit_weights(full))[:a]
    top = np.argsort(-influence)[:limit // 3]
    assert np.isin(top, chosen).all()
    assert influence[chosen].sum() > 0.8 * influence.sum()  # a third of the latents, most of their influence
    keep = np.concatenate([chosen, np.arange(a, a + errors + t + k)])
    np.testing.assert_allclose(part.adjacency, full.adjacency[np.ix_(keep, keep)], rtol=0,
                               atol=PASS_TOL * np.abs(full.adjacency).max())
    np.testing.assert_allclose(part.values, full.values[np.r_[chosen, a:a + k]], rtol=0, atol=0)


def test_pruning_and_scores_on_a_graph_worked_by_hand():
    """tok1 -> f0 (1), tok1 -> f1 (1), and the logit <- f0 (3), f1 (1), error (0, 1) (0.5): influences 2/3, 2/9,
    1/9 and tok1 8/9; keeping 0.8 of the total (17/9) keeps tok1 and f0; replacement 8/9, completeness 25/26."""
    adjacency = np.zeros((7, 7), np.float32)  # f0, f1, err(0, 0), err(0, 1), tok0, tok1, logit
    adjacency[0, 5] = adjacency[1, 5] = 1
    adjacency[6, [0, 1, 3]] = 3, 1, 0.5
    graph = graphs.Graph(np.array([2, 9]), np.array([[0, 1, 0], [0, 1, 1]]), np.ones(2, np.float32), np.array([4]),
                         np.ones(1, np.float32), adjacency, np.zeros(3), np.zeros(3), 1)
    node_mask, edge_mask, cumulative = graphs.prune(graph, 0.8, 0.98)
    assert node_mask.tolist() == [True, False, False, False, True, True, True]
    assert sorted(zip(*np.nonzero(edge_mask))) == [(0, 5), (6, 0)]
    np.testing.assert_allclose(cumulative[[5, 0, 1, 3]], np.cumsum([8, 6, 2, 1]) / 17, rtol=1e-6)
    np.testing.assert_allclose(graphs.scores(graph), (8 / 9, 25 / 26), rtol=1e-6)
    with pytest.raises(ValueError, match="node_threshold must be in \\[0, 1\\], got 1.5"):
        graphs.prune(graph, 1.5)
    rng = np.random.default_rng(0)  # the threshold sorts only nonzero scores: the same as over them all
    for scores in (rng.random((6, 7)) * (rng.random((6, 7)) < 0.4), np.zeros((3, 3)), np.ones((2, 2))):
        for fraction in (0.0, 0.3, 0.9, 1.0):
            ordered = np.sort(scores.ravel())[::-1]
            cumulative = np.cumsum(ordered) / max(ordered.sum(), 1e-30)
            expected = ordered[min(int(np.searchsorted(cumulative, fraction)), len(ordered) - 1)]
            assert graphs._threshold(scores, fraction) == expected


def random_graph(seed, n=3, t=5, per_cell=3, k=3):
    """A random attribution graph with the causal structure of a real one (a latent at layer j reads latents and
    errors of layers < j and tokens; logits read everything), sparse weights of both signs."""
    rng = np.random.default_rng(seed)
    active = np.array([(j, p, i) for j in range(n) for p in range(1, t) for i in range(per_cell)])
    a, errors = len(active), n * t
    size = a + errors + t + k
    layer_of = np.concatenate([active[:, 0], np.repeat(np.arange(n), t), np.full(t, -1), np.full(k, n)])
    is_latent_or_logit = np.r_[np.ones(a, bool), np.zeros(errors + t, bool), np.ones(k, bool)]
    reads = is_latent_or_logit[:, None] & (layer_of[None, :] < layer_of[:, None])
    reads[:, :a] &= layer_of[None, :a] < layer_of[:, None]
    reads[:a, a:a + errors] &= layer_of[None, a:a + errors] < layer_of[:a, None]
    weights = rng.normal(size=(size, size)) * (rng.random((size, size)) < 0.5)
    adjacency = (weights * reads).astype(np.float32)
    probs = np.sort(rng.dirichlet(np.ones(k)))[::-1].astype(np.float32)
    return graphs.Graph(rng.integers(3, 500, t), active, rng.random(a).astype(np.float32) + 0.1,
                        rng.integers(3, 500, k), probs, adjacency, np.zeros(a + k), np.zeros(a + k), n)


@pytest.mark.skipif(not CIRCUIT_TRACER_PYTHON.is_file(),
                    reason=f"no circuit-tracer venv at {CIRCUIT_TRACER_PYTHON} (set CIRCUIT_TRACER_PYTHON; "
                           "pip install torch==2.13.0 circuit-tracer==0.5.0 there)")
def test_pruning_scores_and_json_equal_circuit_tracers_own(tmp_path):
    """circuit-tracer's ``prune_graph``, ``compute_graph_scores`` and ``create_graph_files`` internals, run in its
    venv on the same graph, give the same masks, influence, scores and frontend JSON; its pydantic ``Model``
    reads our file."""
    graph = random_graph(0)
    node_mask, edge_mask, cumulative = graphs.prune(graph, 0.6, 0.9)
    doc = graph_json.graph_model(graph, node_mask, edge_mask, cumulative, lambda i: f"t{i}", "p", "graph", "scan", 0.6)
    path = graph_json.write_graph_files(tmp_path, doc)
    np.savez(tmp_path / "graph.npz", tokens=graph.tokens, adjacency=graph.adjacency, active=graph.active,
             activations=graph.activations, logit_probs=graph.logit_probs, logit_tokens=graph.logit_tokens,
             num_layers=graph.num_layers, node_threshold=0.6, edge_threshold=0.9)
    script = pathlib.Path(__file__).parent / "_circuit_tracer_graph.py"
    subprocess.run([str(CIRCUIT_TRACER_PYTHON), str(script), str(tmp_path / "graph.npz"), str(path),
                    str(tmp_path / "theirs.json")], check=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    theirs = json.loads((tmp_path / "theirs.json").read_text())
    assert theirs["node_mask"] == node_mask.tolist() and 0 < sum(node_mask) < len(node_mask)
    assert theirs["edge_mask"] == np.flatnonzero(edge_mask).tolist()
    np.testing.assert_allclose(theirs["cumulative"], cumulative, rtol=1e-5)
    np.testing.assert_allclose(theirs["scores"], graphs.scores(graph), rtol=1e-5)
    model_doc = theirs["model"]
    assert theirs["ours_nodes"] == len(doc["nodes"])
    assert model_doc["metadata"] == {**doc["metadata"], "prompt": "p"} and model_doc["qParams"] == doc["qParams"]
    for ours, want in zip(doc["nodes"], model_doc["nodes"], strict=True):
        assert ours.keys() == want.keys()
        for key, value in want.items():
            assert ours[key] == pytest.approx(value, rel=1e-5) if isinstance(value, float) else ours[key] == value
    pairs = [[(e["source"], e["target"]) for e in links] for links in (doc["links"], model_doc["links"])]
    assert pairs[0] == pairs[1]
    np.testing.assert_allclose([e["weight"] for e in doc["links"]], [e["weight"] for e in model_doc["links"]])
    listing = json.loads((tmp_path / graph_json.METADATA_FILE).read_text())
    assert listing == {"graphs": [doc["metadata"]]}


class _Letters:
    """Lowercase letters: id = ord(c) - 94 (3..28); BOS 2."""

    bos_id = 2

    def encode(self, text):
        return [ord(c) - 94 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 94) if 3 <= i < 29 else f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def command_output(tiny, tmp_path_factory):
    """The command on per-layer GS2 transcoders (every other one with an affine skip), with an intervention."""
    cfg, params = tiny
    root = tmp_path_factory.mktemp("attribute")
    tc = random_transcoders(cfg, 2)
    for j in range(cfg.num_layers):
        layer = {key: np.asarray(tc[key][j]) for key in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")}
        if j % 2:
            layer["W_skip"] = np.asarray(tc["W_skip"][j])
        gs2.write_gs2(root / "release", Site("mlp_in", j), layer, 15, model_name="tiny", site_out=Site("mlp", j))
    patch = pytest.MonkeyPatch()
    patch.setattr(model, "load", lambda name: model.LoadedModel(cfg, params, make_tokenizer=_Letters))
    try:
        summary = attribute.main([f"--transcoders={root / 'release' / 'transcoder_all'}", "--model=tiny",
                                  "--prompt=thecatsat", f"--out={root / 'graph'}", "--max_logits=3",
                                  "--intervene=2:5:20,4:0:0"])
    finally:
        patch.undo()
    return root, summary, tc


def test_command_writes_the_graph_and_intervenes(tiny, command_output):
    cfg, params = tiny
    root, summary, tc = command_output
    doc = json.loads((root / "graph" / "graph.json").read_text())
    assert summary["tokens"] == 10 and summary["nodes_kept"] == len(doc["nodes"]) > 10
    assert 0 < summary["replacement_score"] < 1 and 0 < summary["completeness_score"] < 1
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert kinds >= {"cross layer transcoder", "embedding", "logit"}
    assert doc["metadata"]["prompt_tokens"] == ["<2>", *"thecatsat"]
    assert (root / "graph" / "index.html").is_file() and (root / "graph" / "graph-data.js").is_file()
    tokens = jnp.asarray([[2, *_Letters().encode("thecatsat")]])
    logits = model.forward(params, cfg, tokens).logits[0, -1]
    before, after = summary["intervention"]["before"], summary["intervention"]["after"]
    np.testing.assert_allclose(before, logits, rtol=0, atol=PASS_TOL * float(jnp.abs(logits).max()))
    assert np.abs(after - before).max() > 1e-2
    # a clamp in the last layer changes no later latent: it adds (value − f) · W_dec[latent] to mlp.6 past BOS
    tc = attribute.load_transcoders(root / "release" / "transcoder_all", cfg.num_layers)
    prompt = replacement.prepare(params, cfg, tc, tokens[0])
    clamped = replacement.rerun(params, cfg, tc, prompt, [(6, 3, 7.0)])
    shift = (7.0 - prompt.latents[6, :, 3]).at[0].set(0.0)[:, None] * tc["W_dec"][6, 3]
    direct = model.forward(params, cfg, tokens, replace={Site("mlp", 6): lambda m: m + shift[None]},
                           frozen=prompt.frozen).logits[0, -1]
    np.testing.assert_allclose(clamped, direct, rtol=0, atol=PASS_TOL * float(jnp.abs(direct).max()))
    assert np.abs(np.asarray(clamped) - np.asarray(logits)).max() > 1e-2


def test_a_clt_directory_loads_as_the_clt_it_holds(tiny, tmp_path):
    from gemma_scope import release

    cfg, _ = tiny
    tc = {k: np.array(v) for k, v in random_transcoders(cfg, 3, clt=True).items()}
    for i in range(cfg.num_layers):  # the release holds no decoder to an earlier layer
        tc["W_dec"][i, :, :i] = 0
    layers = list(range(cfg.num_layers))
    directory = release.write_clt(tmp_path / "rel", tc, layers, n_layers=cfg.num_layers,
                                  average_l0=[1.0] * cfg.num_layers)
    for path in (tmp_path / "rel", directory):
        loaded = attribute.load_transcoders(path, cfg.num_layers)
        assert replacement.is_clt(loaded) and loaded.keys() == tc.keys()
        for key, value in tc.items():
            np.testing.assert_array_equal(np.asarray(loaded[key]), value)
    partial = {k: v[:-1] if k != "W_dec" else v[:-1, :, :-1] for k, v in tc.items()}
    release.write_clt(tmp_path / "partial", partial, layers[:-1], n_layers=cfg.num_layers,
                      average_l0=[1.0] * (cfg.num_layers - 1))
    with pytest.raises(ValueError, match=f"no encoder for layer\\(s\\) {cfg.num_layers - 1}"):
        attribute.load_transcoders(tmp_path / "partial", cfg.num_layers)


def test_command_errors_are_one_line(tiny, command_output, tmp_path, capsys, monkeypatch):
    from gemma_scope import cli

    cfg, params = tiny
    monkeypatch.setattr(model, "load", lambda name: model.LoadedModel(cfg, params, make_tokenizer=_Letters))
    root, _, _ = command_output
    release = root / "release" / "transcoder_all"
    partial = tmp_path / "partial"
    for path in sorted(release.iterdir())[1:]:
        (partial / path.name).mkdir(parents=True)
        for file in path.iterdir():
            (partial / path.name / file.name).write_bytes(file.read_bytes())
    for argv, message in [
        ([f"--transcoders={partial}"], "no transcoder for layer(s) 0 under"),
        ([f"--transcoders={release}", "--intervene=2:5"], "--intervene entry '2:5' is not LAYER:LATENT:VALUE"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(attribute.main, [*argv, "--prompt=ab", f"--out={tmp_path / 'out'}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_view_in_headless_chromium_draws_the_graph_and_shows_a_latent_on_hover(command_output, tmp_path):
    from test_browse import _Chromium, _chromium_executable

    executable = _chromium_executable()
    root, _, _ = command_output
    doc = json.loads((root / "graph" / "graph.json").read_text())
    latent = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, index = latent["layer"], latent["node_id"].split("_")[1]
    browse = tmp_path / "browse" / f"layer_{layer}" / "data" / "latents"
    browse.mkdir(parents=True)
    top = [{"tokens": [" the", " cat"], "act": 4.5}, {"tokens": [" a", " dog"], "act": 2.0}]
    (browse / f"{index}.js").write_text("BROWSE.showLatent(" + json.dumps({"id": int(index), "top": top}) + ");\n")
    contexts = view.latent_contexts(tmp_path / "browse", doc)
    assert contexts == {f"{layer}_{index}": [{"text": " the cat", "act": 4.5}, {"text": " a dog", "act": 2.0}]}
    page = view.write_view(tmp_path / "site", doc, contexts)
    browser = _Chromium(executable, tmp_path / "profile")
    try:
        browser.call("Page.navigate", session=browser.session, url=page.resolve().as_uri())
        browser.wait_event("Page.loadEventFired")
        assert browser.evaluate("document.querySelectorAll('circle.node').length") == len(doc["nodes"])
        assert browser.evaluate("document.querySelectorAll('line.edge').length") == len(doc["links"])
        # Error nodes are drawn first (under the latents of a crowded cell, which stay hoverable).
        drawn = browser.evaluate("[...document.querySelectorAll('circle.node')]"
                                 ".map(c => c.classList.contains('error'))")
        assert 0 < sum(drawn) < len(drawn) and drawn == sorted(drawn, reverse=True)
        selector = f"circle[data-id='{latent['node_id']}']"
        box = browser.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                               ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        browser.call("Input.dispatchMouseEvent", session=browser.session, type="mouseMoved", x=box[0], y=box[1])
        browser.wait_for("document.querySelector('#details .context') !== null")
        assert browser.evaluate("[...document.querySelectorAll('#details .context')].map(c => c.textContent)") == [
            " the cat  (4.50)", " a dog  (2.00)"]
        touching = sum(latent["node_id"] in (e["source"], e["target"]) for e in doc["links"])
        assert browser.evaluate("document.querySelectorAll('line.edge.lit').length") == touching > 0
        assert browser.evaluate("document.getElementById('tooltip').hidden") is False
        assert browser.errors() == []
    finally:
        browser.close()
