#!/usr/bin/env bash
# Usage: launch/mpirun.sh N [--] ARGS...
#
# Runs N surgery_job processes with Open MPI's mpirun. JAX detects Open MPI from the variables
# mpirun gives each process (OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE/RANK/LOCAL_RANK), so no
# coordinator flags are passed. ARGS (e.g. --config=configs/identity.py --config.input.path=...)
# go to every process. Without MPIRUN_ARGS all N processes run on this machine.
#
# Environment:
#   SURGERY_JOB   command to run, split on spaces (default: the job the README installed:
#                 REPO/.venv/bin/surgery-job, else surgery-job on PATH, else
#                 python3 -m surgery_job where python3 can import it)
#   MPIRUN_ARGS   mpirun options, split on spaces (default: --oversubscribe, i.e. all processes
#                 here, more of them than cores allowed); e.g. "--hostfile hosts --map-by ppr:1:node"
#   LOG_DIR       one log per process, process_<rank>.log (default: logs/mpirun)
#   TAIL_LINES    on failure, lines of each process's log to print (default: 10)
#   DRY_RUN=1     print the mpirun command line and exit
#
# As root it adds --allow-run-as-root (mpirun refuses root otherwise). Variables named JAX_*,
# XLA_FLAGS and SURGERY_JOB_* are passed on with -x (processes on this machine inherit the
# whole environment anyway; those on other hosts get only these).
# Exit code: mpirun's (the first non-zero exit code of any process; mpirun then stops the rest).
set -euo pipefail

die() { echo "mpirun.sh: $*" >&2; exit 2; }

(($# >= 1)) || die "usage: $0 N [--] ARGS..."
n=$1; shift
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"
[[ ${1:-} == -- ]] && shift

# The job the README installed, unless SURGERY_JOB says otherwise.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/find_job.sh"
find_job "$repo"
read -r -a mpirun_args <<<"${MPIRUN_ARGS:---oversubscribe}"
log_dir=${LOG_DIR:-logs/mpirun}

mpi=(mpirun -np "$n" "${mpirun_args[@]}")
((EUID == 0)) && mpi+=(--allow-run-as-root)
for v in $(compgen -e); do
  [[ $v =~ ^(JAX_.*|XLA_FLAGS|SURGERY_JOB_.*)$ ]] && mpi+=(-x "$v")
done
# Each process writes its own log; exec keeps the job itself the process mpirun signals.
cmd=("${mpi[@]}" sh -c 'exec "$@" >"$0/process_$OMPI_COMM_WORLD_RANK.log" 2>&1' "$log_dir" "${job[@]}" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  w='' out=()
  for w in "${cmd[@]}"; do [[ $w =~ ^[[:alnum:]_./:=@%+,-]+$ ]] && out+=("$w") || out+=("${w@Q}"); done
  echo "${out[*]}"
  exit 0
fi
command -v mpirun >/dev/null || die "mpirun not found: install Open MPI (Debian: apt-get install openmpi-bin)"

mkdir -p "$log_dir"
rm -f "$log_dir"/process_*.log  # a log left from an earlier run would mislead
echo "mpirun.sh: $n processes, logs in $log_dir/" >&2
rc=0
"${cmd[@]}" || rc=$?
if ((rc != 0)); then
  for ((i = 0; i < n; i++)); do
    log=$log_dir/process_$i.log
    [[ -f $log ]] || continue
    echo "mpirun.sh: process $i, log: $log; its last lines:" >&2
    tail -n "${TAIL_LINES:-10}" "$log" | sed 's/^/  | /' >&2
  done
  echo "mpirun.sh: failed with exit code $rc" >&2
fi
exit "$rc"
