#!/usr/bin/env bash
# Usage: launch/tpu_vm.sh TPU_NAME ZONE [--] ARGS...
#
# Runs `python3 -m surgery_job ARGS` on every worker of a Cloud TPU VM (pod slice) over
# gcloud ssh; JAX detects the TPU VM cluster, so no coordinator flags are passed.
# Each worker logs to $REMOTE_DIR/logs/worker_<hostname>.log on its own disk.
#
# Environment:
#   REMOTE_DIR   directory on the workers to cd into (default: ~/surgery_job); used
#                verbatim in the remote shell, so ~ expands there
#   SURGERY_JOB  remote command (default: "python3 -m surgery_job"), used verbatim
#   PROJECT      adds --project=$PROJECT
#   DRY_RUN=1    print the gcloud command instead of running it
set -euo pipefail

(($# >= 2)) || { echo "usage: $0 TPU_NAME ZONE [--] ARGS..." >&2; exit 2; }
tpu_name=$1 zone=$2; shift 2
[[ ${1:-} == -- ]] && shift

qargs=''
(($#)) && printf -v qargs ' %q' "$@"  # quoted for the remote shell
remote_dir=${REMOTE_DIR:-'~/surgery_job'}
remote="cd $remote_dir && mkdir -p logs && ${SURGERY_JOB:-python3 -m surgery_job}$qargs > logs/worker_\$(hostname).log 2>&1"

cmd=(gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all --command="$remote")
[[ -n ${PROJECT:-} ]] && cmd+=(--project="$PROJECT")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  w='' out=()
  for w in "${cmd[@]}"; do [[ $w =~ ^[[:alnum:]_./:=@%+,-]+$ ]] && out+=("$w") || out+=("${w@Q}"); done
  echo "${out[*]}"
  exit 0
fi
exec "${cmd[@]}"
