"""Our SAELens files as SAELens itself reads them: ``SAE.load_from_disk`` in the peer venv (torch + sae-lens, made by
``benchmarks/setup_saelens.sh``; test.sh makes ``.venv-peers``) parses the config SAEBench needs and computes the
same encode/decode as ours on the same activations. Skipped, saying why, when no peer venv is found."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f32_tol

from gemma_scope import release, sae
from gemma_scope.sites import Site

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_ENV = "GEMMA_SCOPE_PEER_PYTHON"
PEER_VENVS = (".venv-peers", ".venv-saelens")  # test.sh's, benchmarks/setup_saelens.sh's default


def peer_python() -> pathlib.Path | None:
    """The peer venv's python: $GEMMA_SCOPE_PEER_PYTHON, else the first of ``PEER_VENVS`` under the repository."""
    if os.environ.get(PEER_ENV):
        return pathlib.Path(os.environ[PEER_ENV])
    return next((p for v in PEER_VENVS if (p := ROOT / v / "bin" / "python").exists()), None)


@pytest.fixture(scope="module")
def peer():
    python = peer_python()
    if python is None or not python.exists():
        pytest.skip(f"no SAELens peer venv ({' or '.join(PEER_VENVS)} under the repository, or ${PEER_ENV}); "
                    "make one with `bash benchmarks/setup_saelens.sh .venv-peers`")
    return python


def _params(d: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """A JumpReLU SAE whose latents fire on about a third of the tokens (b_enc − threshold ≈ −0.4·std(pre))."""
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(width, d)).astype(np.float32)
    return {"W_enc": (rng.normal(size=(d, width)) / np.sqrt(d)).astype(np.float32),
            "W_dec": w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True),
            "b_enc": rng.normal(scale=0.1, size=width).astype(np.float32),
            "b_dec": rng.normal(size=d).astype(np.float32),
            "threshold": rng.uniform(0.3, 0.5, size=width).astype(np.float32)}


def test_saelens_loads_our_release_and_matches_our_encode_decode(peer, tmp_path):
    # res and mlp read [n, d]; att is read by SAELens as TransformerLens' hook_z [n, heads, d_head] and flattened.
    cases = {"res.8": (Site("res", 8), (64, 640)), "mlp.3": (Site("mlp", 3), (64, 640)),
             "att.2": (Site("att", 2), (64, 4, 256))}
    width, args, ours = 96, [], {}
    for i, (name, (site, shape)) in enumerate(cases.items()):
        d = int(np.prod(shape[1:]))
        params = _params(d, width, seed=i)
        path = release.write_sae(tmp_path / "release", site, params, average_l0=31.0,
                                 metadata={"model_name": "gemma3_270m", "context_size": 256})
        x = np.random.default_rng(10 + i).normal(size=shape).astype(np.float32)
        np.save(tmp_path / f"{name}.npy", x)
        args.append(f"{path.parent}:{tmp_path / f'{name}.npy'}")
        ours[name] = (path.parent, params, x.reshape(len(x), d))
    out = tmp_path / "peer.json"
    proc = subprocess.run([str(peer), str(ROOT / "tests/peers/saelens_roundtrip.py"), str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(out.read_text())["saes"]
    for name, (site, shape) in cases.items():
        directory, params, x = ours[name]
        cfg = seen[str(directory)]
        d = x.shape[1]
        assert cfg == {"class": "JumpReLUSAE", "architecture": "jumprelu", "d_in": d, "d_sae": width,
                       "dtype": "float32", "param_dtype": "torch.float32", "apply_b_dec_to_input": False,
                       "normalize_activations": "none", "reshape_activations": "hook_z" if site.kind == "att" else "none",
                       "model_name": "google/gemma-3-270m",
                       "hook_name": {"res": "blocks.8.hook_resid_post", "mlp": "blocks.3.hook_mlp_out",
                                     "att": "blocks.2.attn.hook_z"}[site.kind],
                       "context_size": 256, "prepend_bos": True, "hook_head_index": None}, name
        with np.load(directory / "saelens_out.npz") as npz:
            feats, recons = npz["feats"], npz["recons"].reshape(len(x), d)
        f_ours = np.asarray(sae.encode({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x)))
        pre = x.astype(np.float64) @ params["W_enc"] + params["b_enc"]
        # x @ W_enc + b_enc: d products and d additions, then b_enc; both sides are float32 evaluations of it.
        pre_tol = f32_tol(d + 1, (np.abs(x) @ np.abs(params["W_enc"]) + np.abs(params["b_enc"])).max())
        # The two gates may disagree only where pre lies within pre_tol of the threshold (either side may round
        # over it); elsewhere they agree and the latents differ by at most pre_tol.
        near = np.abs(pre - params["threshold"]) <= pre_tol
        assert 0.1 < np.mean(f_ours > 0) < 0.9 and near.mean() < 0.01, name  # both gates exercised, few near ones
        np.testing.assert_array_equal((feats > 0)[~near], (f_ours > 0)[~near], err_msg=name)
        np.testing.assert_allclose(feats[~near], f_ours[~near], rtol=0, atol=pre_tol, err_msg=name)
        agree_or_flip = (np.abs(feats - f_ours) <= pre_tol) | (np.abs(np.maximum(feats, f_ours) - pre) <= pre_tol)
        assert np.all(agree_or_flip[near]), name
        # Decoding: SAELens's reconstruction against ours of SAELens's latents, width + 1 terms per output.
        r_ours = np.asarray(sae.decode({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(feats)))
        magnitude = (np.abs(feats) @ np.abs(params["W_dec"]) + np.abs(params["b_dec"])).max()
        np.testing.assert_allclose(recons, r_ours, rtol=0, atol=f32_tol(width + 1, magnitude), err_msg=name)
