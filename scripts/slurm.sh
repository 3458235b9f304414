#!/usr/bin/env bash
# scripts/slurm.sh - a real single-node SLURM cluster on localhost for DecodeBench's sweep tests.
#
#   scripts/slurm.sh start    install (apt, once), configure, start the daemons, check (default)
#   scripts/slurm.sh check    submit a 2-task array job and wait until sacct shows it COMPLETED
#   scripts/slurm.sh status   which daemons run; sinfo
#   scripts/slurm.sh stop     stop the daemons this script started
#
# Needs root and apt-get (Debian/Ubuntu): it installs munge, slurmctld, slurmd, slurm-client,
# slurmdbd and mariadb-server. Accounting (slurmdbd + MariaDB) is not optional here: submitit
# polls `sacct`, and without it a job that dies without a result makes the sweep wait forever.
# No systemd and no cgroups are needed (proctrack/linuxproc, task/none).
#
# Idempotent and fast when the cluster is already up: `start` then only pings the daemons
# (well under a second) and skips the check job.
#
# Exit codes: 0 up; 1 failed (logs printed); 3 cannot install (no apt-get, SLURM absent).
#
# Env: DECODEBENCH_SLURM_DIR  state, config, logs, pid files and the DB (/tmp/decodebench-slurm)
#      DECODEBENCH_SLURM_DB_PORT   MariaDB port on 127.0.0.1 (3307)
set -euo pipefail

BASE=${DECODEBENCH_SLURM_DIR:-/tmp/decodebench-slurm}
DB_PORT=${DECODEBENCH_SLURM_DB_PORT:-3307}
CLUSTER=localcluster  # the name, ports, paths and DB account of ../shared/slurm/start_slurm.sh: this
                      # script adopts a cluster that one started (and restarts it with this config)
PARTITION=debug
NODE=localhost
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state
DB_DATA=$BASE/mysql DB_RUN=$BASE/mysqlrun
DB_SOCK=$DB_RUN/mysqld.sock
T0=$(date +%s%N)
STARTED=0  # set to 1 when this invocation started a daemon (then the check job runs)

say() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm.sh %3d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() {
  say "ERROR: $*"
  for f in "$LOG"/*.log "$DB_RUN/mysqld.err"; do [ -f "$f" ] && { echo "== tail $f"; tail -n 20 "$f"; }; done
  exit 1
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
retry() {  # retry SECONDS WHAT CMD... : run CMD every 0.25 s until it succeeds
  local tries=$(( $1 * 4 )) what=$2; shift 2
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "timed out waiting for $what"
}
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

install_packages() {
  local binaries=(munged slurmctld slurmd sbatch sacct slurmdbd mariadbd) missing=()
  for b in "${binaries[@]}"; do have "$b" || missing+=("$b"); done
  [ ${#missing[@]} = 0 ] && return 0
  command -v apt-get >/dev/null || { say "SLURM is not installed (${missing[*]} missing) and there is no apt-get"; exit 3; }
  say "installing munge, SLURM and MariaDB with apt-get (missing: ${missing[*]})"
  apt-get update -qq >"$BASE/apt.log" 2>&1 || { tail -n 20 "$BASE/apt.log"; die "apt-get update failed"; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    munge slurmctld slurmd slurm-client slurmdbd mariadb-server >>"$BASE/apt.log" 2>&1 \
    || { tail -n 30 "$BASE/apt.log"; die "apt-get install failed"; }
  say "installed $(slurmctld -V)"
}

write_config() {
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/d" /etc/slurm
  # The node as slurmd sees it (a mismatch drains the node); memory advertised = 3/4 of RAM.
  local topology memory_mb
  topology=$(slurmd -C 2>/dev/null | head -n1 | grep -o 'CPUs=.*ThreadsPerCore=[0-9]*' || true)
  [ -n "$topology" ] || topology="CPUs=$(nproc)"
  memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 3 / 4)}' /proc/meminfo)
  cat >"$ETC/slurm.conf.new" <<EOF
# written by DecodeBench scripts/slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=localhost
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (default 120 s); short for a test cluster
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# one CPU per array task, so both cores of a small machine run cells side by side
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=512
SchedulerType=sched/backfill
# schedule every 2 s: requeued and freshly eligible cells start at once
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# cancelled or timed-out tasks die within seconds
KillWait=5
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 $topology RealMemory=$memory_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  CONFIG_CHANGED=0
  if ! cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf"; then
    mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"; CONFIG_CHANGED=1
  else rm -f "$ETC/slurm.conf.new"; fi
  ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf  # where sbatch, sacct and submitit look
  cat >"$ETC/slurmdbd.conf.new" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf.new"  # slurmdbd refuses a world-readable config
  mv "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf"
  ln -sfn "$ETC/slurmdbd.conf" /etc/slurm/slurmdbd.conf
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown -R munge:munge /etc/munge; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1  # munged refuses to run as root
  touch "$RUN/munged.ours"
  retry 10 munged sh -c 'munge -n | unmunge'
  say "munged started"; STARTED=1
}

start_mariadb() {
  mkdir -p "$DB_RUN"; chown mysql:mysql "$DB_RUN"
  if mariadb-admin --socket="$DB_SOCK" ping >/dev/null 2>&1; then return 0; fi
  if [ ! -d "$DB_DATA/mysql" ]; then
    mkdir -p "$DB_DATA"; chown mysql:mysql "$DB_DATA"
    mariadb-install-db --user=mysql --datadir="$DB_DATA" --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
      || { cat "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
  fi
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DATA" --socket="$DB_SOCK" \
    --pid-file="$DB_RUN/mysqld.pid" --log-error="$DB_RUN/mysqld.err" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
    </dev/null >/dev/null 2>&1 &
  retry 60 mariadb mariadb-admin --socket="$DB_SOCK" ping
  mariadb --socket="$DB_SOCK" -u root <<'EOF'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
  say "mariadb started"; STARTED=1
}

start_slurm_daemons() {
  if ! alive "$RUN/slurmdbd.pid"; then
    slurmdbd </dev/null >/dev/null 2>&1
    retry 60 slurmdbd sacctmgr -n list cluster
    say "slurmdbd started"; STARTED=1
  fi
  if [ "$CONFIG_CHANGED" = 1 ]; then  # some settings (AuthInfo, select plugin) need a restart
    stop_daemon "$RUN/slurmd.pid"; stop_daemon "$RUN/slurmctld.pid"
  fi
  if ! alive "$RUN/slurmctld.pid"; then
    slurmctld </dev/null >/dev/null 2>&1
    retry 30 slurmctld sh -c 'scontrol ping | grep -q "is UP"'
    say "slurmctld started"; STARTED=1
  fi
  if ! alive "$RUN/slurmd.pid"; then
    slurmd -N "$NODE" </dev/null >/dev/null 2>&1
    say "slurmd started"; STARTED=1
  fi
  local state=""
  for _ in $(seq 120); do  # the node must register and become schedulable
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    case "$state" in
      idle|mix|alloc|comp) break ;;
      down*|drain*|drng*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.25
  done
  case "$state" in idle|mix|alloc|comp) ;; *) die "node $NODE is '$state'" ;; esac
}

check() {
  local dir job
  dir=$(mktemp -d "$BASE/check.XXXX")
  job=$(sbatch --parsable --array=0-1 --time=2 --mem=64M --output="$dir/out_%a.txt" \
        --wrap='echo "task $SLURM_ARRAY_TASK_ID on $(hostname)"')
  for _ in $(seq 240); do
    [ "$(sacct -n -X -P -j "$job" -o State 2>/dev/null | grep -c COMPLETED)" = 2 ] && break
    sleep 0.25
  done
  [ "$(sacct -n -X -P -j "$job" -o State | grep -c COMPLETED)" = 2 ] \
    || { sacct -X -j "$job"; die "check job $job: sacct does not show 2 COMPLETED tasks"; }
  [ "$(cat "$dir"/out_*.txt | wc -l)" = 2 ] || die "check job $job wrote no output"
  rm -rf "$dir"
  say "check: array job $job completed and sacct sees it"
}

stop_daemon() {  # stop_daemon PIDFILE: stop that daemon and wait until it is gone
  alive "$1" || return 0
  local pid; pid=$(cat "$1"); kill "$pid"
  for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  say "stopped $(basename "$1" .pid) ($pid)"
}

stop() {  # only what this script started, newest first
  local f
  for f in "$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid" "$DB_RUN/mysqld.pid" \
           $([ -f "$RUN/munged.ours" ] && echo /run/munge/munged.pid); do
    stop_daemon "$f"
  done
  rm -f "$RUN/munged.ours"
}

status() {
  local f
  for f in "$RUN/slurmdbd.pid" "$RUN/slurmctld.pid" "$RUN/slurmd.pid" "$DB_RUN/mysqld.pid" /run/munge/munged.pid; do
    if alive "$f"; then echo "running: $f ($(cat "$f"))"; else echo "stopped: $f"; fi
  done
  timeout 5 sinfo 2>/dev/null || true
}

command=${1:-start}
case "$command" in start|check|stop|status) ;; *) echo "usage: $0 [start|check|status|stop]" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "scripts/slurm.sh: must run as root (it installs and starts system daemons)" >&2; exit 1; }
mkdir -p "$BASE"
case "$command" in
  start)
    install_packages
    write_config
    start_munge
    start_mariadb
    start_slurm_daemons
    if [ "$STARTED" = 1 ]; then check; fi
    say "SLURM is up: partition $PARTITION on $NODE ($(sinfo -h -o '%c CPUs, %m MB' -n "$NODE"))" ;;
  check) check ;;
  status) status ;;
  stop) stop ;;
esac
