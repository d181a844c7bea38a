#!/usr/bin/env bash
# A throwaway single-node SLURM cluster for CI and for trying the slurm profile locally.
#
#   .ci/slurm.sh start    install SLURM + munge if missing, write /etc/slurm/slurm.conf,
#                         start munged, slurmctld and slurmd, wait until the node is idle
#   .ci/slurm.sh stop     stop exactly the daemons that `start` launched
#   .ci/slurm.sh status   report the daemons and the node; exit 1 unless all are up
#
# All three are idempotent. No systemd: the daemons run in the foreground (-D / -F) as
# background children of this script, and their PIDs go to $STATE/pids. Runs as root (re-runs
# itself through `sudo -n` otherwise). Not for a machine that already has its own SLURM: the
# script refuses to overwrite a slurm.conf it did not write.
set -euo pipefail

STATE=${CYTOPRETRAIN_SLURM_STATE:-/tmp/cytopretrain-slurm}
PARTITION=${CYTOPRETRAIN_SLURM_PARTITION:-ci}
WAIT_SECONDS=${CYTOPRETRAIN_SLURM_WAIT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by cytopretrain .ci/slurm.sh"
PIDS=$STATE/pids
NODE=$(hostname -s)

log() { echo "slurm.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null || die "must run as root (no sudo found)"
        exec sudo -n --preserve-env=CYTOPRETRAIN_SLURM_STATE,CYTOPRETRAIN_SLURM_PARTITION,CYTOPRETRAIN_SLURM_WAIT "$0" "$@"
    fi
}

install_packages() {
    local missing=0 tool
    for tool in munged mungekey slurmctld slurmd sinfo sbatch squeue; do
        command -v "$tool" >/dev/null || missing=1
    done
    ((missing)) || return 0
    log "installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    # The packages try to start their services; without an init system that is refused, harmlessly.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >"$STATE/apt.log" 2>&1 ||
        { tail -n 30 "$STATE/apt.log" >&2; die "apt-get install failed (log: $STATE/apt.log)"; }
}

write_munge_key() {
    install -d -o munge -g munge -m 0700 /etc/munge
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
}

write_slurm_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace it"
    fi
    # slurmd -C reports this machine's real layout; a node declared bigger than it is gets drained.
    local hardware
    hardware=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
    install -d -m 0755 /etc/slurm "$STATE/slurmctld" "$STATE/slurmd"
    # The job-step plugin drops SLURM_CONF, so the configuration must sit at the default path.
    cat >"$CONF.tmp" <<EOF
$MARKER: a single-node test cluster, no accounting storage.
ClusterName=cytopretrain
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups in containers: track processes through /proc and leave task binding alone.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
MailProg=/bin/true
# Reject at submission a job no node can ever run (too many CPUs, too much memory) instead of
# leaving it pending forever while the workflow waits.
EnforcePartLimits=ALL
# A node that was down comes back by itself when its slurmd registers again.
ReturnToService=2
# Finished jobs stay visible to squeue this long: the workflow's status checks rely on it.
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# PID of daemon $1 if it was started by us and is still that program, else nothing.
live_pid() {
    local name=$1 pid
    [[ -f $PIDS ]] || return 0
    pid=$(awk -v n="$name" '$1 == n {print $2}' "$PIDS")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 0
    [[ $(cat "/proc/$pid/comm") == "$name" ]] && echo "$pid"
    return 0
}

all_running() {
    local name
    for name in munged slurmctld slurmd; do
        [[ -n $(live_pid "$name") ]] || return 1
    done
}

node_state() {
    sinfo --noheader --nodes="$NODE" --format=%t 2>/dev/null | head -n 1
}

show_logs() {
    local file
    for file in "$STATE"/slurmctld.log "$STATE"/slurmd.log "$STATE"/*.out; do
        [[ -f $file ]] || continue
        echo "----- $file (last 20 lines)" >&2
        tail -n 20 "$file" >&2
    done
}

wait_until_idle() {
    local deadline=$((SECONDS + WAIT_SECONDS)) state=""
    while ((SECONDS < deadline)); do
        all_running || break
        state=$(node_state)
        [[ $state == idle || $state == mix || $state == alloc ]] && return 0
        sleep 1
    done
    show_logs
    die "node $NODE not idle after ${WAIT_SECONDS}s (state: '${state:-no answer}'); daemons' logs above"
}

start_daemons() {
    : >"$PIDS"
    # Foreground modes keep each daemon our direct child, so $! is the daemon's own PID.
    setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --pid-file=/run/munge/munged.pid \
        >"$STATE/munged.out" 2>&1 &
    echo "munged $!" >>"$PIDS"
    local tries=0
    until munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; do
        ((++tries < 50)) || { show_logs; die "munged does not answer"; }
        sleep 0.1
    done
    slurmctld -D >"$STATE/slurmctld.out" 2>&1 &
    echo "slurmctld $!" >>"$PIDS"
    slurmd -D >"$STATE/slurmd.out" 2>&1 &
    echo "slurmd $!" >>"$PIDS"
}

stop() {
    local name pid waited
    for name in slurmd slurmctld munged; do
        pid=$(live_pid "$name")
        [[ -n $pid ]] || continue
        kill "$pid"
        waited=0
        while [[ -e /proc/$pid ]] && ((waited++ < 100)); do sleep 0.1; done
        [[ -e /proc/$pid ]] && kill -9 "$pid"
        log "stopped $name ($pid)"
    done
    rm -f "$PIDS"
}

start() {
    if all_running; then
        log "already running"
    else
        stop  # whatever part of an earlier cluster is still alive
        rm -f "$STATE"/*.log "$STATE"/*.out
        install_packages
        write_munge_key
        write_slurm_conf
        # A fresh controller state each time: no jobs or node states from an earlier run.
        rm -rf "${STATE:?}/slurmctld" "${STATE:?}/slurmd"
        install -d -m 0755 "$STATE/slurmctld" "$STATE/slurmd"
        start_daemons
    fi
    wait_until_idle
    log "node $NODE is $(node_state) in partition $PARTITION (logs: $STATE)"
}

status() {
    local name pid ok=0
    for name in munged slurmctld slurmd; do
        pid=$(live_pid "$name")
        if [[ -n $pid ]]; then echo "$name running ($pid)"; else echo "$name not running"; ok=1; fi
    done
    sinfo 2>&1 || ok=1
    return $ok
}

main() {
    local command=${1:-}
    case $command in
        start | stop | status) ;;
        *) die "usage: $0 start|stop|status" ;;
    esac
    as_root "$@"
    install -d -m 0755 "$STATE"
    "$command"
}

main "$@"
