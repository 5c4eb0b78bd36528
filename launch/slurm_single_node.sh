#!/usr/bin/env bash
# A one-node SLURM on this Debian machine, to try the data stage's SLURM executor
# (data.executor=slurm, docs/data.md "On SLURM") without a cluster. Run it as root.
#
#   launch/slurm_single_node.sh start      # install (apt) if missing, write the config, start the daemons
#   export SLURM_CONF=/var/spool/moe_adapt_slurm/slurm.conf   # as it prints (not with --system)
#   sinfo && srun hostname
#   python -m moe_adapt 'stages=[data]' data=demo data.executor=slurm data.slurm.partition=debug \
#       "data.slurm.env_command='source $PWD/.venv/bin/activate'" data.slurm.poll_seconds=5
#   launch/slurm_single_node.sh stop       # stop slurmd, slurmctld and the munged it started (packages stay)
#   launch/slurm_single_node.sh status     # which daemons run; sinfo
#
# What it sets up: munge (Debian's key from the package), slurmctld and slurmd run directly as
# root daemons (no systemd), one node named after `hostname -s` with every CPU and the memory of
# /proc/meminfo, one partition (default "debug", the default one), select/cons_tres with cores and
# memory as consumable resources, proctrack/linuxproc, task/none, no cgroups, no accounting (no
# slurmdbd: sacct has nothing; finished jobs are appended to <dir>/jobcomp.txt instead).
#
# Options (after the command):
#   --dir DIR          config, state and logs (default /var/spool/moe_adapt_slurm)
#   --partition NAME   partition name (default debug)
#   --system           also write /etc/slurm/slurm.conf (so that sinfo/sbatch need no SLURM_CONF);
#                      without it nothing is written outside DIR (and /run/munge, apt's files)
#
# Idempotent: `start` rewrites slurm.conf only when its content changes (and then restarts the
# SLURM daemons), starts only the daemons that are not running, and waits until the node is idle.
set -euo pipefail

cmd="${1:-start}"
[[ $# -gt 0 ]] && shift
dir=/var/spool/moe_adapt_slurm
partition=debug
system=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --partition) partition="$2"; shift 2 ;;
        --system) system=1; shift ;;
        *) echo "slurm_single_node.sh: unknown option $1 (allowed: --dir DIR, --partition NAME, --system)" >&2; exit 2 ;;
    esac
done
conf="$dir/slurm.conf"
[[ $system == 1 ]] && conf=/etc/slurm/slurm.conf
export SLURM_CONF="$conf"
node="$(hostname -s)"

say() { echo "slurm_single_node.sh: $*"; }

alive() { # pid file -> running?
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pid() { # pid file, name
    if alive "$1"; then
        local pid
        pid="$(cat "$1")"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        say "stopped $2 (pid $pid)"
    fi
    rm -f "$1"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

write_conf() {
    local mem cpus tmp
    cpus="$(nproc)"
    mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))  # MB, as slurmd -C counts it
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$(dirname "$conf")"
    tmp="$(mktemp "$conf.XXXXXX")"
    cat >"$tmp" <<EOF
# Written by moe_adapt launch/slurm_single_node.sh: a one-node SLURM for trying data.executor=slurm.
ClusterName=moe_adapt_single
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
DefMemPerCPU=1024
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$partition Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f "$conf" ]] && cmp -s "$tmp" "$conf"; then
        rm -f "$tmp"
        return 1
    fi
    chmod 644 "$tmp"
    mv "$tmp" "$conf"
    say "wrote $conf (node $node, $cpus CPUs, ${mem} MB, partition $partition)"
    return 0
}

start() {
    if [[ "$(id -u)" != 0 ]]; then
        say "run it as root (it starts munged, slurmctld and slurmd)" >&2
        exit 2
    fi
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
        say "installing slurm-wlm and munge (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    if ! munge_ok; then
        runuser -u munge -- munged
        for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
        munge_ok || { say "munged did not start" >&2; exit 1; }
        mkdir -p "$dir"
        touch "$dir/munged.ours"  # stop stops only a munged this script started
        say "started munged"
    fi
    if write_conf; then  # a changed config: restart what runs on the old one
        stop_pid "$dir/slurmd.pid" slurmd
        stop_pid "$dir/slurmctld.pid" slurmctld
    fi
    if ! alive "$dir/slurmctld.pid"; then
        slurmctld -f "$conf"
        say "started slurmctld (log $dir/log/slurmctld.log)"
    fi
    if ! alive "$dir/slurmd.pid"; then
        slurmd -f "$conf"
        say "started slurmd (log $dir/log/slurmd.log)"
    fi
    local state=""
    for _ in $(seq 60); do
        state="$(sinfo -h -N -n "$node" -o %T 2>/dev/null || true)"
        [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] && break
        sleep 1
    done
    if [[ "$state" != idle* && "$state" != mix* && "$state" != alloc* ]]; then
        say "node $node is '${state:-not reported}' after 60 s; see $dir/log/" >&2
        exit 1
    fi
    sinfo
    [[ $system == 1 ]] || say "now: export SLURM_CONF=$conf"
}

stop() {
    stop_pid "$dir/slurmd.pid" slurmd
    stop_pid "$dir/slurmctld.pid" slurmctld
    if [[ -f "$dir/munged.ours" ]]; then
        stop_pid /run/munge/munged.pid munged
        rm -f "$dir/munged.ours"
    fi
}

status() {
    for d in slurmctld slurmd; do
        if alive "$dir/$d.pid"; then say "$d running (pid $(cat "$dir/$d.pid"))"; else say "$d not running"; fi
    done
    if munge_ok; then say "munged running"; else say "munged not running"; fi
    sinfo 2>/dev/null || true
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "slurm_single_node.sh: unknown command $cmd (allowed: start, stop, status)" >&2; exit 2 ;;
esac
