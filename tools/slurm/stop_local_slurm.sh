#!/usr/bin/env bash
# Stops what start_local_slurm.sh started (and nothing else): cancels queued jobs, then SIGTERM to the
# recorded PIDs whose /proc/PID/comm still names the daemon, SIGKILL after 20 s.
set -uo pipefail
state=/run/local_slurm
command -v scancel >/dev/null && scancel --user="$(id -un)" 2>/dev/null || true
for d in slurmd slurmctld munged; do
  pidfile="$state/$d.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$d" ]; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done
