"""Dense matmul peak of this machine: a square float32 numpy matmul and jitted JAX matmuls in float32 and in
bfloat16 (bf16 inputs, float32 accumulation), square and at the SAE step's own [batch, d] @ [d, width] shapes
(XLA's CPU matmul library can run those faster than a square one; the best is the peak). Run as
``python -m benchmarks.peak --out FILE``.

The best of these (and of torch's, measured by ``benchmarks.saelens_step``) per dtype is the peak that the SAE
step's achieved GFLOP/s is compared with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import throughput, time_calls, worker_args, write_json

MATMUL_N = 3072  # large enough to reach BLAS peak on a few cores, small enough for ~0.3 s per call
# (m, k, n) of [m, k] @ [k, n]: square, and the encoder matmuls of the benchmarked SAE steps.
JAX_SHAPES = ((MATMUL_N, MATMUL_N, MATMUL_N), (4096, 640, 16384), (1024, 2304, 16384))


def bench_numpy(warmup: int, steps: int) -> dict:
    """GFLOP/s of ``a @ b`` for float32 [N, N] numpy arrays (numpy's BLAS)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32) for _ in range(2))
    return throughput(time_calls(lambda: a @ b, warmup, steps), 0, 2 * MATMUL_N**3)


def bench_jax(dtype: str, warmup: int, steps: int) -> dict:
    """Best GFLOP/s over ``JAX_SHAPES`` of a jitted ``[m, k] @ [k, n]`` in ``dtype`` with float32 accumulation and
    output; the winning shape is recorded as ``shape``."""
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    best = None
    for m, k, n in JAX_SHAPES:
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (k, n), jnp.float32).astype(dtype)
        result = throughput(time_calls(lambda: matmul(a, b).block_until_ready(), warmup, steps), 0, 2 * m * k * n)
        if best is None or result["gflops"] > best["gflops"]:
            best = dict(result, shape=[m, k, n])
    return best


def main() -> None:
    args = worker_args(__doc__.splitlines()[0]).parse_args()
    result = {"numpy_float32": bench_numpy(args.warmup, args.steps),
              "jax_float32": bench_jax("float32", args.warmup, args.steps),
              "jax_bfloat16": bench_jax("bfloat16", args.warmup, args.steps)}
    write_json(args.out, {"matmul": {name: {"shape": [MATMUL_N] * 3} | r for name, r in result.items()}})


if __name__ == "__main__":
    main()
