"""The optimizer: optax's Adam on Gemma Scope's schedule; a short training run from a fixed seed reproduces the
stored reference of the hand-written Adam it replaced; its state's shardings; old-format checkpoints.

``tests/golden/optimizer_reference.npz`` holds the params and Adam moments after ``_short_run`` of each case in
``CASES``, written with the hand-written Adam the step used before optax (``adam_b1 = 0`` kept no first moment) by
``np.savez`` of ``_stored`` under this file's device set-up, at the commit that added it (its ``__main__`` block,
removed since: run now it would store optax's numbers). Keys: ``<case>/params/<group>/<name>``,
``<case>/nu/<group>/<name>``, ``<case>/mu/<group>/<name>`` (β1 ≠ 0 only).
"""

import json
import pathlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import f32_tol

from benchmarks import optimizer_step
from gemma_scope import mesh as mesh_lib
from gemma_scope.training import checkpoint, optimizer
from gemma_scope.training import step as step_lib
from gemma_scope.training.grid import Stack

REFERENCE = pathlib.Path(__file__).parent / "golden/optimizer_reference.npz"
STEPS, BATCH = 24, 32
TOLERANCE = STEPS * 8 * 2.0**-24  # derived in test_short_run_reproduces_the_reference
GRID = {"d16": Stack(sites=("res.0", "res.1"), d_model=16, width=32, l0_coefficients=(1e-3, 1e-2)),
        "tc_skip_d16": Stack(sites=("mlp_in.0",), d_model=16, width=32, l0_coefficients=(1e-3, 1e-2), transcoder=True,
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
    return {k: v for k, v in optimizer.format_1_layout(state["opt_state"]).items() if k != "count"}


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
    Adam's normalisation keeps at the gradients' relative error. Measured on the machine that stored the
    reference: optax's Adam lands within 0.04 of the bound of the hand-written one, and reordering the batch and
    latent sums (the same run on 8 devices, split on 'data' or on 'model') within 0.09, so another CPU's matmul
    order fits too; the learning rate of the next count, ε under the root, ε × 10 or no bias correction miss it
    by 14× to 5·10⁷×.
    """
    _assert_matches_reference(_short_run(CASES[case]), case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_benchmark_baseline_is_the_hand_written_adam_of_the_reference(case):
    """``benchmarks.optimizer_step`` times optax against its copy of the hand-written Adam; that copy, put in the
    step as the benchmark puts it, reproduces the reference too (and its dict converts to the optax state)."""
    hp = CASES[case]
    with mock.patch.object(optimizer, "make_optimizer", optimizer_step._hand_written_adam):
        state = _short_run(hp)
    assert set(state["opt_state"]) == {"count", "nu", *(("mu",) if hp.adam_b1 else ())}
    layout = jax.eval_shape(optimizer.make_optimizer(hp).init, state["params"])
    _assert_matches_reference(dict(state, opt_state=optimizer.from_format_1(state["opt_state"], layout)), case)


def _assert_matches_reference(state: dict, case: str) -> None:
    reference = np.load(REFERENCE)
    arrays = _stored(state, case)
    assert sorted(arrays) == sorted(k for k in reference.files if k.startswith(f"{case}/"))
    for key, array in arrays.items():
        np.testing.assert_allclose(array, reference[key], rtol=0, atol=TOLERANCE * np.abs(reference[key]).max(),
                                   err_msg=key)


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_adam_equals_optax_adam(b1):
    hp = step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=3, adam_b1=b1)
    rng = np.random.default_rng(0)
    params = {"W": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), "b": jnp.asarray(rng.normal(size=6), jnp.float32)}
    reference = optax.adam(optimizer.learning_rate_schedule(hp), b1=b1, b2=hp.adam_b2, eps=hp.adam_eps)
    tx = optimizer.make_optimizer(hp)
    ours, theirs = tx.init(params), reference.init(params)
    assert ("mu" in ours[0]._fields) == (b1 != 0)  # β1 = 0 keeps no first moment
    for _ in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        ours_update, ours = jax.jit(tx.update)(grads, ours)
        their_update, theirs = jax.jit(reference.update)(grads, theirs)
        # elementwise, in other orders: per step two-term moment averages, then the update's few roundings, all of
        # the size of the update (a first moment near 0 would defeat a relative tolerance)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=f32_tol(2 * 6 + 4, np.abs(b).max())),
                     ours_update, their_update)
        assert np.abs(np.asarray(ours_update["W"])).max() > 1e-4  # the updates are not trivially zero


def test_learning_rate_schedule_warms_up_from_a_tenth():
    hp = step_lib.Hyperparams(learning_rate=2e-3, lr_warmup_steps=4)
    schedule = optimizer.learning_rate_schedule(hp)
    expected = [2e-3 * (0.1 + 0.45 * (1 - np.cos(np.pi * t / 4))) for t in range(4)] + [2e-3, 2e-3]
    np.testing.assert_allclose([float(schedule(jnp.int32(t))) for t in range(6)], expected, rtol=1e-6)
    flat = optimizer.learning_rate_schedule(step_lib.Hyperparams(learning_rate=2e-3, lr_warmup_steps=0))
    assert float(flat(jnp.int32(0))) == np.float32(2e-3)


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_moments_take_their_params_shardings(b1):
    """Moments of the latent-axis params live on 'model' like the params; the counts are replicated."""
    grid = {"g": Stack(sites=("res.0",), d_model=16, width=64, l0_coefficients=(1e-3,))}
    state = step_lib.init_state(jax.random.key(0), grid, step_lib.Hyperparams(adam_b1=b1), mesh_lib.make_mesh(2, 4))
    moments, schedule = state["opt_state"]
    assert moments.count.sharding.spec == schedule.count.sharding.spec == jax.sharding.PartitionSpec()
    for tree in (moments.nu, *((moments.mu,) if b1 else ())):
        for name, param in state["params"]["g"].items():
            assert tree["g"][name].sharding == param.sharding, name
    assert {s.data.shape for s in moments.nu["g"]["W_enc"].addressable_shards} == {(1, 16, 16)}  # M=64 over 4


# --- checkpoints of the train state ------------------------------------------------------------------------------

_CKPT_GRID = {"g": Stack(sites=("res.0",), d_model=16, width=64, l0_coefficients=(1e-3, 1e-2))}


def _trained_state(hp, mesh, steps=3):
    rng = np.random.default_rng(2)
    state = step_lib.init_state(jax.random.key(0), _CKPT_GRID, hp, mesh)
    train_step = step_lib.make_train_step(_CKPT_GRID, hp, mesh)
    for _ in range(steps):
        state, _ = train_step(state, {"g": rng.normal(size=(1, 64, 16)).astype(np.float32)})
    return state, train_step


def _save(directory, state, state_format):
    saver = checkpoint.Checkpointer(directory, every=1, keep=1, state_format=state_format)
    saver.save(3, state, force=True)
    saver.close()


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_format_1_checkpoint_restores_into_the_optax_state(tmp_path, b1):
    """A checkpoint as the hand-written Adam wrote it (``opt_state = {"count", "nu"[, "mu"]}``, no format file)
    restores with the same numbers and shardings, and training goes on from it exactly."""
    hp = step_lib.Hyperparams(learning_rate=1e-2, lr_warmup_steps=2, adam_b1=b1)
    mesh = mesh_lib.make_mesh(2, 4)
    state, train_step = _trained_state(hp, mesh)
    expected = jax.device_get(state)
    old = dict(state, opt_state=optimizer.format_1_layout(state["opt_state"]))
    assert set(old["opt_state"]) == {"count", "nu", *(("mu",) if b1 else ())}
    _save(tmp_path, old, state_format=1)
    step_dir = tmp_path / "3"  # as written before formats were recorded: no format file in the seal
    (step_dir / checkpoint.STATE_FORMAT_FILE).unlink()
    (step_dir / checkpoint.CHECKSUMS_FILE).write_text(json.dumps(checkpoint.file_checksums(step_dir)))

    reader = checkpoint.Checkpointer(tmp_path, every=1, keep=1, state_format=step_lib.STATE_FORMAT)
    assert reader.latest_step() == 3 and reader.state_format(3) == 1
    restored = step_lib.restore_state(reader, 3, _CKPT_GRID, hp, mesh)
    reader.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.sharding == b.sharding, restored, state)) == \
        [True] * len(jax.tree.leaves(state))
    batch = {"g": np.random.default_rng(3).normal(size=(1, 64, 16)).astype(np.float32)}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(train_step(restored, batch)),
                 jax.device_get(train_step(state, batch)))


def test_checkpoints_record_their_format_and_other_formats_are_refused(tmp_path):
    hp = step_lib.Hyperparams(learning_rate=1e-2)
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    state, _ = _trained_state(hp, mesh, steps=1)
    _save(tmp_path / "now", state, step_lib.STATE_FORMAT)
    assert json.loads((tmp_path / "now/3" / checkpoint.STATE_FORMAT_FILE).read_text()) == {"state_format": 2}
    assert checkpoint.STATE_FORMAT_FILE in json.loads((tmp_path / "now/3" / checkpoint.CHECKSUMS_FILE).read_text())
    reader = checkpoint.Checkpointer(tmp_path / "now", every=1, keep=1, state_format=step_lib.STATE_FORMAT)
    restored = step_lib.restore_state(reader, 3, _CKPT_GRID, hp, mesh)
    reader.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))

    _save(tmp_path / "future", state, 99)
    reader = checkpoint.Checkpointer(tmp_path / "future", every=1, keep=1, state_format=step_lib.STATE_FORMAT)
    with pytest.raises(ValueError, match="checkpoint step 3 has train-state format 99; this version reads formats "
                                         "1 to 2"):
        step_lib.restore_state(reader, 3, _CKPT_GRID, hp, mesh)
    reader.close()
