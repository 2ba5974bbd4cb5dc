"""The LM-driven activation source: content tokens only, sites aligned row by row, exact resume."""

import jax
import numpy as np
import pytest
from conftest import PASS_TOL

from gemma_scope import model
from gemma_scope.activations import ModelSource
from gemma_scope.sites import Site

SITES = [Site("res", 0), Site("att", 1), Site("mlp", 1)]


class FakeReader:
    """Sequence batches as a pure function of the batch index: BOS first, a few pad positions at the end."""

    seq_len = 12

    def batch(self, index, batch_size):
        rng = np.random.default_rng(index)
        tokens = rng.integers(3, 200, size=(batch_size, 12)).astype(np.int32)
        tokens[:, 0] = 2
        tokens[:, -rng.integers(1, 4):] = 0
        return {"tokens": tokens, "mask": tokens > 2}


@pytest.fixture(scope="module")
def lm():
    cfg = model.get_config("gemma3_tiny")
    return model.LoadedModel(cfg, model.init_params(cfg, jax.random.key(0)), make_tokenizer=lambda: None)


def source(lm, passes=1):
    return ModelSource(lm, FakeReader(), SITES, chunk_sequences=4, forward_batch=2, passes=passes, seed=3)


def per_site(src, batch):
    """{site: float32 [B, d]} of a source's group batch."""
    return {s: np.asarray(batch[g][i], np.float32) for g, names in src.groups.items() for i, s in enumerate(names)}


def content_activations(lm, index):
    """{site: [n, d]} of chunk `index`'s content tokens, by a direct forward pass."""
    batch = FakeReader().batch(index, 4)
    acts = model.forward(lm.params, lm.config, batch["tokens"], capture=SITES, logits=False).acts
    return {str(s): np.asarray(acts[s])[batch["mask"]] for s in SITES}


def test_batches_are_the_content_activations_of_each_chunk_shuffled_with_sites_aligned(lm):
    want = content_activations(lm, 0)
    n = len(want["res.0"])
    src = source(lm)
    batches = [per_site(src, b) for _, b in zip(range(n // 8), src.batches(8))]
    got = {s: np.concatenate([b[s] for b in batches]) for s in want}
    # Each returned row is the activation of one content token, the same token at every site. Forward batches of 2
    # and 4 are compiled apart, so their float32 rounding differs (conftest.PASS_TOL).
    tol = {s: PASS_TOL * np.abs(want[s]).max() for s in want}
    for i in range(len(got["res.0"])):
        row = np.nonzero(np.all(np.isclose(want["res.0"], got["res.0"][i], rtol=0, atol=tol["res.0"]), axis=1))[0]
        assert len(row) == 1
        for s in want:
            np.testing.assert_allclose(got[s][i], want[s][row[0]], rtol=0, atol=tol[s])
    assert not np.allclose(got["res.0"], want["res.0"][: len(got["res.0"])])  # shuffled
    assert {s: b.shape[1] for s, b in batches[0].items()} == {"res.0": 64, "att.1": 64, "mlp.1": 64}
    assert src.groups == {"d64": ["res.0", "att.1", "mlp.1"]}


@pytest.mark.parametrize("passes", [1, 2])
def test_resume_at_any_batch_is_the_uninterrupted_stream(lm, passes):
    stream = [np.asarray(b["d64"]) for _, b in zip(range(14), source(lm, passes).batches(8))]
    for start in (0, 3, 5, 9, 13):
        resumed = next(source(lm, passes).batches(8, start))
        np.testing.assert_array_equal(np.asarray(resumed["d64"]), stream[start])
    ended = [np.asarray(b["d64"]) for b in source(lm, passes).batches(8, 3, stop=9)]
    assert len(ended) == 6 and all(np.array_equal(a, b) for a, b in zip(ended, stream[3:9]))


def test_bad_arguments_raise_clear_errors(lm):
    with pytest.raises(ValueError, match="multiple of data.forward_batch"):
        ModelSource(lm, FakeReader(), SITES, chunk_sequences=5, forward_batch=2)
    with pytest.raises(ValueError, match="beyond"):
        ModelSource(lm, FakeReader(), [Site("res", 9)], chunk_sequences=4, forward_batch=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_written_shards_read_back_with_manifest(lm, tmp_path, dtype):
    from gemma_scope.activations import NpyShardSource
    from gemma_scope.activations.shards import open_shards, write_shards

    src = source(lm)
    dirs = write_shards(src, tmp_path, tokens=41, storage_dtype=dtype, token_source={"split": "train"})
    assert sorted(dirs) == ["att.1", "mlp.1", "res.0"]
    arrays, manifest = open_shards(dirs["mlp.1"])
    first = content_activations(lm, 0)["mlp.1"]
    assert manifest["site"] == "mlp.1" and manifest["dtype"] == dtype and manifest["d"] == 64
    assert manifest["count"] == sum(len(a) for a in arrays) > len(first) and len(arrays) == 2  # chunk 0 is 40
    # forward batches of 2 and 4 (conftest.PASS_TOL); bfloat16 storage adds its rounding, 2^-8 relative
    rtol, atol = (0, PASS_TOL * np.abs(first).max()) if dtype == "float32" else (1e-2, 1e-2)
    np.testing.assert_allclose(np.asarray(arrays[0], np.float32), first, rtol=rtol, atol=atol)
    npy = NpyShardSource(dirs["mlp.1"])  # the site comes from the manifest
    batch = next(npy.batches(8))["d64"]
    assert npy.sites == ["mlp.1"] and batch.dtype == dtype and batch.shape == (1, 8, 64)


def test_corrupt_or_refused_shards_give_clear_errors(lm, tmp_path):
    from gemma_scope.activations.shards import open_shards, write_shards

    dirs = write_shards(source(lm), tmp_path, tokens=1)
    np.save(dirs["res.0"] / "shard_00000.npy", np.zeros((3, 64), np.float32))  # truncated shard
    with pytest.raises(ValueError, match="disagrees with"):
        open_shards(dirs["res.0"])
    with pytest.raises(ValueError, match="not empty"):
        write_shards(source(lm), tmp_path, tokens=1)
    with pytest.raises(FileNotFoundError, match="no .npy files"):
        open_shards(tmp_path)


def test_on_two_devices_each_device_shuffles_the_content_of_its_half_of_the_chunk(lm):
    from gemma_scope.mesh import make_mesh

    batch = FakeReader().batch(0, 4)
    acts = np.asarray(model.forward(lm.params, lm.config, batch["tokens"], capture=SITES, logits=False).acts[SITES[0]])
    halves = [acts[:2][batch["mask"][:2]], acts[2:][batch["mask"][2:]]]  # sequences 0-1 on device 0, 2-3 on 1
    mesh = make_mesh(devices=jax.devices()[:2])
    stream = [per_site(source(lm), b)["res.0"] for _, b in zip(range(7), source(lm).batches(8, 0, mesh))]
    for got in stream[:2]:  # chunk 0: 20 content tokens per device, 4 per batch: 5 batches
        for part, half in zip((got[:4], got[4:]), halves):
            # a pass per device against one over all 4 sequences (conftest.PASS_TOL)
            tol = PASS_TOL * np.abs(half).max()
            assert all(np.isclose(half, row, rtol=0, atol=tol).all(axis=1).any() for row in part)
    for start in (2, 6):  # within chunk 0, and in chunk 1 (16 per device: 4 batches)
        resumed = per_site(source(lm), next(source(lm).batches(8, start, mesh)))["res.0"]
        np.testing.assert_array_equal(resumed, stream[start])


def test_a_buffer_that_cannot_fit_or_fill_a_batch_fails_before_any_forward_pass(lm):
    huge = ModelSource(lm, FakeReader(), SITES, chunk_sequences=2**26, forward_batch=2)
    with pytest.raises(MemoryError, match="lower data.chunk_sequences, data.seq_len or data.buffer_dtype"):
        huge.batches(8)
    with pytest.raises(ValueError, match="raise data.chunk_sequences"):
        next(source(lm).batches(64))
