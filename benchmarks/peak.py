"""Dense matmul peak of this machine: a square float32 numpy matmul and jitted JAX matmuls in float32 and in
bfloat16 (bf16 inputs, float32 accumulation). Run as ``python -m benchmarks.peak --out FILE``.

The best of these (and of torch's, measured by ``benchmarks.saelens_step``) per dtype is the peak that the SAE
step's achieved GFLOP/s is compared with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import throughput, time_calls, worker_args, write_json

MATMUL_N = 3072  # large enough to reach BLAS peak on a few cores, small enough for ~0.3 s per call


def bench_numpy(warmup: int, steps: int) -> dict:
    """GFLOP/s of ``a @ b`` for float32 [N, N] numpy arrays (numpy's BLAS)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32) for _ in range(2))
    return throughput(time_calls(lambda: a @ b, warmup, steps), 0, 2 * MATMUL_N**3)


def bench_jax(dtype: str, warmup: int, steps: int) -> dict:
    """GFLOP/s of a jitted [N, N] @ [N, N] in ``dtype`` with float32 accumulation and output."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (MATMUL_N, MATMUL_N), jnp.float32).astype(dtype) for k in keys)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return throughput(time_calls(lambda: matmul(a, b).block_until_ready(), warmup, steps), 0, 2 * MATMUL_N**3)


def main() -> None:
    args = worker_args(__doc__.splitlines()[0]).parse_args()
    result = {"numpy_float32": bench_numpy(args.warmup, args.steps),
              "jax_float32": bench_jax("float32", args.warmup, args.steps),
              "jax_bfloat16": bench_jax("bfloat16", args.warmup, args.steps)}
    write_json(args.out, {"matmul": {name: dict(r, n=MATMUL_N) for name, r in result.items()}})


if __name__ == "__main__":
    main()
