#!/usr/bin/env bash
# Start a gemma_scope training run on every worker of a Cloud TPU VM slice (dry run unless --run).
#
#   launch/tpu_vm.sh --tpu NAME --zone ZONE [--project P] [--setup] [--run] -- --config=experiments/x.py [--config.a=b ...]
#
# Steps (each printed; executed only with --run):
#   --setup: ship the repository's HEAD (git archive) to ~/gemma_scope on all workers and pip-install it with jax[tpu];
#   always:  run `python -m gemma_scope.train ... --config.mesh.distributed=True` on all workers at once
#            (`gcloud compute tpus tpu-vm ssh --worker=all`); jax.distributed.initialize() finds the slice itself.
# config.workdir must be a path every worker shares (e.g. a gcsfuse or NFS mount): checkpoints are written by all
# processes, metrics and the release by process 0.
set -euo pipefail

tpu="" zone="" project="" setup=0 run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --run) run=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (expected --tpu, --zone, --project, --setup, --run, then -- and train flags)" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "tpu_vm.sh: --tpu NAME and --zone ZONE are required" >&2; exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "tpu_vm.sh: give the training flags after --, e.g. -- --config=experiments/from_activations.py" >&2; exit 2
fi

gcloud_args=("$tpu" "--zone=$zone")
[[ -n "$project" ]] && gcloud_args+=("--project=$project")

step() {  # print a command; run it with --run
  printf '%q ' "$@"; echo
  if [[ $run -eq 1 ]]; then "$@"; fi
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ $setup -eq 1 ]]; then
  step git -C "$repo" archive --format=tar.gz -o /tmp/gemma_scope.tar.gz HEAD
  step gcloud compute tpus tpu-vm scp /tmp/gemma_scope.tar.gz "$tpu:/tmp/gemma_scope.tar.gz" --worker=all "${gcloud_args[@]:1}"
  step gcloud compute tpus tpu-vm ssh "${gcloud_args[@]}" --worker=all --command \
    "mkdir -p ~/gemma_scope && tar -xzf /tmp/gemma_scope.tar.gz -C ~/gemma_scope && pip install -q -e ~/gemma_scope 'jax[tpu]'"
fi
train_cmd="cd ~/gemma_scope && python -m gemma_scope.train $(printf '%q ' "$@")--config.mesh.distributed=True"
step gcloud compute tpus tpu-vm ssh "${gcloud_args[@]}" --worker=all --command "$train_cmd"
