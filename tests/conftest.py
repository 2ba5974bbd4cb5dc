"""Test set-up: an emulated 8-device CPU mesh, so sharded code paths run in CI without accelerators."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The 8 emulated devices are threads on what may be 2 loaded cores: XLA aborts the process when a collective's
# threads do not all arrive within its terminate timeout (seen: "only 6 of 8 arrived" under load 20+), so give them
# ten minutes; a true deadlock still ends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Float32 tolerances. XLA's CPU code orders and rounds float32 sums differently by CPU (vector width, FMA), thread
# count, fusion, jit or not and batch size, so two float32 computations of one formula need not agree bitwise. Each
# rounding errs by at most u = 2^-24 relative; a sum of K terms rounded in any order is within (K − 1)·u·Σ|term| of
# the exact sum and a dot product of length K within K·u·Σ|product| (Higham, Accuracy and Stability of Numerical
# Algorithms, §3.1, §4.2); to first order the errors of chained sums add up.
UNIT_ROUNDOFF = 2.0**-24


def f32_tol(terms, magnitude=1.0):
    """Largest difference between two float32 evaluations of a computation whose chained sums have ``terms`` terms
    in all, in any order, each evaluation within ``terms``·u·``magnitude`` of the exact value (or of a float64
    reference). ``magnitude`` bounds the computation redone on absolute values over the elements compared (Σ|term|
    for a sum, |A| @ |B| for a matmul, the value itself for a sum of non-negative terms); 1 gives a relative
    tolerance."""
    return 2 * terms * UNIT_ROUNDOFF * float(magnitude)


# Two float32 passes of a tiny Gemma that XLA compiles differently (jit or eager, other captures or replacements,
# other batch sizes) agree within a few dozen u of the activations' scale: measured ≤ 18·u·max|activation| with
# AVX-512, AVX2 and SSE4.2 code on one or two cores (23·u with XLA's fast-math reassociation). A site lies ~10^3
# roundings deep (≈ 700 a block: norms and projections over d_model = 64 and the FFN's 128 terms, attention over
# ≤ 30 positions) and only all of them aligned could reach ~10^3·u, so atol = PASS_TOL·max|reference| (≈ 170·u of
# the scale) holds with room.
PASS_TOL = 1e-5


def nll_tol(vocab_size, logit_scale):
    """Tolerance of a token NLL (or a mean of them) between passes compiled apart: an NLL moves by at most twice
    its logits' error (PASS_TOL·``logit_scale``) plus the rounding of its log-sum-exp over ``vocab_size`` terms."""
    return 2 * PASS_TOL * logit_scale + f32_tol(vocab_size)


@pytest.fixture(scope="module")
def tiny_gemma():
    """``(params, cfg, tokens int32 [3, 12], mask)``: a random-weight tiny Gemma 3 and token ids starting with BOS,
    the last sequence padded from position 9; mask is True at content tokens."""
    import jax

    from gemma_scope import model

    cfg = model.get_config("gemma3_tiny")
    params = model.init_params(cfg, jax.random.key(3))
    tokens = np.random.default_rng(4).integers(3, cfg.vocab_size, size=(3, 12)).astype(np.int32)
    tokens[:, 0] = 2
    tokens[2, 9:] = 0
    return params, cfg, tokens, tokens > 2


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
