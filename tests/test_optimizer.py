"""The optimizer: a short training run from a fixed seed reproduces the stored reference.

``tests/golden/optimizer_reference.npz`` holds the params and Adam moments after ``_short_run`` of each case in
``CASES``, written by ``python tests/test_optimizer.py`` with the hand-written Adam the step used before optax
(``adam_b1 = 0`` kept no first moment). Keys: ``<case>/params/<group>/<name>``, ``<case>/nu/<group>/<name>``,
``<case>/mu/<group>/<name>`` (β1 ≠ 0 only).
"""

import os
import pathlib

import jax
import numpy as np
import pytest

from gemma_scope import mesh as mesh_lib
from gemma_scope.training import step as step_lib

REFERENCE = pathlib.Path(__file__).parent / "golden/optimizer_reference.npz"
STEPS, BATCH = 24, 32
TOLERANCE = STEPS * 8 * 2.0**-24  # test_short_run_reproduces_the_reference
GRID = {"d16": step_lib.Group(n_sites=2, d_model=16, width=32, l0_coefficients=(1e-3, 1e-2)),
        "tc_skip_d16": step_lib.Group(n_sites=1, d_model=16, width=32, l0_coefficients=(1e-3, 1e-2), transcoder=True,
                                      skip=True)}
# Warmups end halfway through the run, so the stored params see the cosine warmup and the constant rate.
CASES = {"b1_0": step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=12, l0_warmup_steps=12),
         "b1_0.9": step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=12, l0_warmup_steps=12, adam_b1=0.9)}


def _inputs():
    """Per-dimension normalisation constants and ``STEPS`` batches (SAE sites, and a transcoder's (x, y) pair)."""
    rng = np.random.default_rng(0)
    scales = {"d16": rng.uniform(0.5, 2.0, size=(2, 16)).astype(np.float32),
              "tc_skip_d16": rng.uniform(0.5, 2.0, size=(1, 2, 16)).astype(np.float32)}
    batches = []
    for _ in range(STEPS):
        x = (rng.normal(size=(3, BATCH, 16)) * 1.5).astype(np.float32)
        y = (np.tanh(x[2:]) * 3 + rng.normal(size=(1, BATCH, 16)) * 0.1).astype(np.float32)
        batches.append({"d16": x[:2], "tc_skip_d16": (x[2:], y)})
    return scales, batches


def _short_run(hp: step_lib.Hyperparams) -> dict:
    """The train state after ``STEPS`` steps from ``jax.random.key(0)`` on a one-device mesh, on the host."""
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    scales, batches = _inputs()
    state = step_lib.init_state(jax.random.key(0), GRID, hp, mesh, scales)
    train_step = step_lib.make_train_step(GRID, hp, mesh)
    for batch in batches:
        state, _ = train_step(state, batch)
    return jax.device_get(state)


def _moments(state: dict) -> dict[str, dict]:
    """``{"nu": second moments[, "mu": first moments]}`` of the state's optimizer, by group and param name."""
    return {k: v for k, v in state["opt_state"].items() if k in ("nu", "mu")}


def _flat(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/{g}/{name}": np.asarray(a) for g, p in tree.items() for name, a in p.items()}


def _stored(state: dict, case: str) -> dict[str, np.ndarray]:
    """The arrays of ``state`` that the reference stores for ``case``, by key."""
    arrays = _flat(state["params"], f"{case}/params")
    for moment, tree in _moments(state).items():
        arrays |= _flat(tree, f"{case}/{moment}")
    return arrays


@pytest.mark.parametrize("case", sorted(CASES))
def test_short_run_reproduces_the_reference(case):
    """Each array within ``TOLERANCE × max|reference|`` of the stored one.

    The tolerance is a float32 error bound: each of the ``STEPS`` steps rounds every param (|p| ≤ 1: unit-norm
    decoder rows, and the encoder starts as their transpose) a few times (the update's sum, the decoder
    renormalisation's norm and division), at most 8 units of roundoff u = 2⁻²⁴ of the array's scale per step,
    added up linearly; the matmul sums' rounding reaches the params only through updates of size η·O(1), which
    Adam's normalisation keeps at the gradients' relative error. Reordering the batch and latent sums (the same run on
    8 devices, split on 'data' or on 'model') moves each array by at most 0.09 of the bound.
    """
    reference = np.load(REFERENCE)
    state = _short_run(CASES[case])
    arrays = _stored(state, case)
    assert sorted(arrays) == sorted(k for k in reference.files if k.startswith(f"{case}/"))
    for key, array in arrays.items():
        np.testing.assert_allclose(array, reference[key], rtol=0, atol=TOLERANCE * np.abs(reference[key]).max(),
                                   err_msg=key)


if __name__ == "__main__":
    # The tests' device set-up (conftest.py), so the reference run compiles as it does under pytest.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    np.savez(REFERENCE, **{k: v for case, hp in CASES.items() for k, v in _stored(_short_run(hp), case).items()})
