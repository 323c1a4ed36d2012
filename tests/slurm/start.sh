#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the SLURM tests (tests/test_slurm.py):
# munged, slurmctld and slurmd, all under one temporary folder, as root.
#
#   eval "$(bash tests/slurm/start.sh)"      # prints: export SLURM_CONF=...; export TQDIT_SLURM_DIR=...
#   bash tests/slurm/stop.sh                 # stops the daemons it started (by PID), removes the folder
#
# Installs Debian's slurm-wlm and munge if they are missing (apt-get). Everything it writes lies under
# $TQDIT_SLURM_DIR (default: a new mktemp folder): the munge key, socket and seed, slurm.conf, the
# daemons' spool, state, PID and log files. Nothing goes to /etc; the daemons listen on ports 16817/16818
# (TQDIT_SLURM_PORT, +1) so that a real SLURM of the machine, if any, is not disturbed. Client commands
# find the cluster through SLURM_CONF, which this script prints for the caller to export.
set -euo pipefail

log() { echo "slurm/start: $*" >&2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        log "slurm-wlm and munge are not installed and this is not root: apt-get install slurm-wlm munge"
        exit 1
    fi
    log "installing slurm-wlm and munge (Debian packages)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
fi
if [ "$(id -u)" -ne 0 ]; then
    log "the daemons run as root (SlurmUser=root); run this as root"
    exit 1
fi

dir="${TQDIT_SLURM_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/tqdit-slurm.XXXXXX")}"
port="${TQDIT_SLURM_PORT:-16817}"
mkdir -p "$dir"/{munge,spool/ctld,spool/d,log}
# whatever fails from here on, stop the daemons already started (stop.sh reads their PID files)
trap 'status=$?; [ "$status" -eq 0 ] || bash "$(dirname "$0")/stop.sh" "$dir" >&2' EXIT
chmod 700 "$dir" "$dir/munge"
host="$(hostname -s)"
cpus="$(nproc)"
memory_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"

# munge: its own key, socket, PID, log and seed files
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" --force \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

cat > "$dir/slurm.conf" <<CONF
# A one-node cluster for tqdit's SLURM tests (tests/slurm/start.sh)
ClusterName=tqdit-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (SLURM's default 120 s)
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=20
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# jobs stay visible to squeue for 5 minutes after they end; requeued jobs start again at once
MinJobAge=300
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 60); do
    state="$(sinfo -h -n "$host" -o %t 2>/dev/null || true)"
    if [ "$state" = "idle" ]; then
        log "cluster up: node $host idle ($cpus CPUs, ${memory_mb} MB), state in $dir"
        echo "export SLURM_CONF=$SLURM_CONF; export TQDIT_SLURM_DIR=$dir"
        exit 0
    fi
    sleep 1
done
log "the node did not become idle within 60 s (state: '${state:-no answer}'); the logs' last lines:"
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1
