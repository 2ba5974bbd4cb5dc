"""The feature browser: running top-k against brute force, statistics, promoted tokens against numpy, the site."""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f32_tol

from gemma_scope import browse, model
from gemma_scope.evaluation import latent_site, latents
from gemma_scope.sites import Site


def _random_batches(rng, num_batches=5, b=3, t=11, m=6):
    """Sparse positive activations [B, T, M] (about 60% zeros) and masks with a few False positions."""
    out = []
    for _ in range(num_batches):
        f = rng.exponential(size=(b, t, m)).astype(np.float32) * (rng.random((b, t, m)) < 0.4)
        mask = rng.random((b, t)) < 0.85
        out.append((f, mask))
    return out


def test_running_topk_equals_brute_force_topk():
    rng = np.random.default_rng(0)
    batches = _random_batches(rng)
    k, before, after = 4, 3, 2
    stats = latents.empty_stats(6, k, samples=5, before=before, after=after)
    update = jax.jit(latents.update_stats)
    for i, (f, mask) in enumerate(batches):
        stats = update(stats, jnp.asarray(f), jnp.asarray(mask), jnp.int32(i * f[:, :, 0].size), jax.random.key(i))
    stats = jax.tree.map(np.asarray, stats)

    f_all = np.concatenate([np.where(m[..., None], f, 0) for f, m in batches])  # [S, T, M], sequence-major ids
    s, t, m = f_all.shape
    flat = f_all.reshape(s * t, m)
    padded = np.pad(f_all, ((0, 0), (before, after), (0, 0)))
    for latent in range(m):
        fired = np.flatnonzero(flat[:, latent] > 0)
        order = fired[np.argsort(-flat[fired, latent], kind="stable")][:k]
        found = stats.top.ids[latent][np.isfinite(stats.top.keys[latent])]
        np.testing.assert_array_equal(found, order)
        np.testing.assert_allclose(stats.top.keys[latent][:len(order)], flat[order, latent])
        for j, token in enumerate(order):
            seq, pos = divmod(int(token), t)
            np.testing.assert_allclose(stats.top.windows[latent, j], padded[seq, pos:pos + before + 1 + after, latent])
        assert stats.count[latent] == len(fired)
        # a sum of non-negative terms, in other orders
        np.testing.assert_allclose(stats.total[latent], flat[fired, latent].sum(), rtol=f32_tol(len(fired)))
        # the random sample: distinct firing tokens, as many as fit, each with its own activation at the centre
        sampled = stats.sample.ids[latent][np.isfinite(stats.sample.keys[latent])]
        assert len(sampled) == min(5, len(fired)) and len(set(sampled)) == len(sampled)
        assert set(sampled) <= set(fired)
        np.testing.assert_allclose(stats.sample.windows[latent, :len(sampled), before], flat[sampled, latent])
    assert stats.tokens == sum(mask.sum() for _, mask in batches)
    bins = np.floor(np.log2(flat[flat > 0]) * latents.BINS_PER_OCTAVE).astype(int) - latents.LOWEST_BIN
    assert stats.hist.sum() == len(bins)
    np.testing.assert_array_equal(stats.hist.sum(axis=0), np.bincount(np.clip(bins, 0, latents.NUM_BINS - 1),
                                                                       minlength=latents.NUM_BINS))


def _tiny_lm():
    cfg = model.get_config("gemma3_tiny")
    params = jax.jit(lambda key: model.init_params(cfg, key))(jax.random.key(0))
    params["final_norm"]["scale"] = jax.random.normal(jax.random.key(1), params["final_norm"]["scale"].shape)
    return cfg, params


def test_promoted_tokens_equal_direct_numpy_computation():
    cfg, params = _tiny_lm()
    w_dec = np.random.default_rng(0).normal(size=(70, cfg.d_model)).astype(np.float32)
    up_ids, up, down_ids, down = latents.logit_effects(params, cfg, w_dec, k=7, chunk=16)
    embedding = np.asarray(params["embedder"]["input_embedding"], np.float64)
    scores = (w_dec * (1 + np.asarray(params["final_norm"]["scale"], np.float64))) @ embedding.T  # [M, vocab]
    np.testing.assert_array_equal(up_ids, np.argsort(-scores, axis=1)[:, :7])
    np.testing.assert_array_equal(down_ids, np.argsort(scores, axis=1)[:, :7])
    np.testing.assert_allclose(up, np.take_along_axis(scores, up_ids, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(down, np.take_along_axis(scores, down_ids, 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expected \\[M, d_model=64\\]"):
        latents.logit_effects(params, cfg, w_dec[:, :10])


def _tiny_sae(cfg, width=12, seed=0):
    rng = np.random.default_rng(seed)
    d = cfg.d_model
    return {"W_enc": rng.normal(size=(d, width)).astype(np.float32), "b_enc": np.zeros(width, np.float32),
            "W_dec": rng.normal(size=(width, d)).astype(np.float32), "b_dec": np.zeros(d, np.float32),
            "threshold": np.full(width, 0.5, np.float32)}


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """A browser site of a random SAE (12 latents) at res.2 of a random tiny Gemma 3 on random tokens:
    (index.html path, stats, tokens). Latent 0 is made dead (threshold above any activation)."""
    out, width = tmp_path_factory.mktemp("site"), 12
    cfg, params = _tiny_lm()
    sae_params = _tiny_sae(cfg, width)
    sae_params["threshold"][0] = 1e9
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, size=(8, 24)).astype(np.int32)
    tokens[:, 0] = 2
    mask = tokens != 2
    batches = [(tokens[i:i + 4], mask[i:i + 4]) for i in (0, 4)]
    stats = latents.collect(params, cfg, batches, Site("res", 2), sae_params, k=5, samples=8, before=4, after=2,
                            progress=False)
    promoted = latents.logit_effects(params, cfg, sae_params["W_dec"], k=5)
    index = latent_site.write_site(out, stats, tokens, lambda i: f" w{i}", promoted=promoted, meta={"model": "tiny"})
    return index, stats, tokens


def test_site_files_hold_the_pass(tiny_site):
    index, stats, tokens = tiny_site
    site = index.parent
    data = json.loads((site / "data/index.js").read_text().removeprefix("var BROWSE_INDEX = ").rstrip(";\n"))
    rows = {row[0]: dict(zip(data["columns"], row)) for row in data["latents"]}
    assert sorted(rows) == list(range(12)) and rows[0]["flag"] == "dead" and rows[0]["frequency"] == 0
    assert data["tokens"] == 8 * 23
    latent = json.loads((site / "data/latents/3.js").read_text().removeprefix("BROWSE.showLatent(")
                        .rstrip(");\n"))
    assert latent["count"] == stats.count[3] > 0
    assert latent["max"] == pytest.approx(float(stats.top.keys[3, 0]), rel=1e-3)
    top = latent["top"][0]
    seq, pos = divmod(int(stats.top.ids[3, 0]), 24)
    assert top["tokens"][top["center"]] == f" w{tokens[seq, pos]}"
    assert top["acts"][top["center"]] == top["act"] == latent["max"]
    assert sum(latent["hist"]["counts"]) == latent["count"]
    for group in latent["samples"]:
        for context in group["contexts"]:
            assert 0 < context["act"] <= latent["max"]
    assert index.is_file() and (site / "browser.js").is_file() and (site / "style.css").is_file()


class _Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
    ended by NUL, commands on the browser's fd 3, replies and events on its fd 4), so no client library is needed.
    """

    def __init__(self, executable, profile_dir):
        import subprocess

        self._to_browser_r, self._to_browser_w = os.pipe()
        self._from_browser_r, self._from_browser_w = os.pipe()
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
                f"--user-data-dir={profile_dir}", "--window-size=1280,900", "about:blank"]
        # the shell puts our pipe ends on fds 3 and 4, where Chromium expects them
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{self._to_browser_r} 4>&{self._from_browser_w}', "chromium", *args],
            pass_fds=(self._to_browser_r, self._from_browser_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(self._to_browser_r)
        os.close(self._from_browser_w)
        self._buffer, self._next_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=self.session)

    def _read(self, timeout):
        import select

        while b"\0" not in self._buffer:
            if not select.select([self._from_browser_r], [], [], timeout)[0]:
                raise TimeoutError("Chromium did not answer over the DevTools pipe")
            chunk = os.read(self._from_browser_r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, session=None, timeout=30, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser_w, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method, timeout=30):
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(timeout))

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=10):
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {expression}")
            time.sleep(0.05)

    def click(self, selector):
        """A real mouse click (press and release) at the centre of the element ``selector``."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=self.session, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def errors(self):
        """Console errors, uncaught exceptions and failed loads the page reported."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(params["exceptionDetails"])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                out.append(params["args"])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(params["entry"])
        return out

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
        os.close(self._to_browser_w)
        os.close(self._from_browser_r)


def _chromium_executable():
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        pytest.skip("no Chromium on this machine: the browser test needs the Debian package `chromium` "
                    "(`apt-get install -y chromium`, as .ci/run does)")
    return found


def test_site_in_headless_chromium_lists_latents_and_shows_highlighted_contexts(tiny_site, tmp_path):
    executable = _chromium_executable()
    index, stats, tokens = tiny_site
    browser = _Chromium(executable, tmp_path / "profile")
    try:
        browser.call("Page.navigate", session=browser.session, url=index.resolve().as_uri())
        browser.wait_event("Page.loadEventFired")
        assert browser.evaluate("document.querySelectorAll('#index tbody tr').length") == 12
        assert browser.evaluate("document.querySelector('#index tbody tr[data-id=\"0\"] .flag.dead') !== null")
        # in latent order on load; a click on a header sorts by that column, descending
        listed = "[...document.querySelectorAll('#index tbody tr')].map(r => +r.dataset.id)"
        assert browser.evaluate(listed) == list(range(12))
        browser.click("th[data-key='frequency']")
        by_frequency = sorted(range(12), key=lambda i: (-round(stats.count[i] / int(stats.tokens), 4), i))
        assert browser.evaluate(listed) == by_frequency
        browser.click("th[data-key='max']")
        assert browser.evaluate(listed)[0] == int(np.argmax(stats.top.keys[:, 0]))

        latent = int(np.argmax(stats.count))
        browser.click(f"#index tbody tr[data-id='{latent}']")
        browser.wait_for("document.querySelectorAll('#detail .contexts.top .context').length > 0")
        assert browser.evaluate("location.hash") == f"#latent={latent}"
        assert browser.evaluate("document.querySelector('#detail h2').textContent").startswith(f"Latent {latent}")
        contexts = browser.evaluate("document.querySelectorAll('#detail .contexts.top .context').length")
        assert contexts == min(5, int(stats.count[latent]))
        peaks = browser.evaluate("[...document.querySelectorAll('#detail .contexts.top .tok.peak')].map(t => "
                                 "[t.textContent, t.style.backgroundColor])")
        assert len(peaks) == contexts
        first = divmod(int(stats.top.ids[latent, 0]), tokens.shape[1])
        assert peaks[0] == [f" w{tokens[first]}", "rgba(255, 140, 0, 0.85)"]  # the peak has full intensity
        assert browser.evaluate("document.querySelectorAll('#detail .tok.on').length") >= contexts
        assert browser.evaluate("document.querySelectorAll('#detail svg.hist rect').length") > 0
        assert browser.evaluate("document.querySelectorAll('#detail .tokens-list.up span').length") == 5

        # the search matches promoted tokens
        promoted = browser.evaluate("document.querySelector('#detail .tokens-list.up span').textContent")
        browser.evaluate(f"const s = document.getElementById('search'); s.value = {json.dumps(promoted.strip())};"
                         "s.dispatchEvent(new Event('input'))")
        matches = browser.evaluate("[...document.querySelectorAll('#index tbody tr')].map(r => +r.dataset.id)")
        assert latent in matches and len(matches) < 12
        assert browser.errors() == []
        # a missing latent file shows a message, and the error check sees the failed load
        browser.evaluate("location.hash = 'latent=99'")
        browser.wait_for("document.querySelector('#detail .missing') !== null")
        assert browser.errors()
    finally:
        browser.close()


class ByteTokenizer:
    """Token id = ASCII byte + 3 (pad 0, EOS 1, BOS 2), as in tests/test_data.py, with the pieces the site shows."""

    vocab_size, bos_id, eos_id, pad_id = 259, 2, 1, 0
    model_proto = b"bytes+3"

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(int(i) - 3 for i in ids if int(i) > 2).decode()

    def id_to_piece(self, i):
        return chr(i - 3) if i > 2 else ["<pad>", "<eos>", "<bos>"][i]


def test_cli_writes_the_site_of_a_released_sae_from_held_out_text(tmp_path, monkeypatch, capsys):
    from gemma_scope import release
    from gemma_scope.data import SequenceReader, TextFiles, build_corpus

    rng = np.random.default_rng(0)
    (tmp_path / "text").mkdir()
    for k in range(30):
        (tmp_path / "text" / f"doc{k}.txt").write_text(" ".join(rng.choice(["cat", "dog", "sun"], size=80)))
    build_corpus([TextFiles([str(tmp_path / "text" / "*.txt")], name="words")], tmp_path / "corpus", ByteTokenizer(),
                 heldout_fraction=0.3, log=lambda *_: None)
    cfg, params = _tiny_lm()
    lm = model.LoadedModel(config=cfg, params=params, make_tokenizer=ByteTokenizer)
    monkeypatch.setattr(model, "load", lambda name: lm)
    monkeypatch.setattr(model, "config_of", lambda name: cfg)  # the checks before the load see the tiny model
    sae_file = release.write_sae(tmp_path / "release", Site("res", 2), _tiny_sae(cfg), average_l0=4)

    index = browse.main([f"--sae={sae_file.parent}", f"--out={tmp_path / 'site'}", f"--corpus={tmp_path / 'corpus'}",
                         "--tokens=256", "--seq_len=32", "--lm_batch_size=4", "--top_k=3"])
    assert capsys.readouterr().out.strip() == str(index)
    data = json.loads((index.parent / "data/index.js").read_text().removeprefix("var BROWSE_INDEX = ").rstrip(";\n"))
    assert data["meta"]["site"] == "res.2" and len(data["latents"]) == 12
    reader = SequenceReader(tmp_path / "corpus", split="heldout", seq_len=32)
    assert data["tokens"] == sum(reader.sequence(i)[1].sum() for i in range(8))  # 256 tokens: 8 sequences
    live = [row for row in data["latents"] if row[4] != "dead"]
    assert live and all(set(row[6]) <= set("catdogsun <eos><bos>") for row in live)  # context text is held-out text
    latent = json.loads((index.parent / f"data/latents/{live[0][0]}.js").read_text()
                        .removeprefix("BROWSE.showLatent(").rstrip(");\n"))
    assert len(latent["top"]) == 3 and len(latent["promoted"]) == 10
