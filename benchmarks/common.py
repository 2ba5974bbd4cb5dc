"""Timing statistics and FLOP counts shared by every benchmark worker.

Standard library only: the SAELens worker imports this module from its own venv (torch, no JAX).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable

# Shapes (d_model, width, batch) of the SAE-step benchmark.
SAE_SHAPES = ((640, 4096, 4096), (640, 16384, 4096), (2304, 16384, 1024))
DTYPES = ("float32", "bfloat16")


def sae_step_flops_per_token(d_model: int, width: int) -> int:
    """FLOPs of one JumpReLU SAE train step per token: 12·d·width.

    Six d×width matmuls of 2·d·width FLOPs each: forward encoder and decoder; backward decoder input and
    weight gradients; backward encoder weight gradient and the input gradient that b_dec's gradient needs when
    the encoder reads (x − b_dec). Elementwise work, Adam and decoder renormalisation are not counted.
    """
    if d_model <= 0 or width <= 0:
        raise ValueError(f"d_model and width must be positive, got d_model={d_model}, width={width}")
    return 12 * d_model * width


def summarize(times_s: list[float]) -> dict:
    """Median, min and max of per-call wall times (seconds); the median is the headline number."""
    if not times_s:
        raise ValueError("summarize needs at least one timing")
    return {"median_s": statistics.median(times_s), "min_s": min(times_s), "max_s": max(times_s),
            "n": len(times_s), "times_s": [round(t, 6) for t in times_s]}


def time_calls(call: Callable[[], object], warmup: int, steps: int) -> dict:
    """Run ``call`` ``warmup`` times untimed, then ``steps`` times timed; ``call`` must block until done.

    Besides wall times, reports this process's CPU seconds (user, sys) and minor page faults per timed call:
    they barely move when other processes share the CPU, so they show an allocator's effect (fresh pages
    faulted in every step show up as sys time and faults) even on a busy machine.
    """
    for _ in range(warmup):
        call()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return dict(summarize(times), user_s_per_call=(after.ru_utime - before.ru_utime) / steps,
                sys_s_per_call=(after.ru_stime - before.ru_stime) / steps,
                minor_faults_per_call=(after.ru_minflt - before.ru_minflt) / steps)


def time_interleaved(calls: dict[str, Callable[[], object]], warmup: int, steps: int) -> dict[str, dict]:
    """Like ``time_calls`` for several calls, run round-robin so that machine noise hits each one alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(steps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


def throughput(stats: dict, tokens: int, flops: float) -> dict:
    """Add tokens/s and achieved GFLOP/s (from the median time) to a ``summarize`` dict."""
    median = stats["median_s"]
    return dict(stats, tokens=tokens, tokens_per_s=tokens / median, gflops=flops / median / 1e9)


def worker_args(description: str) -> argparse.ArgumentParser:
    """The command line every worker shares: where to write its JSON, warm-up and timed step counts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--steps", type=int, default=8, help="timed calls (the median is reported)")
    return parser


def write_json(path: str, payload: dict) -> None:
    """Write a worker's result with the process's peak resident memory (GiB); note the path on stderr."""
    payload = dict(payload, max_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def step_worker_args(description: str) -> argparse.ArgumentParser:
    """``worker_args`` plus the SAE-step workers' ``--shapes`` and ``--dtypes``."""
    parser = worker_args(description)
    parser.add_argument("--shapes", default="all", help="'all' or comma list like 640x4096x4096")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    return parser


def sae_step_rows(args: argparse.Namespace, bench_step: Callable[..., dict]) -> list[dict]:
    """One row per (shape, dtype) of ``args``: the shape and dtype, and what
    ``bench_step(d_model, width, batch, dtype, warmup, steps)`` measured."""
    shapes = SAE_SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    rows = []
    for d_model, width, batch in shapes:
        for dtype in args.dtypes.split(","):
            entry = {"d_model": d_model, "width": width, "batch": batch, "dtype": dtype}
            entry.update(bench_step(d_model, width, batch, dtype, args.warmup, args.steps))
            rows.append(entry)
    return rows
