"""Our JumpReLU SAE train step (``gemma_scope.step.build_benchmark_step``: forward, loss, backward, decoder
gradient projection, Adam, unit-norm decoder rows, θ ≥ 0 — the jitted step the trainer runs) at the issue's
shapes, float32 and bfloat16 matmul inputs. Run as ``python -m benchmarks.sae_step --out FILE``.
"""

from __future__ import annotations

import jax
import jaxlib
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.common import (sae_step_flops_per_token, sae_step_rows, step_worker_args, throughput, time_calls, write_json)
from gemma_scope import step


def _batches(mesh, d_model: int, batch: int, count: int = 2) -> list[jax.Array]:
    """Random non-zero activations, N(0, 1) float32 [batch, d] on the mesh (same distribution as SAELens's)."""
    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P("data", None))
    return [jax.device_put(rng.standard_normal((batch, d_model), dtype=np.float32), sharding) for _ in range(count)]


def bench_step(d_model: int, width: int, batch: int, dtype: str, warmup: int, steps: int, n_saes: int = 1) -> dict:
    """Time one jitted train step of ``n_saes`` SAEs on one batch; tokens/s counts the batch once."""
    mesh = step.make_mesh()
    state, step_fn = step.build_benchmark_step(d_model, width, batch, dtype, n_saes=n_saes, mesh=mesh)
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
