#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (v4-32, v5e-64, ...):
#
#   launch/tpu_pod.sh NAME ZONE --config configs/mpt/1b.yaml --set save_folder=gs://BUCKET/runs/{run_name}/checkpoints
#
# Ships this checkout (git archive HEAD) to ~/jaxtrain on every worker, installs it with jax[tpu]
# (skip with JAXTRAIN_SETUP=0 once done), then starts `python -m jaxtrain.main ARGS` on all workers
# at once (--worker=all). JAX finds the pod itself: each worker is one process that sees its own
# chips, and jax.devices() lists the whole slice. Checkpoints must go to storage every worker
# shares (gs://...). Ctrl-C stops the local gcloud; stop the run with the same command's
# JAXTRAIN_STOP=1 (sends SIGTERM, so each worker saves a checkpoint first).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE [jaxtrain args...]" >&2
  exit 2
fi
name=$1 zone=$2
shift 2
remote_dir=${JAXTRAIN_REMOTE_DIR:-jaxtrain}
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all)

if [[ ${JAXTRAIN_STOP:-0} == 1 ]]; then
  "${ssh_all[@]}" --command "pkill -TERM -f '^python3 -m jaxtrain.main' || true"
  exit 0
fi

if [[ ${JAXTRAIN_SETUP:-1} == 1 ]]; then
  repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  archive=$(mktemp --suffix=.tar.gz)
  trap 'rm -f "$archive"' EXIT
  git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$name:~/jaxtrain.tar.gz" --zone "$zone" --worker=all
  "${ssh_all[@]}" --command "rm -rf ~/$remote_dir && mkdir -p ~/$remote_dir && tar -xzf ~/jaxtrain.tar.gz -C ~/$remote_dir \
    && python3 -m pip install -q -U 'jax[tpu]' -e ~/$remote_dir'[gcs]'"
fi

args=$(printf '%q ' "$@")
"${ssh_all[@]}" --command "cd ~/$remote_dir && JAXTRAIN_DISTRIBUTED=tpu python3 -m jaxtrain.main $args"
