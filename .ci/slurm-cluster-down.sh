#!/usr/bin/env bash
# Stop the test cluster started by .ci/slurm-cluster.sh: cancel every job,
# stop both slurmds and slurmctld, then munged.
#
#   bash .ci/slurm-cluster-down.sh               # stop everything
#   bash .ci/slurm-cluster-down.sh --keep-munge  # leave munged running
#   bash .ci/slurm-cluster-down.sh --purge       # also delete Slurm's saved
#                                                # state, spool dirs and logs
#
# Only processes named in the daemons' own pid files are signalled, never
# anything found by name. Safe to run when nothing is running.
#
# Environment:
#   SLURM_CLUSTER_TIMEOUT  seconds to wait for each stage (default 60)
set -uo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
readonly TIMEOUT="${SLURM_CLUSTER_TIMEOUT:-60}"
keep_munge=0
purge=0
for arg in "$@"; do
    case "$arg" in
    --keep-munge) keep_munge=1 ;;
    --purge) purge=1 ;;
    *)
        echo "usage: $0 [--keep-munge] [--purge]" >&2
        exit 2
        ;;
    esac
done

status=0
log() { echo "slurm-cluster-down: $*"; }

# running PID COMM: PID is a live (not zombie) process named COMM. Zombies
# count as gone: the daemons are children of PID 1, which may reap late.
running() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ $stat == "$1 ($2) "* ]] && [[ ${stat#*) } != Z* ]]
}

# pid_of PIDFILE COMM: print the pid in PIDFILE if that process is COMM.
pid_of() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    running "$pid" "$2" || return 1
    echo "$pid"
}

# stop PIDFILE COMM: SIGTERM the daemon and wait for it to exit; SIGKILL it
# if it is still there after $TIMEOUT seconds.
stop() {
    local pid sig=TERM deadline
    pid="$(pid_of "$1" "$2")" || return 0
    log "stopping $2 (pid $pid)"
    for sig in TERM KILL; do
        kill "-$sig" "$pid" 2>/dev/null || return 0
        deadline=$((SECONDS + TIMEOUT))
        while running "$pid" "$2"; do
            ((SECONDS < deadline)) || break
            sleep 0.2
        done
        running "$pid" "$2" || return 0
        log "$2 (pid $pid) still running ${TIMEOUT}s after SIG$sig"
    done
    status=1
}

if command -v scontrol >/dev/null 2>&1 && [[ "$(scontrol ping 2>/dev/null)" == *"is UP"* ]]; then
    jobs="$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null
        deadline=$((SECONDS + TIMEOUT))
        while [[ -n "$(squeue -h -o %A 2>/dev/null)" ]] && ((SECONDS < deadline)); do
            sleep 0.5
        done
        [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] || log "jobs still listed after ${TIMEOUT}s; stopping anyway"
    fi
fi

# slurmds first, so no node is reported lost to a controller that is going
# away anyway; then the controller (which saves its state on SIGTERM).
for pidfile in /run/slurmd-*.pid; do
    [[ -e $pidfile ]] && stop "$pidfile" slurmd
done
stop /run/slurmctld.pid slurmctld

if ((!keep_munge)); then
    stop /run/munge/munged.pid munged
fi

if ((purge)); then
    log "deleting saved state, spool directories and logs"
    rm -rf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-*.log
fi
if ((status)); then
    log "some daemons could not be stopped"
else
    log "done"
fi
exit "$status"
