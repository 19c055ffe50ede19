#!/usr/bin/env bash
# Bring up a two-node Slurm cluster on this one machine, for flashrun's
# `@pytest.mark.slurm` integration tests.
#
#   bash .ci/slurm-cluster.sh        # as root; idempotent
#   bash .ci/slurm-cluster-down.sh   # stops it again
#
# Result: slurmctld on localhost and two compute nodes, n1 and n2, each its
# own slurmd (`slurmd -N n1`, `slurmd -N n2`) listening on its own port of
# 127.0.0.1, in one partition `debug`. `srun -N2 --ntasks-per-node=1 CMD`
# then runs CMD twice with SLURM_NODEID 0 and 1, SLURM_NNODES=2 and
# SLURM_JOB_NODELIST=n[1-2], like a real two-node job.
#
# Written for Debian 12 (slurm-wlm 22.05, munge 0.5.15) run as root in a
# container or VM where systemd is usually NOT PID 1: every daemon is started
# directly by this script, never through a unit, so it behaves the same with
# or without systemd. Debian builds Slurm with --enable-multiple-slurmd
# (`scontrol show config` says MULTIPLE_SLURMD = Yes), which is what lets two
# slurmds share one host; the script checks that before relying on it.
#
# Safe to run again: each step checks first and only does what is missing.
# If the cluster is already up with this configuration it changes nothing.
# If the configuration written here changed, the cluster is restarted.
# It exits non-zero with a message and the daemons' log tails on failure.
#
# Environment:
#   SLURM_CLUSTER_TIMEOUT  seconds to wait for each stage (default 60)
set -euo pipefail

# Daemons and admin tools live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

readonly TIMEOUT="${SLURM_CLUSTER_TIMEOUT:-60}"
readonly CONF=/etc/slurm/slurm.conf
readonly CLUSTER_NAME=flashrun-ci
readonly STATE_DIR=/var/spool/slurmctld
readonly SPOOL_DIR=/var/spool/slurmd
readonly LOG_DIR=/var/log/slurm
readonly MUNGE_KEY=/etc/munge/munge.key
readonly NODES=(n1 n2)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HERE

started=0 # set to 1 when this run started or reconfigured anything

log() { echo "slurm-cluster: $*"; }

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd-n1.log "$LOG_DIR"/slurmd-n2.log \
        /var/log/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 15 "$f" >&2 || true
    done
}

die() {
    echo "slurm-cluster: ERROR: $*" >&2
    show_logs
    echo "slurm-cluster: ERROR: the Slurm test cluster could not be brought up (see above)" >&2
    exit 1
}

# pid_alive PIDFILE COMM: the process named in PIDFILE is a live (not
# zombie) process called COMM. A pid file left by a killed daemon, or one
# whose pid was reused by something else, does not count.
pid_alive() {
    local pid stat
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ $stat == "$pid ($2) "* ]] && [[ ${stat#*) } != Z* ]]
}

# wait_for DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it
# succeeds or $TIMEOUT seconds pass (then die).
wait_for() {
    local what="$1" deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.5
    done
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

# --- 0. systemd? ----------------------------------------------------------------
pid1="$(cat /proc/1/comm 2>/dev/null || echo unknown)"
if [[ $pid1 == systemd ]]; then
    log "PID 1 is systemd; still starting the daemons directly"
    # The packaged units would start a second slurmctld, and a slurmd without
    # -N that matches no node, against the same slurm.conf; keep them off.
    systemctl disable --now slurmctld.service slurmd.service >/dev/null 2>&1 || true
else
    log "PID 1 is '$pid1', not systemd; this script manages the daemons itself"
fi

# --- 1. packages ----------------------------------------------------------------
readonly TOOLS=(munge unmunge munged slurmctld slurmd srun sinfo scontrol scancel squeue)
missing_tools() {
    local t
    for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || return 0; done
    return 1
}
if missing_tools; then
    log "installing slurm-wlm and munge with apt-get"
    t0=$SECONDS
    apt_install() { apt-get install -y --no-install-recommends slurm-wlm munge; }
    apt_log=/tmp/slurm-cluster-apt.log
    apt_failed() {
        tail -n 20 "$apt_log" >&2
        die "$1 (full output in $apt_log)"
    }
    # Without `apt-get update` first: the package lists are usually there
    # already, and update is slow and needs the mirror.
    if ! apt_install >"$apt_log" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update >>"$apt_log" 2>&1 || apt_failed "apt-get update failed"
        apt_install >>"$apt_log" 2>&1 || apt_failed "apt-get install slurm-wlm munge failed"
    fi
    log "installed in $((SECONDS - t0))s: $(dpkg-query -W -f='${Package} ${Version}  ' slurm-wlm munge)"
    started=1
    missing_tools && die "installed slurm-wlm and munge but some of ${TOOLS[*]} are still missing"
fi

# Two slurmds on one host need a build with --enable-multiple-slurmd; without
# it they would collide (one node name per host) and srun -N2 could not get
# two SLURM_NODEIDs. The build option is compiled into libslurm and shows as
# this key in `scontrol show config`, but that needs a running controller, so
# check the library for the key's string instead.
for libslurm in /usr/lib/*/slurm-wlm/libslurmfull.so /usr/lib/*/slurm/libslurmfull.so; do
    if [[ -f $libslurm ]] && ! grep -q MULTIPLE_SLURMD "$libslurm"; then
        die "this Slurm build ($libslurm) lacks --enable-multiple-slurmd, so n1 and n2 cannot both run here"
    fi
done

# --- 2. munge -------------------------------------------------------------------
if [[ ! -s $MUNGE_KEY ]]; then
    log "creating $MUNGE_KEY"
    install -d -o munge -g munge -m 0700 "$(dirname "$MUNGE_KEY")"
    mungekey --create --keyfile="$MUNGE_KEY"
fi
# munged refuses a key readable by others; the package's postinst does the same.
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    log "starting munged"
    # /run/munge is normally made by the systemd unit (RuntimeDirectory=).
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    # As the munge user, like the unit; a stale socket or pid file left by a
    # killed munged is taken over by munged itself.
    runuser -u munge -- munged </dev/null >/dev/null 2>&1 || die "munged failed to start"
    wait_for "munged to issue credentials" munge_ok
    started=1
fi

# --- 3. host names n1 and n2 ------------------------------------------------------
# Slurm reaches both slurmds through NodeAddr=127.0.0.1 and needs no name
# lookup, but jobs do: flashrun rendezvouses on the first host of
# SLURM_JOB_NODELIST, i.e. on the name "n1".
for node in "${NODES[@]}"; do
    addr="$(awk -v n="$node" '!/^[[:space:]]*#/ { for (i = 2; i <= NF; i++) if ($i == n) { print $1; exit } }' /etc/hosts)"
    if [[ -z $addr ]]; then
        log "adding '$node' to /etc/hosts as 127.0.0.1"
        echo "127.0.0.1 $node  # added by flashrun .ci/slurm-cluster.sh" >>/etc/hosts ||
            die "cannot write /etc/hosts"
    elif [[ $addr != 127.0.0.1 ]]; then
        die "/etc/hosts maps '$node' to $addr; this test cluster needs it to be 127.0.0.1"
    fi
done

# --- 4. slurm.conf --------------------------------------------------------------
desired_conf() {
    cat <<EOF
# Written by flashrun's .ci/slurm-cluster.sh: a two-node test cluster on one
# machine (see that script). Edits are overwritten on its next run.
ClusterName=$CLUSTER_NAME
# "localhost" rather than \`hostname\`: slurmctld accepts it as its own name on
# any machine, so the file does not depend on the CI machine's host name.
SlurmctldHost=localhost
SlurmctldPort=6817
# Everything runs as root: a throwaway CI cluster, no file ownership to set up.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
# Two slurmds on one host (Debian builds with --enable-multiple-slurmd): %n
# is the node name given with -N, so each slurmd gets its own spool
# directory, pid file and log instead of clobbering the other's.
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
# Trust the node lines below over what slurmd detects: both slurmds see the
# same 2 cores and report them, and on a machine with another core count a
# mismatch must not drain the node.
SlurmdParameters=config_overrides
# No cgroup plugins: they need a writable, delegated cgroup tree, which a
# container rarely has. linuxproc tracks a job's processes through the
# parent/child tree (so scancel still kills flashrun's workers); task/none
# binds nothing, so both nodes may use both cores (oversubscribed on purpose).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Only plain srun launches; slurmctld still probes every mpi plugin at start
# and logs "can not load PMIx library" (libpmix is only a Recommends), which
# is harmless.
MpiDefault=none
SwitchType=switch/none
# No mail on this machine; the default MailProg does not exist.
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A node that went away (daemon killed, machine restarted) becomes usable
# again as soon as its slurmd registers, instead of staying DOWN.
ReturnToService=2
# Short grace between SIGTERM and SIGKILL on scancel/timeouts, so a hung
# test job is gone quickly.
KillWait=5
# A job whose srun was killed (e.g. by a test's timeout) is ended after 60 s
# instead of holding its CPUs for ever (the default, 0, never ends it).
InactiveLimit=60
# Same address, distinct ports: that is how two slurmds share 127.0.0.1.
# NodeHostname is the node's own name (resolvable through /etc/hosts); with
# -N it is not used to pick the node. CPUs=2 on each lets a 2-core machine
# run a one-task-per-node job on both nodes, and two such jobs at once.
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=n1 Port=17001 CPUs=2 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=n2 Port=17002 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

install -d -m 0755 /etc/slurm "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
for node in "${NODES[@]}"; do install -d -m 0755 "$SPOOL_DIR/$node"; done

# (Output captured before matching: with pipefail, `cmd | grep -q` fails
# whenever grep exits early and cmd dies of SIGPIPE.)
controller_up() { [[ "$(scontrol ping 2>/dev/null)" == *"is UP"* ]]; }

if ! cmp -s <(desired_conf) "$CONF"; then
    if [[ -f $CONF ]] && { controller_up || pid_alive /run/slurmd-n1.pid slurmd || pid_alive /run/slurmd-n2.pid slurmd; }; then
        log "$CONF changed while the cluster runs: stopping it to restart with the new file"
        bash "$HERE/slurm-cluster-down.sh" --keep-munge
    fi
    log "writing $CONF"
    desired_conf >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    started=1
fi

# slurmctld refuses to start on state saved under another ClusterName.
if [[ -f $STATE_DIR/clustername ]] && [[ "$(cat "$STATE_DIR/clustername")" != "$CLUSTER_NAME" ]] && ! controller_up; then
    log "discarding $STATE_DIR saved by another cluster ($(cat "$STATE_DIR/clustername"))"
    find "$STATE_DIR" -mindepth 1 -delete
fi

# --- 5. daemons -----------------------------------------------------------------
if ! controller_up; then
    log "starting slurmctld"
    # -c: start from a clean slate instead of the state saved by the last
    # controller. Jobs saved as running then (CI ends a session's processes
    # with SIGKILL) can no longer be running, but would be restored as
    # running and hold their CPUs.
    # It daemonizes itself; stdio goes nowhere so callers that capture this
    # script's output are not kept waiting by the daemon holding the pipe.
    slurmctld -c </dev/null >/dev/null 2>&1 || die "slurmctld failed to start"
    wait_for "slurmctld to answer 'scontrol ping'" controller_up
    started=1
fi

if ! grep -q 'MULTIPLE_SLURMD *= *Yes' <<<"$(scontrol show config 2>/dev/null)"; then
    die "slurmctld reports no MULTIPLE_SLURMD support; two slurmds cannot share this host"
fi

for node in "${NODES[@]}"; do
    if ! pid_alive "/run/slurmd-$node.pid" slurmd; then
        log "starting slurmd -N $node"
        slurmd -N "$node" </dev/null >/dev/null 2>&1 || die "slurmd -N $node failed to start"
        started=1
    fi
done

# --- 6. wait until both nodes are idle ----------------------------------------------
node_state() { scontrol -o show node "$1" 2>/dev/null | grep -o 'State=[^ ]*' | cut -d= -f2; }

deadline=$((SECONDS + TIMEOUT))
resumed=""
while :; do
    states=()
    ready=1
    for node in "${NODES[@]}"; do
        pid_alive "/run/slurmd-$node.pid" slurmd || die "slurmd for $node exited (see its log below)"
        state="$(node_state "$node" || true)" # empty until the node is known
        states+=("$node=${state:-?}")
        case "$state" in
        IDLE | MIXED | ALLOCATED) ;;
        *)
            ready=0
            # Registered (responding) but DOWN or DRAINED, e.g. by state left from
            # an earlier run: put it back in service, once.
            if [[ $state =~ DOWN|DRAIN ]] && [[ $state != *NOT_RESPONDING* ]] && [[ $resumed != *"$node"* ]]; then
                log "$node is $state; resuming it"
                scontrol update NodeName="$node" State=RESUME || true
                resumed+=" $node"
            fi
            ;;
        esac
    done
    ((ready)) && break
    ((SECONDS < deadline)) || die "nodes not ready after ${TIMEOUT}s: ${states[*]}"
    sleep 0.5
done

if ((!started)); then
    log "already up (${states[*]}), nothing to do"
    exit 0
fi
log "nodes ready: ${states[*]}"

# --- 7. check that a two-node job really runs ----------------------------------------
log "checking: srun -N2 --ntasks-per-node=1 hostname"
check_job=slurm-cluster-check
# shellcheck disable=SC2016  # expanded by the job's shell, not here
if ! out="$(timeout "$TIMEOUT" srun -N2 --ntasks-per-node=1 -J "$check_job" \
    sh -c 'echo "$SLURM_NODEID $SLURM_NNODES $SLURM_JOB_NODELIST $(hostname)"' 2>&1)"; then
    scancel --name="$check_job" >/dev/null 2>&1 || true
    die "srun -N2 --ntasks-per-node=1 failed or timed out: $out"
fi
sorted="$(sort <<<"$out" | cut -d' ' -f1-3 | tr '\n' ';')"
[[ $sorted == "0 2 n[1-2];1 2 n[1-2];" ]] ||
    die "srun -N2 ran, but the tasks did not see SLURM_NODEID 0 and 1 of n[1-2]: $out"
log "srun ok: $(tr '\n' ';' <<<"$out")"
log "cluster up: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')"
