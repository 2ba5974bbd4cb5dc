"""Our JumpReLU SAE train step (``build_benchmark_step``: ``gemma_scope.step.make_train_step``: forward, loss, backward, decoder
gradient projection, Adam, unit-norm decoder rows, θ ≥ 0 — the jitted step the trainer runs) at the issue's
shapes, float32 and bfloat16 matmul inputs. Run as ``python -m benchmarks.sae_step --out FILE``.
"""

from __future__ import annotations

import jax
import jaxlib
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import (
    sae_step_flops_per_token,
    sae_step_rows,
    step_worker_args,
    throughput,
    time_calls,
    write_json,
)
from gemma_scope import mesh as mesh_lib
from gemma_scope.training import step


def build_benchmark_step(d_model: int, width: int, batch_size: int, compute_dtype: str = "float32",
                         n_saes: int = 1, mesh: jax.sharding.Mesh | None = None):
    """The trainer's jitted step (``step.make_train_step``) on one activation stream (issue 6).

    ``n_saes`` SAEs (a λ sweep) read one batch; forward, loss, backward, Adam and decoder renormalisation run as in
    training. The state buffers are donated, so always use the returned state.

    Args:
      d_model, width, batch_size: sizes d, M, B (B divisible by the mesh's data size).
      compute_dtype: "float32" or "bfloat16" matmul inputs (float32 accumulation).
      mesh: a ('data', 'model') mesh; default all devices on 'data'.

    Returns:
      ``(state, step_fn)`` with ``step_fn(state, x) -> state`` for x float32/bfloat16 ``[batch_size, d_model]``.
    """
    mesh = mesh or mesh_lib.make_mesh()
    lambdas = tuple(float(v) for v in np.geomspace(1e-4, 1e-2, n_saes)) if n_saes > 1 else (1e-3,)
    grid = {"bench": step.Group(n_sites=1, d_model=d_model, width=width, l0_coefficients=lambdas)}
    hp = step.Hyperparams(compute_dtype=compute_dtype, lr_warmup_steps=0, l0_warmup_steps=0)
    train_step = step.make_train_step(grid, hp, mesh)
    sharding = mesh_lib.batch_sharding(mesh)
    return step.init_state(jax.random.key(0), grid, hp, mesh), \
        lambda state, x: train_step(state, {"bench": jax.device_put(x[None], sharding)})[0]


def _batches(mesh, d_model: int, batch: int, count: int = 2) -> list[jax.Array]:
    """Random non-zero activations, N(0, 1) float32 [batch, d] on the mesh (same distribution as SAELens's)."""
    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P("data", None))
    return [jax.device_put(rng.standard_normal((batch, d_model), dtype=np.float32), sharding) for _ in range(count)]


def bench_step(d_model: int, width: int, batch: int, dtype: str, warmup: int, steps: int, n_saes: int = 1) -> dict:
    """Time one jitted train step of ``n_saes`` SAEs on one batch; tokens/s counts the batch once."""
    mesh = mesh_lib.make_mesh()
    state, step_fn = build_benchmark_step(d_model, width, batch, dtype, n_saes=n_saes, mesh=mesh)
    batches = _batches(mesh, d_model, batch)
    box = {"state": state, "i": 0}

    def call():
        box["state"] = step_fn(box["state"], batches[box["i"] % len(batches)])
        box["i"] += 1
        jax.block_until_ready(box["state"])

    stats = time_calls(call, warmup, steps)
    return throughput(stats, batch, n_saes * batch * sae_step_flops_per_token(d_model, width))


def main() -> None:
    args = step_worker_args(__doc__.splitlines()[0]).parse_args()
    write_json(args.out, {"versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
                          "devices": [str(d) for d in jax.devices()], "sae_step": sae_step_rows(args, bench_step)})


if __name__ == "__main__":
    main()
