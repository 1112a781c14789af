#!/usr/bin/env bash
# A local Slurm cluster for testing the sbatch scripts: one host, two emulated nodes (node1, node2).
#
#   bash slurm/cluster.sh start    # install slurm-wlm + munge if missing, write the config, start the daemons,
#                                  # cancel the jobs a killed earlier start left "running", wait until `sinfo`
#                                  # shows node1 and node2 idle; a no-op when already up
#   bash slurm/cluster.sh status   # the daemons and `sinfo`; exit 0 when all are up, 1 otherwise
#   bash slurm/cluster.sh stop     # stop the daemons by pid; a no-op when stopped (jobs' steps are left alone)
#
# Needs root and Debian's apt (Slurm 22.05 from `slurm-wlm`); no systemd needed. Exit code 3 means "this
# machine cannot host the cluster" (not root, no apt-get, the install failed): the tests skip on it.
# Settings (environment): CVAE_SLURM_DIR state/log/spool directory (default /tmp/cvae-slurm),
# CVAE_SLURM_NODE_CPUS CPUs per emulated node (default 1), CVAE_SLURM_WAIT seconds to wait for idle nodes
# (default 30), CVAE_SLURM_CTLD_PORT / CVAE_SLURM_NODE_PORT (6817 / 17001 and the next one).
# The config goes to /etc/slurm/slurm.conf (where sinfo/sbatch/srun look), written from
# slurm/slurm.conf.template; an /etc/slurm/slurm.conf that this script did not write is never replaced.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${CVAE_SLURM_DIR:-/tmp/cvae-slurm}"
NODE_CPUS="${CVAE_SLURM_NODE_CPUS:-1}"
WAIT_S="${CVAE_SLURM_WAIT:-30}"
CTLD_PORT="${CVAE_SLURM_CTLD_PORT:-6817}"
NODE1_PORT="${CVAE_SLURM_NODE_PORT:-17001}"
NODE2_PORT="$((NODE1_PORT + 1))"
CONF=/etc/slurm/slurm.conf
MARKER="# written by cvae-dist slurm/cluster.sh"
NODES=(node1 node2)
MUNGE_PID=/run/munge/munged.pid

say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: error: $1" >&2; exit "${2:-1}"; }

# pid from a pid file, if that process is alive and has the expected name
live_pid() {
    local file=$1 name=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc 0-9 <"$file")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
    echo "$pid"
}

ctld_pid() { live_pid "$STATE/slurmctld.pid" slurmctld; }
slurmd_pid() { live_pid "$STATE/slurmd-$1.pid" slurmd; }
munged_pid() { live_pid "$MUNGE_PID" munged; }

install_slurm() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "Slurm is not installed and installing it needs root" 3
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it" 3
    say "installing slurm-wlm and munge (apt-get, ~30 s)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$STATE/log/apt.log" 2>&1 9>&- \
        || { tail -n 20 "$STATE/log/apt.log" >&2; die "apt-get update failed (log: $STATE/log/apt.log)" 3; }
    apt-get install -y -q -o Dpkg::Options::=--force-confold slurm-wlm munge >>"$STATE/log/apt.log" 2>&1 9>&- \
        || { tail -n 20 "$STATE/log/apt.log" >&2; die "apt-get install slurm-wlm munge failed (log: $STATE/log/apt.log)" 3; }
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || die "apt-get installed slurm-wlm, but slurmctld/munged are not on PATH" 3
}

write_conf() {
    if [[ -e $CONF ]] && ! head -n 1 "$CONF" | grep -qF "$MARKER"; then
        die "$CONF exists and was not written by this script; move it away to use the test cluster" 3
    fi
    mkdir -p "$(dirname "$CONF")"
    local tmp
    tmp=$(mktemp "$CONF.XXXXXX")
    {
        echo "$MARKER (template: $HERE/slurm.conf.template)"
        sed -e "s|@STATE@|$STATE|g" -e "s|@NODE_CPUS@|$NODE_CPUS|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
            -e "s|@NODE1_PORT@|$NODE1_PORT|g" -e "s|@NODE2_PORT@|$NODE2_PORT|g" "$HERE/slurm.conf.template"
    } >"$tmp"
    chmod 644 "$tmp"
    mv "$tmp" "$CONF"
}

start_munge() {
    if munged_pid >/dev/null; then
        return 0 # ours from an earlier start, or the machine's own: either way usable
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then # the package's postinst normally creates it
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    # munged refuses to run as root ("Logfile is insecure"): run it as its own user
    runuser -u munge -- /usr/sbin/munged 9>&- || die "munged did not start (see /var/log/munge/munged.log)"
    touch "$STATE/munged.ours"
    local i
    for i in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_daemons() {
    if ! ctld_pid >/dev/null; then
        port_busy "$CTLD_PORT" && die "port $CTLD_PORT is in use by something else (set CVAE_SLURM_CTLD_PORT)"
        slurmctld -f "$CONF" 9>&- || die "slurmctld did not start; log: $STATE/log/slurmctld.log"
    fi
    local node
    for node in "${NODES[@]}"; do
        if ! slurmd_pid "$node" >/dev/null; then
            slurmd -f "$CONF" -N "$node" 9>&- || die "slurmd -N $node did not start; log: $STATE/log/slurmd-$node.log"
        fi
    done
}

# 0 when both nodes are up and usable (idle, or running jobs recovered from an earlier start)
nodes_ready() {
    local out
    out=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    local node
    for node in "${NODES[@]}"; do
        grep -Eq "^$node (idle|mix|alloc|comp)\$" <<<"$out" || return 1
    done
}

wait_ready() {
    local deadline=$((SECONDS + WAIT_S)) resumed=0
    while ((SECONDS < deadline)); do
        nodes_ready && return 0
        # a node drained by an earlier run (e.g. "Kill task failed") does not come back by itself
        if ((!resumed)) && sinfo -h -N -o '%t' 2>/dev/null | grep -Eq '^(drain|drng|drained)'; then
            scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.3
    done
    echo "cluster.sh: error: the nodes did not become idle within ${WAIT_S}s:" >&2
    sinfo -N -l >&2 || true
    local f
    for f in "$STATE/log/slurmctld.log" "$STATE"/log/slurmd-node*.log; do
        [[ -r $f ]] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

all_up() {
    munged_pid >/dev/null && ctld_pid >/dev/null && slurmd_pid node1 >/dev/null && slurmd_pid node2 >/dev/null
}

# A start killed with its jobs (a CI runner's session ended) leaves them RUNNING in the saved state: the new
# slurmctld recovers them and holds their nodes for good, while slurmd has purged their scripts. Cancel each
# recovered job whose batch step (a "slurmstepd: [ID.batch]" process) is gone; a job that still runs stays.
cancel_orphans() {
    local ids="" i id
    for i in $(seq 100); do # the new controller answers within a few seconds
        ids=$(squeue -h -t running,completing,configuring -o '%A' 2>/dev/null) && break
        sleep 0.3
    done
    for id in $ids; do
        pgrep -f "^slurmstepd: \\[$id\\." >/dev/null && continue
        say "cancelling job $id: recovered from an earlier start, its batch step is gone"
        scancel "$id" 2>/dev/null || true
    done
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "the test cluster runs its daemons as root: run as root" 3
    mkdir -p "$STATE"/{state,log,spool/node1,spool/node2}
    # fd 9 holds the lock; every daemon is started with 9>&- so it does not inherit the lock
    exec 9>"$STATE/lock"
    flock -w 120 9 || die "another cluster.sh holds $STATE/lock"
    if all_up && nodes_ready; then
        say "already running (config $CONF, state $STATE)"
        return 0
    fi
    install_slurm
    # rewrite the config only while slurmctld is down: a running controller keeps the one it read
    local fresh=0
    ctld_pid >/dev/null || { write_conf; fresh=1; }
    start_munge
    start_daemons
    ((fresh)) && cancel_orphans
    wait_ready
    say "running: node1 and node2 idle (config $CONF, logs $STATE/log)"
}

stop_pid() { # name pid: TERM, wait up to 15 s, then KILL
    local name=$1 pid=$2 i
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || { say "stopped $name ($pid)"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $name ($pid)"
}

cmd_stop() {
    mkdir -p "$STATE"
    exec 9>"$STATE/lock"
    flock -w 120 9 || die "another cluster.sh holds $STATE/lock"
    local node pid stopped=0
    if command -v squeue >/dev/null && ctld_pid >/dev/null; then
        local left
        left=$(squeue -h -t running,completing -o '%i' 2>/dev/null | tr '\n' ' ') || true
        [[ -z ${left// /} ]] || say "note: jobs still running ($left); their steps outlive slurmd"
    fi
    for node in "${NODES[@]}"; do
        if pid=$(slurmd_pid "$node"); then stop_pid "slurmd $node" "$pid"; stopped=1; fi
    done
    if pid=$(ctld_pid); then stop_pid slurmctld "$pid"; stopped=1; fi
    if [[ -e $STATE/munged.ours ]]; then # never stop a munged this script did not start
        if pid=$(munged_pid); then stop_pid munged "$pid"; stopped=1; fi
        rm -f "$STATE/munged.ours"
    fi
    ((stopped)) || say "not running"
}

cmd_status() {
    local rc=0 node pid
    if pid=$(munged_pid); then say "munged    running ($pid)"; else say "munged    stopped"; rc=1; fi
    if pid=$(ctld_pid); then say "slurmctld running ($pid)"; else say "slurmctld stopped"; rc=1; fi
    for node in "${NODES[@]}"; do
        if pid=$(slurmd_pid "$node"); then say "slurmd    $node running ($pid)"; else say "slurmd    $node stopped"; rc=1; fi
    done
    if ((rc == 0)); then sinfo -N || rc=1; fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: bash slurm/cluster.sh start|stop|status" >&2; exit 2 ;;
esac
