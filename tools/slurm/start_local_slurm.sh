#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for the slurm-marked tests (Debian; root; no systemd needed).
# Installs slurm-wlm and munge when missing, writes /etc/slurm/slurm.conf, starts munged, slurmctld and
# slurmd as plain daemons, and waits until the node is idle. Idempotent: a second run with the daemons
# up does nothing. PIDs it started go to /run/local_slurm/ (stop_local_slurm.sh stops only those).
# Settings (environment): LOCAL_SLURM_CPUS (default nproc).
set -euo pipefail
state=/run/local_slurm
mkdir -p "$state"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # the image's policy-rc.d keeps apt from starting services; we start them ourselves
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
host=$(hostname -s)
cpus=${LOCAL_SLURM_CPUS:-$(nproc)}
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown slurm: /var/spool/slurmctld /var/log/slurm 2>/dev/null || true
new=$(mktemp)
cat > "$new" <<CONF
ClusterName=stagewise
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
KillWait=5
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
changed=1
if [ -f "$conf" ] && cmp -s "$new" "$conf"; then changed=0; fi
mv "$new" "$conf"
chmod 644 "$conf"
running() { [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }
if [ "$changed" = 1 ]; then  # settings such as cred_expire apply only on a restart
  for d in slurmd slurmctld; do running "$d" && kill "$(cat "$state/$d.pid")" && sleep 1; done
fi
install -d -o munge -g munge -m 0755 /run/munge
[ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; chown munge: /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged --force
  pgrep -x munged > "$state/munged.pid"
fi
if ! running slurmctld; then
  /usr/sbin/slurmctld
  sleep 0.5
  cat /run/slurmctld.pid > "$state/slurmctld.pid"
fi
if ! running slurmd; then
  /usr/sbin/slurmd
  sleep 0.5
  cat /run/slurmd.pid > "$state/slurmd.pid"
fi
for _ in $(seq 1 60); do
  if scontrol ping 2>/dev/null | grep -q "is UP" && sinfo -h -o %T 2>/dev/null | grep -qE "^idle"; then
    sinfo
    exit 0
  fi
  sleep 0.5
done
echo "the local Slurm cluster did not come up; slurmctld log:" >&2
tail -20 /var/log/slurm/slurmctld.log >&2 || true
exit 1
