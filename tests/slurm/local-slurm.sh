#!/usr/bin/env bash
# A two-node Slurm cluster on localhost for tests: munged + slurmctld + two slurmd (nodes n1 and n2, both this
# host, each on its own port; Debian's Slurm supports several slurmd per host) with their state in BASE.
#   tests/slurm/local-slurm.sh start BASE     (prints nothing on success; daemons daemonise themselves)
#   tests/slurm/local-slurm.sh stop BASE      (stops only the daemons whose pid files are in BASE)
# Needs root, Debian's slurmctld slurmd slurm-client munge (envs/system-packages.sh installs them), and a private
# mount namespace (unshare): the configuration lives in BASE and /etc is never written (exit 3 where it cannot be).
set -euo pipefail
action=${1:?start|stop}
base=$(mkdir -p "${2:?BASE directory}" && cd "$2" && pwd)

stop() {
  for daemon in slurmd-n1 slurmd-n2 slurmctld munged; do
    pidfile="$base/run/$daemon.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

start() {
  mkdir -p "$base"/{etc,run,log,state/ctld,state/d-n1,state/d-n2,munge}
  chmod 0755 "$base" "$base/run"; chmod 0700 "$base/munge"
  [ -f "$base/munge/munge.key" ] || mungekey -c -k "$base/munge/munge.key"
  chmod 0400 "$base/munge/munge.key"
  munged --socket="$base/run/munge.socket" --key-file="$base/munge/munge.key" --pid-file="$base/run/munged.pid" \
         --log-file="$base/log/munged.log" --seed-file="$base/munge/munged.seed"
  # 2 CPUs per node on a 2-core machine (config_overrides): room for a 2-node job next to snakemake's own jobs
  cpus=${LOCAL_SLURM_CPUS:-2}
  mem=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048) / 2 ))
  port=${LOCAL_SLURM_PORT:-6817}
  cat > "$base/etc/slurm.conf" <<CONF
ClusterName=localci
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$base/run/munge.socket
StateSaveLocation=$base/state/ctld
SlurmdSpoolDir=$base/state/d-%n
SlurmctldPidFile=$base/run/slurmctld.pid
SlurmdPidFile=$base/run/slurmd-%n.pid
SlurmctldLogFile=$base/log/slurmctld.log
SlurmdLogFile=$base/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(( port + 1 )) CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(( port + 2 )) CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  # Clients find the cluster through SLURM_CONF, but the job steps the snakemake jobstep starts lose it (Snakemake's
  # slurm-jobstep plugin deletes SLURM_CONF with the other SLURM_* variables) and fall back to the default path,
  # /etc/slurm/slurm.conf. So the slurmd daemons, and with them every job, run in a private mount namespace where
  # BASE/etc is mounted over /etc/slurm: the machine's /etc, and any Slurm configuration of its own, stay as they are.
  export SLURM_CONF="$base/etc/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  if [ ! -d /etc/slurm ]; then
    echo "/etc/slurm does not exist (Slurm's packages make it): no directory to mount the test configuration on" >&2
    stop
    exit 3
  fi
  if ! probe=$(unshare --mount --propagation private true 2>&1); then
    echo "no private mount namespace here ($probe): the local Slurm test needs one so that its configuration never" \
         "replaces /etc/slurm's" >&2
    stop
    exit 3
  fi
  unshare --mount --propagation private sh -c 'mount --bind "$1/etc" /etc/slurm &&
    slurmd -f "$SLURM_CONF" -N n1 && slurmd -f "$SLURM_CONF" -N n2' sh "$base" ||
    { echo "slurmd did not start; see $base/log" >&2; stop; exit 1; }
  for _ in $(seq 100); do
    if [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" = 2 ]; then return 0; fi
    sleep 0.2
  done
  echo "local slurm did not become idle; see $base/log" >&2
  return 1
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop BASE" >&2; exit 2 ;;
esac
