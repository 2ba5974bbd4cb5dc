"""The train step with optax's Adam (``gemma_scope.training.optimizer``) against the same step with the hand-written
Adam it replaced, in one process, the two steps alternating call by call. Run as
``python -m benchmarks.optimizer_step --out FILE``.

The hand-written Adam (``_hand_written_adam``) lives only here, as the baseline: it is the code the step ran before
optax, wrapped as an ``optax.GradientTransformation`` and put in place of ``optimizer.make_optimizer`` while the
baseline step is built and traced (the step calls that function when it is traced, so the compiled baseline keeps
it). Everything else of the two steps (loss, backward, decoder projection and renormalisation, θ clamp) is the same.
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import time_interleaved, worker_args, write_json
from gemma_scope import mesh as mesh_lib
from gemma_scope.training import optimizer
from gemma_scope.training import step as step_lib
from gemma_scope.training.grid import Stack

# name: (group, batch). "default": experiments/gemma3_270m_res.py's grid (res.4/8/12 × target L0 50/100/200, width
# 2048, batch 256); "wide": one SAE of width 16384 on d 640 (batch 1024: a quarter of the matmul work of the SAE-step
# benchmark's 4096 beside the same optimizer work, and the comparison fits in minutes on two cores).
GRIDS = {
    "default": (Stack(sites=("res.4", "res.8", "res.12"), d_model=640, width=2048, l0_coefficients=(1.0,) * 3,
                               target_l0s=(50.0, 100.0, 200.0)), 256),
    "wide": (Stack(sites=("res.0",), d_model=640, width=16384, l0_coefficients=(1e-3,)), 1024),
}


def _hand_written_adam(hp) -> optax.GradientTransformation:
    """The step's Adam before optax: state ``{"count", "nu"[, "mu"]}`` (no first moment when β1 = 0), update
    ``−η(count)·m̂ / (√v̂ + ε)`` on ``optimizer.learning_rate_schedule``."""
    b1, b2 = hp.adam_b1, hp.adam_b2

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return {"count": jnp.zeros((), jnp.int32), "nu": zeros(), **({"mu": zeros()} if b1 else {})}

    def update(grads, opt_state, params=None):
        count = optax.safe_increment(opt_state["count"])
        nu = jax.tree.map(lambda g, v: (1 - b2) * (g**2) + b2 * v, grads, opt_state["nu"])
        new_state = {"count": count, "nu": nu}
        m_hat = grads
        if b1:
            new_state["mu"] = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, opt_state["mu"])
            m_hat = jax.tree.map(lambda m: m / (1 - b1**count).astype(m.dtype), new_state["mu"])
        v_correction = 1 - b2**count
        step_size = -optimizer.learning_rate_schedule(hp)(opt_state["count"])
        scale = lambda m, v: m / (jnp.sqrt(v / v_correction.astype(v.dtype)) + hp.adam_eps)
        return jax.tree.map(lambda m, v: jnp.asarray(step_size, m.dtype) * scale(m, v), m_hat, nu), new_state

    return optax.GradientTransformation(init, update)


def _steps(name: str, warmup: int) -> tuple[dict, dict]:
    """``({"old": call, "new": call}, {"old": cost, "new": cost})``: each call runs one step of the grid on its own
    state and blocks (both compiled and warmed up ``max(warmup, 1)`` times); each cost is XLA's estimate of the
    compiled step's work, ``{"flops", "bytes_accessed"}``, which other load on the machine does not change."""
    grp, batch = GRIDS[name]
    grid, mesh = {name: grp}, mesh_lib.make_mesh(devices=jax.devices()[:1])
    hp = step_lib.Hyperparams(lr_warmup_steps=100, l0_warmup_steps=100,
                              sparsity_loss="target_l0" if grp.target_l0s else "l0")
    rng = np.random.default_rng(0)
    batches = [{name: jax.device_put(rng.standard_normal((grp.n_sites, batch, grp.d_model), dtype=np.float32),
                                     mesh_lib.batch_sharding(mesh))} for _ in range(2)]

    def build():
        box = {"state": step_lib.init_state(jax.random.key(0), grid, hp, mesh), "i": 0,
               "fn": step_lib.make_train_step(grid, hp, mesh)}

        def call():
            box["state"], _ = box["fn"](box["state"], batches[box["i"] % 2])
            box["i"] += 1
            jax.block_until_ready(box["state"])

        for _ in range(max(warmup, 1)):  # the first call traces and compiles
            call()
        cost = box["fn"].lower(box["state"], batches[0]).compile().cost_analysis()
        return call, {"flops": cost["flops"], "bytes_accessed": cost["bytes accessed"]}

    with mock.patch.object(optimizer, "make_optimizer", _hand_written_adam):
        old = build()
    new = build()
    return {"old": old[0], "new": new[0]}, {"old": old[1], "new": new[1]}


def bench(name: str, warmup: int, steps: int) -> dict:
    """Wall seconds per step of the old and the new step on grid ``name``, their median CPU seconds per step
    (``cpu_s``, this process's threads: other processes barely change it) and XLA costs; ``ratio``: new / old
    median, ``paired_ratio``: the median over rounds of new / old within a round (the two calls of a round run
    back to back, so they share the machine's load), ``cpu_ratio``: new / old median CPU seconds."""
    grp, batch = GRIDS[name]
    calls, cost = _steps(name, warmup)
    cpu = {side: [] for side in calls}

    def with_cpu_time(side):
        def call():
            start = time.process_time()
            calls[side]()
            cpu[side].append(time.process_time() - start)
        return call

    stats = time_interleaved({side: with_cpu_time(side) for side in calls}, warmup=0, steps=steps)
    paired = statistics.median(n / o for n, o in zip(stats["new"]["times_s"], stats["old"]["times_s"]))
    return {"grid": name, "saes": grp.n, "d_model": grp.d_model, "width": grp.width, "batch": batch,
            **{side: dict(stats[side], cpu_s=statistics.median(cpu[side]), **cost[side]) for side in calls},
            "ratio": stats["new"]["median_s"] / stats["old"]["median_s"], "paired_ratio": paired,
            "cpu_ratio": statistics.median(cpu["new"]) / statistics.median(cpu["old"])}


def main() -> None:
    parser = worker_args(__doc__.splitlines()[0])
    parser.add_argument("--grids", default=",".join(GRIDS), help="comma list of " + ", ".join(GRIDS))
    args = parser.parse_args()
    write_json(args.out, {"optimizer": [bench(name, args.warmup, args.steps) for name in args.grids.split(",")]})


if __name__ == "__main__":
    main()
