"""Our SAE train step on a GPU with model FLOP utilisation (MFU): d = 2304, width 16384 and 131072, batch 4096,
bfloat16 matmul inputs. Run as ``python -m benchmarks.gpu_step --out FILE`` with a CUDA JAX install, or through
``python -m benchmarks.run --only gpu`` or ``python -m benchmarks.accelerator``; ``--tiny`` runs d 64 × width 256
and 1024, batch 128 on any device (a check of the harness on CPU).

MFU = achieved FLOP/s (12·d·width per token) / the device's dense bf16 peak from its data sheet (Gemma Scope
reports 50.8% on TPU v3 for a 131K-wide SAE, §3.3).
"""

from __future__ import annotations

import jax

from benchmarks import sae_step
from benchmarks.common import worker_args, write_json

SHAPES = ((2304, 16384, 4096), (2304, 131072, 4096))
TINY_SHAPES = ((64, 256, 128), (64, 1024, 128))
# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets; matched against device_kind.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12}


def device_peak(kind: str) -> float | None:
    """The data-sheet bf16 peak of a ``jax.Device.device_kind`` (first matching key, most specific first)."""
    return next((peak for name, peak in BF16_PEAK_FLOPS.items() if name in kind), None)


def main() -> None:
    parser = worker_args(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, on whatever device JAX has")
    args = parser.parse_args()
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.tiny:
        raise SystemExit(f"no GPU: JAX's default device is {device.platform} ({device.device_kind}); "
                         "install jax[cuda12] on a GPU machine")
    peak = device_peak(device.device_kind)
    rows = []
    for d_model, width, batch in TINY_SHAPES if args.tiny else SHAPES:
        entry = {"d_model": d_model, "width": width, "batch": batch, "dtype": "bfloat16"}
        entry.update(sae_step.bench_step(d_model, width, batch, "bfloat16", args.warmup, args.steps))
        entry["mfu"] = entry["gflops"] * 1e9 / peak if peak else None
        rows.append(entry)
    write_json(args.out, {"device": device.device_kind, "bf16_peak_flops": peak, "jax": jax.__version__,
                          "sae_step": rows})


if __name__ == "__main__":
    main()
