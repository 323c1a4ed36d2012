#!/usr/bin/env bash
# Stop the cluster tests/slurm/start.sh started: the daemons by the PIDs in its folder, then the folder.
#   bash tests/slurm/stop.sh [folder]       (default: $TQDIT_SLURM_DIR)
set -uo pipefail
dir="${1:-${TQDIT_SLURM_DIR:-}}"
if [ -z "$dir" ] || [ ! -d "$dir/munge" ]; then  # start.sh makes munge/ first: never remove another folder
    echo "slurm/stop: no cluster folder of tests/slurm/start.sh given (argument or TQDIT_SLURM_DIR)" >&2
    exit 1
fi
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
done
rm -rf "$dir"
echo "slurm/stop: stopped the daemons of $dir and removed it" >&2
