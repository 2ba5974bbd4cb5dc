"""Test set-up: an emulated 8-device CPU mesh, so sharded code paths run in CI without accelerators."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def make_npy_dir(tmp_path):
    """Writes Gaussian float32 activations ``[rows_i, d]`` (× scale) as ``.npy`` files into ``tmp_path/acts``."""

    def make(rows=(600, 424), d=16, scale=5.0):
        rng = np.random.default_rng(0)
        path = tmp_path / "acts"
        path.mkdir()
        for i, n in enumerate(rows):
            np.save(path / f"part{i:02d}.npy", (rng.normal(size=(n, d)) * scale).astype(np.float32))
        return path

    return make


@pytest.fixture
def sparse_dictionary_data():
    """``make(rng, n, d=32, true_latents=64, k=3, noise=0.02) -> (directions, x)``: x = codes @ D + noise, float32
    [n, d], with unit-norm true directions D [true_latents, d] and k non-negative codes per sample (true L0 k)."""

    def make(rng, n, d=32, true_latents=64, k=3, noise=0.02):
        directions = rng.normal(size=(true_latents, d))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        codes = np.zeros((n, true_latents))
        idx = np.argsort(rng.random((n, true_latents)), axis=1)[:, :k]
        np.put_along_axis(codes, idx, rng.uniform(1, 2, size=(n, k)), axis=1)
        return directions, (codes @ directions + noise * rng.normal(size=(n, d))).astype(np.float32)

    return make
