#!/usr/bin/env bash
# Usage: launch/local.sh N [--] ARGS...
#
# Runs N surgery_job processes on this machine (127.0.0.1), each with faked CPU
# devices, wired together with --coordinator_address/--num_processes/--process_id.
# ARGS (e.g. --config=configs/identity.py --config.input.path=...) go to every process.
#
# Environment:
#   SURGERY_JOB          command to run, split on spaces (default: the job the README installed:
#                        REPO/.venv/bin/surgery-job, else surgery-job on PATH, else
#                        python3 -m surgery_job where python3 can import it)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default: 4)
#   PORT                 coordinator port (default: a free port)
#   LOG_DIR              one log per process, process_$i.log (default: logs/local)
#   GRACE_SECONDS        after the first failure, how long the others get before
#                        SIGTERM (then SIGKILL 5 s later) (default: 60)
#   TAIL_LINES           lines of a failed process's log to print (default: 20)
#   DRY_RUN=1            print the N command lines and exit
#
# Exit code: the first non-zero exit code of any process, else 0. Needs bash >= 4.4.
set -euo pipefail

die() { echo "local.sh: $*" >&2; exit 2; }
# Print a command line, quoting only the words that need it.
show() {
  local w out=()
  for w; do [[ $w =~ ^[[:alnum:]_./:=@%+,-]+$ ]] && out+=("$w") || out+=("${w@Q}"); done
  echo "${out[*]}"
}

(($# >= 1)) || die "usage: $0 N [--] ARGS..."
n=$1; shift
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"
[[ ${1:-} == -- ]] && shift
args=("$@")

# The job the README installed, unless SURGERY_JOB says otherwise.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/find_job.sh"
find_job "$repo"
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
envs=("XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}" "JAX_PLATFORMS=cpu")
log_dir=${LOG_DIR:-logs/local}
grace=${GRACE_SECONDS:-60}
tail_lines=${TAIL_LINES:-20}

cmdline() {  # the full command line of process $1
  cmd=("${job[@]}" "${args[@]}" "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" "--process_id=$1")
}

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for ((i = 0; i < n; i++)); do cmdline "$i"; show "${envs[@]}" "${cmd[@]}"; done
  exit 0
fi

mkdir -p "$log_dir"
pids=()
# On any exit (including INT/TERM below), stop whatever children still run: SIGTERM, then SIGKILL.
stop_all() {
  local pid alive=() t
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  ((${#alive[@]})) || return 0
  kill -TERM "${alive[@]}" 2>/dev/null || true
  for ((t = 0; t < 50; t++)); do
    kill -0 "${alive[@]}" 2>/dev/null || break  # true while any is alive
    sleep 0.1
  done
  kill -KILL "${alive[@]}" 2>/dev/null || true
}
trap stop_all EXIT
trap 'echo "local.sh: interrupted, stopping all processes" >&2; exit 130' INT
trap 'echo "local.sh: terminated, stopping all processes" >&2; exit 143' TERM

echo "local.sh: $n processes, coordinator 127.0.0.1:$port, logs in $log_dir/" >&2
for ((i = 0; i < n; i++)); do
  cmdline "$i"
  log=$log_dir/process_$i.log
  # Background jobs exec the command directly, so $! is the process itself.
  if ((i == 0)); then
    # Its log in full; on the terminal, without Gloo's lines per connection between processes
    # (written by several threads at once, so cut and joined anywhere: every piece goes).
    env "${envs[@]}" "${cmd[@]}" > >(tee "$log" | grep --line-buffered -Ev '\[Gloo\]|peer ranks|^[0-9]*$') 2>&1 &
  else
    env "${envs[@]}" "${cmd[@]}" >"$log" 2>&1 &
  fi
  pids+=($!)
done

# Poll until all have exited; the first failure starts the grace period.
first_rc=0 running=$n deadline='' killed=0
declare -a done_
while ((running > 0)); do
  for ((i = 0; i < n; i++)); do
    [[ -n ${done_[i]:-} ]] && continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0; wait "${pids[i]}" || rc=$?
    done_[i]=1; running=$((running - 1))
    ((rc == 0)) && continue
    if ((killed)); then
      echo "local.sh: process $i stopped after the grace period (exit $rc), log: $log_dir/process_$i.log" >&2
    else
      echo "local.sh: process $i failed with exit code $rc, log: $log_dir/process_$i.log; its last lines:" >&2
      tail -n "$tail_lines" "$log_dir/process_$i.log" | sed 's/^/  | /' >&2
    fi
    if ((first_rc == 0)); then
      first_rc=$rc deadline=$((SECONDS + grace + 1))  # +1: SECONDS is whole seconds
      ((running > 0)) && echo "local.sh: giving the other processes ${grace}s to exit" >&2
    fi
  done
  if [[ -n $deadline ]] && ((running > 0 && !killed && SECONDS >= deadline)); then
    killed=1
    stop_all &  # SIGTERM now, SIGKILL after 5 s; the loop above reaps them
  fi
  ((running > 0)) && sleep 0.2
done
wait  # the tee of process 0, and stop_all if it ran
exit "$first_rc"
