"""Run every benchmark side by side and write benchmarks/RESULTS.md and benchmarks/results.json.

    python -m benchmarks.run                 # everything, ≥ 8 timed steps each (≈ 11 min on 2 cores)
    python -m benchmarks.run --steps 2 --warmup 1 --shapes 640x4096x4096   # a quick harness check

Each worker runs in its own process (ours: this interpreter; SAELens: the optional venv made by
``benchmarks/setup_saelens.sh``) with the same allocator (tcmalloc via LD_PRELOAD when found, else glibc malloc
for both), JAX on one CPU device, and JSON out. A worker that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile

from benchmarks import clt_step, report
from benchmarks.common import DTYPES, SAE_SHAPES

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARTS = ("peak", "ours", "saelens", "generator", "endtoend", "pipeline", "allocator", "gpu", "optimizer", "clt",
         "attribution")
ATTRIBUTION_TOKENS = (16, 64, 256)  # prompt lengths of the attribution part, one worker each
TCMALLOC_GLOBS = ("/usr/lib/*/libtcmalloc_minimal.so.4",
                  str(ROOT / ".cache/tcmalloc/usr/lib/*/libtcmalloc_minimal.so.4"))


def find_tcmalloc() -> str | None:
    """Path of Debian's libtcmalloc_minimal.so.4 (system, or unpacked by setup_saelens.sh), or None."""
    for pattern in TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def worker_env(preload: str | None, cpu: bool = True) -> dict[str, str]:
    """Environment of a worker: JAX on CPU (unless ``cpu`` is False) with one device (no forced host device
    count), and the allocator."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    return env


def run_worker(python: str, module: str, args: list[str], preload: str | None, timeout_s: int,
               cpu: bool = True) -> dict:
    """Run ``python -m module --out TMP args``; its JSON, or ``{"error": ...}`` with the tail of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "out.json"
        cmd = [python, "-m", module, "--out", str(out), *args]
        print("+", ("LD_PRELOAD=" + preload + " " if preload else "") + shlex.join(cmd), file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(preload, cpu), stderr=subprocess.PIPE, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"{module} ran past {timeout_s} s"}
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            print(proc.stderr[-3000:], file=sys.stderr)
            return {"error": f"{module} exited {proc.returncode}: {tail[0]}"}
        return json.loads(out.read_text())


def machine_info() -> dict:
    """CPU model and matmul-relevant ISA flags, core count, memory, OS, load average."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
        mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    except OSError:
        mem_kib = 0
    isa = sorted(set(flags) & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"})
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "platform": platform.platform(), "loadavg_before": _loadavg()}


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _versions() -> dict:
    names = ("jax", "jaxlib", "flax", "optax", "numpy")
    return {name: importlib.metadata.version(name) for name in names} | {"python": platform.python_version()}


def _best_of(*peak_runs: dict) -> dict:
    """Per backend, the run with the highest GFLOP/s (runs that failed are ignored)."""
    best = {}
    for run in peak_runs:
        for name, r in run.get("matmul", {}).items():
            if r["gflops"] > best.get(name, {"gflops": -1.0})["gflops"]:
                best[name] = r
    return best


def _fastest_steps(*worker_runs: dict) -> dict:
    """Step-worker runs merged into one: per (shape, dtype) the entry with the lowest median (other tenants' load
    only ever slows a step, as it only ever lowers a peak), the best matmul per backend, the highest peak
    memory. The first run's error when every run failed."""
    ok = [r for r in worker_runs if "error" not in r]
    if not ok:
        return worker_runs[0] if worker_runs else {}
    fastest = {}
    for run in ok:
        for e in run["sae_step"]:
            key = (e["d_model"], e["width"], e["batch"], e["dtype"])
            if key not in fastest or e["median_s"] < fastest[key]["median_s"]:
                fastest[key] = e
    merged = dict(ok[0], sae_step=list(fastest.values()), max_rss_gib=max(r.get("max_rss_gib") or 0 for r in ok))
    if any("matmul" in r for r in ok):
        merged["matmul"] = _best_of(*ok)
    return merged


def _peaks(matmul: dict) -> dict:
    """Best GFLOP/s per dtype over every matmul backend measured."""
    peaks = {}
    for name, r in matmul.items():
        dtype = name.rsplit("_", 1)[1]
        peaks[dtype] = max(peaks.get(dtype, 0.0), r["gflops"])
    return peaks


def _step_rows(ours: dict, theirs: dict, shapes, dtypes, matmul: dict) -> list[dict]:
    """One row per (shape, dtype): each side's timing with its fraction of the machine's peak and of its own
    framework's matmul (JAX / torch), and ours/SAELens time."""
    peaks = _peaks(matmul)

    def index(result):
        return {(e["d_model"], e["width"], e["batch"], e["dtype"]): e for e in result.get("sae_step", [])}

    ours_by, theirs_by = index(ours), index(theirs)
    rows = []
    for d, w, b in shapes:
        for dtype in dtypes:
            row = {"d_model": d, "width": w, "batch": b, "dtype": dtype}
            for side, by, framework in (("ours", ours_by, "jax"), ("saelens", theirs_by, "torch")):
                entry = by.get((d, w, b, dtype))
                if entry:
                    peak, own = peaks.get(dtype), matmul.get(f"{framework}_{dtype}", {}).get("gflops")
                    row[side] = dict(entry, peak_fraction=entry["gflops"] / peak if peak else None,
                                     framework_peak_fraction=entry["gflops"] / own if own else None)
            if "ours" in row and "saelens" in row:
                row["time_ratio"] = row["ours"]["median_s"] / row["saelens"]["median_s"]
            rows.append(row)
    return rows


def _targets(rows: list[dict], generator: dict, gpu: dict) -> list[dict]:
    """The targets (README.md), each with what was measured and whether it is met (None: not measured)."""
    def target(text: str, value: float | None, shown: str, met) -> dict:
        if not value:
            return {"target": text, "measured": "–", "met": None}
        return {"target": text, "measured": shown.format(value), "met": met(value)}

    targets = []
    for row in rows:
        shape = f"{row['d_model']}/{row['width']}/{row['batch']}"
        speedup = 1 / row["time_ratio"] if row.get("time_ratio") else None
        if row["dtype"] == "float32":
            targets.append(target(f"f32 step ≥ 1.3× faster than SAELens at {shape}", speedup, "{:.2f}×",
                                  lambda v: v >= 1.3))
            frac = row.get("ours", {}).get("peak_fraction")
            targets.append(target(f"f32 step ≥ 85% of f32 matmul peak at {shape}", frac and 100 * frac, "{:.0f}%",
                                  lambda v: v >= 85))
        else:
            targets.append(target(f"bf16 step at least as fast as SAELens bf16 autocast at {shape}", speedup,
                                  "{:.2f}×", lambda v: v >= 1.0))
    res = (generator or {}).get("variants", {}).get("res_all")
    targets.append({"target": "capturing all res sites costs ≤ 5% over the plain forward",
                    "measured": f"{100 * res['overhead']:+.1f}%" if res else "–",
                    "met": None if not res else res["overhead"] <= 0.05})
    for row in gpu.get("sae_step", []) or [{"width": "≥ 16384", "mfu": None}]:
        mfu = row["mfu"]
        targets.append({"target": f"≥ 50% MFU on a GPU at width {row['width']}",
                        "measured": f"{100 * mfu:.1f}%" if mfu is not None else "–",
                        "met": None if mfu is None else mfu >= 0.5})
    return targets


def _allocator_check(args, saelens_python: str | None, preload: str, timeout_s: int) -> dict:
    """Smallest shape, float32, each side with glibc malloc and with tcmalloc, back to back."""
    common = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--shapes", "640x4096x4096",
              "--dtypes", "float32"]
    sides = {"ours": (sys.executable, "benchmarks.sae_step", common)}
    if saelens_python:
        sides["saelens"] = (saelens_python, "benchmarks.saelens_step", [*common, "--no-matmul"])
    check = {}
    for side, (python, module, wargs) in sides.items():
        runs = {name: run_worker(python, module, wargs, lib, timeout_s) for name, lib in (("system", None),
                                                                                         ("tcmalloc", preload))}
        errors = [r["error"] for r in runs.values() if "error" in r]
        check[side] = {"error": errors[0]} if errors else {k: r["sae_step"][0] for k, r in runs.items()}
    return check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
    parser.add_argument("--shapes", default="all", help="'all' or comma list d x width x batch, e.g. 640x4096x4096")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma list of parts to run: " + ", ".join(PARTS))
    parser.add_argument("--allocator", choices=("tcmalloc", "system"), default="tcmalloc",
                        help="tcmalloc (LD_PRELOAD, falls back to system when not installed) or glibc malloc")
    parser.add_argument("--saelens-python",
                        default=os.environ.get("SAELENS_PYTHON", str(ROOT / ".venv-saelens/bin/python")))
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--gen-seq-len", type=int, default=256)
    parser.add_argument("--e2e-config", default="experiments/gemma3_270m_res.py", help="main-job config to time")
    parser.add_argument("--e2e-set", action="append", default=[], help="extra KEY=VALUE config override, repeatable")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each side's step worker, alternating sides; the fastest median is kept")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker before it is abandoned")
    parser.add_argument("--attribution-tokens", default=",".join(map(str, ATTRIBUTION_TOKENS)),
                        help="prompt lengths of the attribution part, comma-separated")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be ≥ 1 and --warmup ≥ 0, got {args.steps}, {args.repeats} and "
                     f"{args.warmup}")
    parts = set(args.only.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown --only parts {sorted(unknown)}; expected some of {', '.join(PARTS)}")
    shapes = SAE_SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    timing = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    step_args = [*timing, "--shapes", ",".join("x".join(map(str, s)) for s in shapes)]

    tcmalloc = find_tcmalloc()
    preload = tcmalloc if args.allocator == "tcmalloc" else None
    saelens_python = args.saelens_python if os.access(args.saelens_python, os.X_OK) else None
    errors, notes = {}, []
    if args.allocator == "tcmalloc" and not tcmalloc:
        notes.append("tcmalloc not found (run benchmarks/setup_saelens.sh): both sides used glibc malloc")
    if saelens_python is None:
        errors["saelens"] = (f"SAELens venv absent ({args.saelens_python} not found); create it with "
                             "`bash benchmarks/setup_saelens.sh`")
        print("SKIP SAELens:", errors["saelens"], file=sys.stderr)

    command = shlex.join(["python", "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    if "optimizer" in parts:  # its own block of RESULTS.md: `--only optimizer` leaves the other numbers alone
        machine = machine_info()
        optimizer = run_worker(sys.executable, "benchmarks.optimizer_step", timing, preload, args.timeout)
        report.write_optimizer(pathlib.Path(args.out_dir), dict(
            optimizer, date=datetime.datetime.now().isoformat(timespec="seconds"), command=command,
            settings={"steps": args.steps, "warmup": args.warmup}, machine=dict(machine, loadavg_after=_loadavg()),
            versions=_versions()))
    if "clt" in parts:  # its own block of RESULTS.md, as the optimizer's
        machine = machine_info()
        clt = run_worker(sys.executable, "benchmarks.clt_step", timing, preload, args.timeout)
        clt_step.write(pathlib.Path(args.out_dir), dict(
            clt, date=datetime.datetime.now().isoformat(timespec="seconds"), command=command,
            settings={"steps": args.steps, "warmup": args.warmup}, machine=dict(machine, loadavg_after=_loadavg())))
    if "attribution" in parts:  # its own block of RESULTS.md, like the optimizer's
        machine = machine_info()
        rows = [run_worker(sys.executable, "benchmarks.attribution", ["--tokens", str(n)], preload, args.timeout)
                for n in map(int, args.attribution_tokens.split(","))]
        report.write_attribution(pathlib.Path(args.out_dir), dict(
            rows=rows, date=datetime.datetime.now().isoformat(timespec="seconds"), command=command,
            machine=dict(machine, loadavg_after=_loadavg()), versions=_versions()))
    if parts <= {"optimizer", "clt", "attribution"}:  # the blocks of their own ran; nothing of the main block
        return
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
               "settings": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats},
               "machine": machine_info(),
               "versions": _versions(), "errors": errors, "notes": notes, "matmul": {}}
    results["allocator"] = {"library": preload, "note": (
        f"Both sides ran with `LD_PRELOAD={preload}` (Debian libtcmalloc-minimal4)." if preload else
        "Both sides ran with glibc malloc.")}

    # The peak is measured before and after the steps and the better kept: noise only ever lowers it. Likewise
    # each side's steps run --repeats times, alternating sides, and the fastest median per shape is kept.
    def ours_worker(part: str, module: str, worker_args: list[str], **kw) -> dict:
        if part not in parts:
            return {"error": f"not run (--only without {part})"}
        return run_worker(sys.executable, module, worker_args, preload, args.timeout, **kw)

    peak_before = ours_worker("peak", "benchmarks.peak", timing)
    ours_runs, their_runs = [], []
    for _ in range(args.repeats):
        ours_runs.append(ours_worker("ours", "benchmarks.sae_step", step_args))
        if "saelens" in parts and saelens_python:
            their_runs.append(run_worker(saelens_python, "benchmarks.saelens_step", step_args, preload, args.timeout))
    ours, theirs = _fastest_steps(*ours_runs), _fastest_steps(*their_runs)
    peak_after = ours_worker("peak", "benchmarks.peak", timing)
    for side, r in (("ours", ours), ("saelens", theirs), ("peak", peak_before), ("peak", peak_after)):
        if "error" in r:
            errors[side] = r["error"]
    results["versions"].update({k: v for k, v in theirs.get("versions", {}).items() if k != "python"})
    results["matmul"] = _best_of(peak_before, peak_after) | theirs.get("matmul", {})
    results["peak_gflops"] = _peaks(results["matmul"])
    results["max_rss_gib"] = {side: r.get("max_rss_gib") for side, r in (("ours", ours), ("saelens", theirs))}
    results["sae_step"] = _step_rows(ours, theirs, shapes, DTYPES, results["matmul"])

    generator = ours_worker("generator", "benchmarks.generator",
                            [*timing, "--batch", str(args.gen_batch), "--seq-len", str(args.gen_seq_len)])
    e2e_args = [*timing, "--config", args.e2e_config, *(f"--set={kv}" for kv in args.e2e_set)]
    results["generator"] = generator
    results["end_to_end"] = ours_worker("endtoend", "benchmarks.end_to_end", e2e_args)
    results["pipeline"] = ours_worker("pipeline", "benchmarks.pipeline", timing, cpu=False)
    results["gpu"] = ours_worker("gpu", "benchmarks.gpu_step", timing, cpu=False)
    if "error" in generator:
        errors["generator"] = generator["error"]

    if "allocator" in parts:
        if tcmalloc:
            results["allocator"]["check"] = _allocator_check(args, saelens_python, tcmalloc, args.timeout)
        else:
            results["allocator"]["note"] += " No allocator comparison: tcmalloc is not installed."
    results["targets"] = _targets(results["sae_step"], generator, results["gpu"])
    results["machine"]["loadavg_after"] = _loadavg()
    report.write(pathlib.Path(args.out_dir), results)
    print(f"wrote {args.out_dir}/RESULTS.md and results.json", file=sys.stderr)


if __name__ == "__main__":
    main()
