"""λ sweep launcher: prints (default) or runs the training commands of a sparsity-coefficient sweep.

    python launch/sweep.py --config=experiments/from_activations.py --lambdas=3e-4,1e-3,3e-3 \
        --workdir=/tmp/sweep [--mode=grid|separate] [--run] [--tpu=NAME --zone=ZONE] -- --config.data.path=/acts

``grid`` (default): one run trains every λ in one jitted step on one activation stream
(``--config.sae.l0_coefficient=a,b,c``). ``separate``: one run per λ, each in ``<workdir>/l0_<λ>``.
``--tpu`` wraps each command with launch/tpu_vm.sh so it starts on every worker of a TPU VM slice.
Without ``--run`` nothing is executed (dry run).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import shlex
import subprocess
import sys

from gemma_scope import cli

TPU_SCRIPT = pathlib.Path(__file__).with_name("tpu_vm.sh")


def sweep_commands(config: str, lambdas: list[float], workdir: str, mode: str, overrides: list[str],
                   tpu: str | None = None, zone: str | None = None) -> list[list[str]]:
    """The argv of each run of the sweep (see the module docstring).

    Raises:
      ValueError: no λ, a λ that is negative or not finite, a λ listed twice, an unknown mode, or ``tpu`` without
        ``zone``.
    """
    if not lambdas or not all(math.isfinite(v) and v >= 0 for v in lambdas):
        raise ValueError(f"--lambdas must list finite sparsity coefficients >= 0, got {lambdas}")
    if len(set(lambdas)) != len(lambdas):
        raise ValueError(f"--lambdas lists a value twice: {lambdas}")
    if mode not in ("grid", "separate"):
        raise ValueError(f"--mode must be 'grid' or 'separate', got {mode!r}")
    if tpu and not zone:
        raise ValueError("--tpu needs --zone")
    if mode == "grid":
        runs = [(workdir, ",".join(repr(v) for v in lambdas))]
    else:
        # %g with the fewest significant digits (at least 6) that tell the λ apart; 17 tell any two floats apart
        digits = next(n for n in range(6, 18) if len({f"{v:.{n}g}" for v in lambdas}) == len(lambdas))
        runs = [(f"{workdir.rstrip('/')}/l0_{v:.{digits}g}", repr(v)) for v in lambdas]
    commands = []
    for run_dir, value in runs:
        args = [f"--config={config}", f"--config.workdir={run_dir}", f"--config.sae.l0_coefficient={value}", *overrides]
        if tpu:
            commands.append(["bash", str(TPU_SCRIPT), "--tpu", tpu, "--zone", zone, "--run", "--", *args])
        else:
            commands.append([sys.executable, "-m", "gemma_scope.train", *args])
    return commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = cli.parser("launch/sweep.py", __doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, help="experiments/<name>.py")
    parser.add_argument("--lambdas", required=True, help="comma-separated l0_coefficient values")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mode", default="grid", choices=("grid", "separate"))
    parser.add_argument("--tpu", help="TPU VM name: start each run on all its workers")
    parser.add_argument("--zone", help="TPU VM zone")
    parser.add_argument("--run", action="store_true", help="execute the commands (default: print them)")
    args = parser.parse_args(own)
    try:
        lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lambdas must be comma-separated numbers, got {args.lambdas!r}")
    try:
        commands = sweep_commands(args.config, lambdas, args.workdir, args.mode, overrides, args.tpu, args.zone)
    except ValueError as e:
        parser.error(str(e))
    for number, command in enumerate(commands, 1):
        print(shlex.join(command), flush=True)
        status = subprocess.run(command).returncode if args.run else 0
        if status:  # the run has printed its own error: one more line, and its exit status
            print(f"error: run {number} of {len(commands)} failed (exit status {status}); the sweep stopped there",
                  file=sys.stderr)
            sys.exit(status)
    return 0


if __name__ == "__main__":
    cli.run(main)
