"""Steering: generation matches step-by-step decoding, alpha 0 changes nothing, a large alpha does; bad latents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f32_tol

from gemma_scope import cli, model, release, steer
from gemma_scope.sites import Site


@pytest.fixture(scope="module")
def tiny():
    cfg = model.get_config("gemma3_tiny")
    return cfg, jax.jit(lambda key: model.init_params(cfg, key))(jax.random.key(0))  # jitted: eager init is slow


PROMPT = [2, 17, 301, 45, 9]


def test_greedy_generation_is_the_argmax_of_the_unpadded_sequence(tiny):
    cfg, params = tiny
    out = steer.generate(params, cfg, PROMPT, 6)
    logits = jax.jit(lambda p, t: model.forward(p, cfg, t).logits)(params, jnp.asarray([PROMPT + out]))[0]
    assert out == np.asarray(logits[len(PROMPT) - 1:-1].argmax(-1)).tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_alpha_zero_equals_plain_generation_and_large_alpha_changes_it(tiny, temperature):
    cfg, params = tiny
    direction = np.random.default_rng(0).normal(size=cfg.d_model).astype(np.float32)
    site = Site("res", 3)
    plain = steer.generate(params, cfg, PROMPT, 8, temperature=temperature, seed=3)
    zero = steer.generate(params, cfg, PROMPT, 8, replace=steer.steering(site, direction, 0.0),
                          temperature=temperature, seed=3)
    assert zero == plain
    steered = steer.generate(params, cfg, PROMPT, 8, replace=steer.steering(site, direction, 50.0),
                             temperature=temperature, seed=3)
    assert steered != plain


def test_steering_adds_alpha_times_direction_at_every_position(tiny):
    cfg, params = tiny
    site, direction = Site("mlp", 1), np.arange(cfg.d_model, dtype=np.float32) / cfg.d_model
    tokens = jnp.asarray([PROMPT])
    (fn,) = steer.steering(site, direction, 2.5).values()
    act = model.forward(params, cfg, tokens, capture=[site]).acts[site]
    # a product and a sum, rounded (or fused) per element: two terms of the size of act and 2.5·direction
    np.testing.assert_allclose(fn(act), act + 2.5 * direction, rtol=0,
                               atol=f32_tol(2, np.abs(act).max() + 2.5 * np.abs(direction).max()))


def test_latent_out_of_range_is_a_clear_error(tmp_path, capsys):
    d, width = 64, 8
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(d, width)), "W_dec": rng.normal(size=(width, d)), "b_enc": np.zeros(width),
              "b_dec": np.zeros(d), "threshold": np.zeros(width)}
    path = release.write_sae(tmp_path, Site("res", 2), params, average_l0=3)
    with pytest.raises(ValueError, match=r"latent 8 is out of range: this SAE has 8 latents \(0..7\)"):
        steer.check_latent(release.load_params(path), 8)
    with pytest.raises(SystemExit) as exit_:  # on the command line: one line, exit status 2, before the model loads
        cli.run(steer.main, [f"--sae={path}", "--latent=-1", "--alpha=1", "--prompt=x"])
    assert exit_.value.code == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: latent -1 is out of range: this SAE has 8 latents (0..7)\n"


def test_side_by_side_wraps_columns_and_keeps_newlines():
    text = steer.side_by_side("one two three\nfour", "five", ("left", "right"), width=8)
    assert text.split("\n") == ["left     | right", "-------- | --------", "one two  | five", "three    |",
                                "four     |"]


class _Letters:
    """A tokenizer of lowercase letters: id = ord(c) - 94 (3..28); BOS 2, EOS 1."""

    bos_id, eos_id = 2, 1

    def encode(self, text):
        return [ord(c) - 94 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 94) if 3 <= i < 29 else f"<{i}>" for i in ids)


def test_cli_prints_plain_and_steered_generations_side_by_side(tiny, tmp_path, monkeypatch, capsys):
    cfg, params = tiny
    rng = np.random.default_rng(1)
    d, width = cfg.d_model, 8
    sae_params = {"W_enc": rng.normal(size=(d, width)), "W_dec": rng.normal(size=(width, d)) * 10,
                  "b_enc": np.zeros(width), "b_dec": np.zeros(d), "threshold": np.zeros(width)}
    path = release.write_sae(tmp_path, Site("res", 3), sae_params, average_l0=3)
    monkeypatch.setattr(model, "load", lambda name: model.LoadedModel(cfg, params, make_tokenizer=_Letters))
    monkeypatch.setattr(model, "config_of", lambda name: cfg)  # the checks before the load see the tiny model
    plain, steered = steer.main([f"--sae={path}", "--latent=5", "--alpha=20", "--prompt=abc", "--tokens=5"])
    out = capsys.readouterr().out
    assert "prompt: 'abc'  (res.3, latent 5, alpha 20)" in out
    titles = out.split("\n")[2].split(" | ")
    assert [t.strip() for t in titles] == ["without steering", "with 20 × W_dec[5]"]
    ids = [2] + _Letters().encode("abc")
    expected = steer.generate(params, cfg, ids, 5, replace=steer.steering(Site("res", 3), sae_params["W_dec"][5], 20),
                              stop_id=1)
    assert steered == _Letters().decode(expected)
    assert plain == _Letters().decode(steer.generate(params, cfg, ids, 5, stop_id=1))
    assert plain != steered
