#!/usr/bin/env bash
# A single-node SLURM cluster (munged + slurmctld + slurmd) on this machine, for tests, CI and trying
# `gsv3d sweep --submit` without a real cluster. Needs Debian's `slurm-wlm` and `munge` packages and root
# (SlurmUser=root; `scontrol requeue` from inside a job must be allowed).
#
#   scripts/slurm_local.sh start    # idempotent: does nothing if the cluster in $SLURM_LOCAL_DIR is up
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh stop     # idempotent; kills only the daemons whose pid files it wrote
#   scripts/slurm_local.sh env      # prints `export SLURM_CONF=...` (eval "$(scripts/slurm_local.sh env)")
#
# Everything (slurm.conf, munge key and socket, state, spool, logs, pid files) lives under
# $SLURM_LOCAL_DIR (default /tmp/gsv3d-slurm); nothing under /etc is touched. Clients (sbatch, squeue,
# scontrol, and the jobs themselves through the exported environment) find the cluster via SLURM_CONF.
# Ports: $SLURM_LOCAL_CTLD_PORT (6817) and $SLURM_LOCAL_SLURMD_PORT (6818).
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/gsv3d-slurm}"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
CONF="$DIR/etc/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"
MUNGE_PID="$DIR/run/munged.pid"
CTLD_PID="$DIR/run/slurmctld.pid"
SLURMD_PID="$DIR/run/slurmd.pid"
export SLURM_CONF="$CONF"

log() { echo "[slurm_local] $*" >&2; }

need() {
    local missing=()
    for b in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
        command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || missing+=("$b")
    done
    if ((${#missing[@]})); then
        log "missing: ${missing[*]}. Install them with: apt-get install -y slurm-wlm munge"
        exit 2
    fi
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root (the local cluster uses SlurmUser=root)"
        exit 2
    fi
}

pid_alive() {  # pid_alive FILE -> 0 when FILE names a live process
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

is_up() {
    pid_alive "$MUNGE_PID" && pid_alive "$CTLD_PID" && pid_alive "$SLURMD_PID" \
        && scontrol ping 2>/dev/null | grep -q "UP"
}

write_conf() {
    local host cpus mem node_line
    host="$(hostname -s)"
    # `slurmd -C` reports this machine's real CPUs/sockets/cores/threads and memory.
    node_line="$(slurmd -C | head -n 1)"
    cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
    mem=$((mem * 95 / 100))  # headroom: slurmd drains a node whose RealMemory exceeds what it measures
    mkdir -p "$DIR/etc"
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_local.sh: a single-node cluster for tests. Do not use in production.
ClusterName=gsv3dlocal
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s; short for tests).
AuthInfo=socket=${MUNGE_SOCKET},cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10}
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/slurmd.%n
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers/CI: track processes by /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${DIR}/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
MpiDefault=none
MinJobAge=600
KillWait=10
InactiveLimit=0
Waittime=0
MessageTimeout=20
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv -f "$CONF.tmp" "$CONF"
}

start_munge() {
    mkdir -p "$DIR/munge" "$DIR/run" "$DIR/log"
    chmod 700 "$DIR/munge"
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        # A fresh random key, local to this cluster (never the system's /etc/munge/munge.key).
        head -c 1024 /dev/urandom >"$DIR/munge/munge.key.tmp"
        chmod 400 "$DIR/munge/munge.key.tmp"
        mv -f "$DIR/munge/munge.key.tmp" "$DIR/munge/munge.key"
    fi
    pid_alive "$MUNGE_PID" && return 0
    # --force: munged refuses root and /tmp paths by default; this cluster is root-only and throw-away.
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$MUNGE_PID" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            log "timed out after ${secs}s waiting for: $what"
            return 1
        fi
        sleep 0.5
    done
}

node_idle() { sinfo -h -N -o '%t' | grep -Eq '^(idle|mix|alloc)'; }

dump_logs() {
    for f in "$DIR"/log/*.log; do
        [[ -f "$f" ]] || continue
        log "---- tail $f"
        tail -n 30 "$f" >&2 || true
    done
}

cmd_start() {
    need
    if is_up; then
        log "already running (SLURM_CONF=$CONF)"
        print_usage
        return 0
    fi
    # A half-started cluster from an earlier attempt: stop what is left, start clean.
    cmd_stop >/dev/null 2>&1 || true
    mkdir -p "$DIR"/{state,spool,log,run}
    write_conf
    # On any failure below: show the logs and stop what was started.
    trap 'log "start failed"; dump_logs; cmd_stop; exit 1' ERR
    start_munge
    wait_for 10 "munged socket" test -S "$MUNGE_SOCKET"
    slurmctld -c -f "$CONF"  # -c: clean start, forget jobs from an earlier cluster in this dir
    wait_for 30 "slurmctld" bash -c "scontrol ping | grep -q UP"
    slurmd -f "$CONF"
    wait_for 60 "node ready in partition debug" node_idle
    trap - ERR
    log "cluster up: $(sinfo -h -o '%P %a %D %t %N')"
    print_usage
}

kill_pidfile() {  # kill_pidfile FILE NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local f=$1 name=$2 pid
    [[ -s "$f" ]] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) did not stop; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}

cmd_stop() {
    if [[ -f "$CONF" ]] && pid_alive "$CTLD_PID"; then
        # Cancel our jobs first so slurmd reaps their processes.
        scancel --quiet --full --partition=debug 2>/dev/null || true
        for _ in $(seq 20); do
            [[ -z "$(squeue -h -t running,completing 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    kill_pidfile "$SLURMD_PID" slurmd
    kill_pidfile "$CTLD_PID" slurmctld
    kill_pidfile "$MUNGE_PID" munged
    log "stopped (state kept in $DIR)"
}

cmd_status() {
    if is_up; then
        sinfo
        squeue
    else
        log "not running"
        return 1
    fi
}

print_usage() {
    cat <<EOF
To use this cluster from a shell:
  export SLURM_CONF=$CONF
  sinfo; gsv3d sweep configs/sweeps/ablations_tiny.yaml --submit; squeue
Stop it with: $0 stop
EOF
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *)
        echo "usage: $0 {start|stop|status|env}   (state dir: \$SLURM_LOCAL_DIR, now $DIR)" >&2
        exit 2
        ;;
esac
