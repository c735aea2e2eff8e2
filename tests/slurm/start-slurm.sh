#!/usr/bin/env bash
# Start a single-node Slurm (munge, slurmctld, slurmd) on this machine for the Slurm tests.
# Needs root and Debian/Ubuntu packages; installs them when missing. Prints one line and exits 0
# whether or not Slurm came up: the tests skip with the reason when `sinfo` cannot reach it.
set -u
log=${SLURM_START_LOG:-/tmp/bpfree-slurm-start.log}
fail() { echo "slurm: not started ($1; see $log)"; exit 0; }
exec 3>&1 >"$log" 2>&1

[ "$(id -u)" = 0 ] || fail "needs root"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "no apt-get to install slurmctld, slurmd, slurm-client, munge"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge || fail "apt-get install failed"
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=bpfree
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null || fail "cannot create the munge key"
fi
chown -R munge:munge /etc/munge /run/munge 2>/dev/null; chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force || fail "munged did not start"
pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start"
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start"

for _ in $(seq 1 30); do
    if sinfo -h -o "%t" 2>/dev/null | grep -qE "idle|mix|alloc"; then
        echo "slurm: running (node $host, $cpus CPUs, ${mem_mb} MB)" >&3
        exit 0
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1
    sleep 1
done
fail "node $host never became idle"
