"""The main job end to end: tokens/s of ``python -m gemma_scope.train`` (activation generation from the LM plus
the SAE steps of every site and λ), read from its own ``metrics.jsonl``. Run as
``python -m benchmarks.end_to_end --out FILE [--config experiments/gemma3_270m_res.py] [--set train.batch_size=1024]``.

The trainer logs every step here; the first interval (compilation, normalisation estimate) is the warm-up and
the medians are over the following ``--steps`` intervals. Each SAE of the grid trains on every token of its
site, so tokens/s is also each SAE's training throughput; ``sae_tokens_per_s`` multiplies by the grid size.
"""

from __future__ import annotations

import collections
import json
import pathlib
import subprocess
import sys
import tempfile

from benchmarks.common import summarize, worker_args, write_json

DEFAULT_CONFIG = "experiments/gemma3_270m_res.py"


def main() -> None:
    parser = worker_args(__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], help="extra --config.KEY=VALUE override (repeatable)")
    args = parser.parse_args()
    if not pathlib.Path(args.config).is_file():
        raise SystemExit(f"main-job config {args.config} not found")
    with tempfile.TemporaryDirectory() as workdir:
        total = args.warmup + args.steps
        cmd = [sys.executable, "-m", "gemma_scope.train", f"--config={args.config}", f"--config.workdir={workdir}",
               f"--config.train.steps={total}", "--config.train.log_every=1",
               f"--config.train.checkpoint_every={total}",
               *(f"--config.{kv}" for kv in args.set)]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    by_step = collections.defaultdict(list)
    for r in records:
        by_step[r["step"]].append(r)
    timed = [by_step[s] for s in sorted(by_step) if s > args.warmup]
    if not timed:
        raise SystemExit(f"the trainer logged no step after the {args.warmup} warm-up steps")
    batch = timed[0][0]["tokens"] // timed[0][0]["step"]  # the trainer logs tokens = step · batch
    step_s = [batch / recs[0]["tokens_per_s"] for recs in timed]
    stats = summarize(step_s)
    n_saes = len(timed[0])
    tokens_per_s = batch / stats["median_s"]
    write_json(args.out, dict(stats, config=args.config, overrides=args.set, batch=batch, n_saes=n_saes,
                              sites=sorted({r["site"] for r in timed[0]}), tokens_per_s=tokens_per_s,
                              sae_tokens_per_s=tokens_per_s * n_saes))


if __name__ == "__main__":
    main()
