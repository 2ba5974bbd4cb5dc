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
