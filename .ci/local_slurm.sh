#!/usr/bin/env bash
# Usage: .ci/local_slurm.sh start DIR   (then: export SLURM_CONF=DIR/slurm.conf; sbatch ...)
#        .ci/local_slurm.sh stop DIR
#
# A one-node Slurm cluster on this machine for tests, everything of it inside DIR: its own munge
# key and socket, slurmctld and slurmd on free ports, state, spool, pid files and logs. It touches
# neither /etc/slurm nor /etc/munge, so several can run side by side (one per test session). Needs
# root (slurmd runs jobs as their user) and Debian's slurm-wlm and munge packages; no systemd: the
# daemons are started directly and stopped by their PIDs.
#
# The node is this host (`hostname -s`, which must resolve: JAX's Slurm detection connects to the
# first node of the step by name) with 2 CPUs and oversubscription allowed, so that
# `sbatch --nodes=1 --ntasks-per-node=2` runs 2 tasks on a 2-core machine, or more.
set -euo pipefail

die() { echo "local_slurm.sh: $*" >&2; exit 2; }
(($# == 2)) || die "usage: $0 start|stop DIR"
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)

# Running and not a zombie (where PID 1 does not reap, a stopped daemon stays one).
alive() { [[ -r /proc/$1/stat && $(cut -d' ' -f3 "/proc/$1/stat") != Z ]]; }
stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    [[ -f $dir/$name.pid ]] || continue
    pid=$(<"$dir/$name.pid")
    kill "$pid" 2>/dev/null || continue
    for ((t = 0; t < 50; t++)); do alive "$pid" || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

case $action in
  stop) stop; exit 0 ;;
  start) ;;
  *) die "usage: $0 start|stop DIR" ;;
esac

for cmd in munged slurmctld slurmd sinfo; do
  command -v "$cmd" >/dev/null || die "$cmd not found: apt-get install -y slurm-wlm munge"
done
((EUID == 0)) || die "needs root (slurmd)"
host=$(hostname -s)
getent hosts "$host" >/dev/null || die "this host's name '$host' does not resolve (add it to /etc/hosts)"

chmod 700 "$dir"
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
# munge: a fresh key; --force lets munged run as root.
[[ -f $dir/munge.key ]] || { head -c 1024 /dev/urandom >"$dir/munge.key"; chmod 400 "$dir/munge.key"; }
munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"

read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
# JAX's coordinator port is 61440 + job id % 4096: a random first job id keeps two clusters on
# this machine (two test sessions at once) off each other's ports.
first_job_id=$((1 + RANDOM % 4096 * 16))

cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
FirstJobId=$first_job_id
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf

# -D: no fork; setsid + nohup: they outlive this script and the shell that ran it.
setsid nohup slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 </dev/null &
echo $! >"$dir/slurmctld.pid"  # the daemon writes the same PID there too
setsid nohup slurmd -D -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 </dev/null &
echo $! >"$dir/slurmd.pid"
for ((t = 0; t < 300; t++)); do
  [[ $(sinfo -h -o %T 2>/dev/null) == idle ]] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "local_slurm.sh: the node did not come up in 30 s; sinfo: $(sinfo 2>&1 | tr '\n' ' ')" >&2
tail -n 5 "$dir"/log/*.log >&2 || true
stop
exit 1
