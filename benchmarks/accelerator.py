"""Every accelerator benchmark in one command, with random weights, written with the device's name into
``benchmarks/RESULTS.md`` (its own generated block) and ``benchmarks/results_accelerator.json``:

    python -m benchmarks.accelerator           # on a GPU: the shapes below
    python -m benchmarks.accelerator --tiny    # tiny shapes on any device; the default when JAX finds no GPU/TPU

Each part runs in its own process on JAX's default device (``benchmarks.run.run_worker``): the SAE train step's MFU
at d 2304 × width 16384 and 131072, batch 4096, bf16 (``gpu_step``); the activation generator, Gemma 2 2B bf16,
8 × 1024 tokens (``generator``); the input pipeline (``pipeline``, preset ``gpu``); evaluation throughput, Gemma 2 2B
clean and with a width-16384 SAE spliced (``evaluation``). Sized to finish in under 6 minutes on one H200.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import subprocess
import sys

from benchmarks import report
from benchmarks.run import ROOT, run_worker, worker_env

PARTS = {  # result key: (worker module, its arguments on an accelerator, its arguments with --tiny)
    "gpu": ("benchmarks.gpu_step", [], ["--tiny"]),
    "generator": ("benchmarks.generator", ["--random-weights", "--model", "gemma2_2b", "--dtype", "bfloat16", "--batch", "8",
                   "--seq-len", "1024"],
                  ["--random-weights", "--model", "gemma3_tiny", "--batch", "2", "--seq-len", "32"]),
    "pipeline": ("benchmarks.pipeline", ["--preset", "gpu"], ["--preset", "tiny"]),
    "evaluation": ("benchmarks.evaluation", [], ["--model", "gemma3_tiny", "--dtype", "float32", "--batch", "2", "--seq-len", "32",
                        "--width", "128"]),
}


def default_device() -> tuple[str, str, str]:
    """(platform, device kind, jax version) of JAX's default device, asked in a child process so that this one
    holds no accelerator memory while the workers run."""
    probe = "import jax; d = jax.devices()[0]; print(d.platform); print(d.device_kind); print(jax.__version__)"
    out = subprocess.run([sys.executable, "-c", probe], env=worker_env(None, cpu=False), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    return out[0], out[1], out[2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (default when there is no GPU/TPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per part before it is abandoned")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    platform, device, jax_version = default_device()
    tiny = args.tiny or platform == "cpu"
    timing = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": shlex.join(["python", "-m", "benchmarks.accelerator",
                                      *(argv if argv is not None else sys.argv[1:])]),
               "device": device, "platform": platform, "jax": jax_version, "tiny": tiny}
    for key, (module, full, small) in PARTS.items():
        results[key] = run_worker(sys.executable, module, [*timing, *(small if tiny else full)], None, args.timeout,
                                  cpu=False)
    report.write_accelerator(pathlib.Path(args.out_dir), results)
    print(f"wrote {args.out_dir}/RESULTS.md and results_accelerator.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
