# shellcheck shell=bash
# Sourced by scripts/test and scripts/demo (under `set -euo pipefail`, from
# the repository's root): install what is missing, start Redis and RabbitMQ
# on loopback when they do not answer, and stop at exit what was started
# here, however the script exits. Services that were already running are
# used and left alone.
#
#   need PROGRAM PACKAGE        note PROGRAM as needed (Debian package PACKAGE)
#   need_file FILE PACKAGE      the same for a file (php-amqplib's examples)
#   install_needed              install the noted packages (apt-get on
#                               Debian/Ubuntu), or say what to install elsewhere
#   start_services              Redis at 127.0.0.1:6379 and RabbitMQ at
#                               127.0.0.1:5672, unless REDIS_URL / AMQP_URL
#                               point elsewhere
#
# Only a Redis started here (its pid, checked to still be that redis-server)
# and a RabbitMQ node started here (rabbitmqctl shutdown, then `epmd -kill`
# when no Erlang port mapper ran before it) are ever stopped.

SCRIPT="${0##*/}"
say() { printf '%s: %s\n' "$SCRIPT" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$SCRIPT" "$1" >&2
  shift
  local line
  for line in "$@"; do printf '%s\n' "$line" | sed 's/^/  /' >&2; done
  exit 1
}

# Valkey (ensure_valkey) lives in the venv where the tests look for it.
DIR="${AMQP_IDEMPOTENCY_SERVERS_DIR:-/tmp/amqp-idempotency-servers}"
RERUN="scripts/$SCRIPT"
# shellcheck source=scripts/lib/valkey.sh
source "$(dirname "${BASH_SOURCE[0]}")/valkey.sh"

# ---------------------------------------------------------------------------
# Packages

NEEDED=()

need() {
  # $1: program, $2: the Debian/Ubuntu package that provides it.
  command -v "$1" >/dev/null 2>&1 || NEEDED+=("$2")
}

need_file() {
  # $1: file, $2: the Debian/Ubuntu package that provides it.
  [ -e "$1" ] || NEEDED+=("$2")
}

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "$* needs root, and sudo is not installed" "run $RERUN as root"
  fi
}

debian_like() {
  command -v apt-get >/dev/null 2>&1 && [ -r /etc/os-release ] || return 1
  local id id_like
  id="$(. /etc/os-release && echo "${ID:-}")"
  id_like="$(. /etc/os-release && echo "${ID_LIKE:-}")"
  case " $id $id_like " in
    *" debian "* | *" ubuntu "*) return 0 ;;
    *) return 1 ;;
  esac
}

install_needed() {
  command -v cargo >/dev/null 2>&1 ||
    die "cargo is not on PATH" "install Rust (https://rustup.rs), then rerun: $RERUN"
  [ ${#NEEDED[@]} -gt 0 ] || return 0
  if ! debian_like; then
    die "missing: ${NEEDED[*]} (names of the Debian packages)" \
      "this script installs them with apt-get on Debian and Ubuntu only. Elsewhere install:" \
      "  Redis 7 or newer (redis-server and redis-cli), RabbitMQ 3.x (rabbitmq-server, rabbitmqctl)," \
      "  and for the tests also: PHP's CLI with php-amqplib (its examples/amqp_publisher.php" \
      "  under /usr/share/doc/php-amqplib/), openssl, stunnel, and Python 3.11 with venv" \
      "then rerun: $RERUN (Redis and RabbitMQ that already run are used as they are)"
  fi
  say "installing ${NEEDED[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
    die "apt-get update failed (see above)" "fix it, or install ${NEEDED[*]} by hand, then rerun: $RERUN"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${NEEDED[@]}" >&2 ||
    die "apt-get install ${NEEDED[*]} failed (see above)" "fix it, or install them by hand, then rerun: $RERUN"
  NEEDED=()
}

# ---------------------------------------------------------------------------
# Services

STARTED_REDIS_PID=""
STARTED_REDIS_DIR=""
STARTED_RABBIT=""
STARTED_EPMD=""

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
epmd_up() { (exec 3<>/dev/tcp/127.0.0.1/4369) 2>/dev/null; }

stop_started() {
  # The EXIT trap: stop what start_services started, newest first.
  local status=$? _
  trap - EXIT
  if [ -n "$STARTED_RABBIT" ]; then
    say "stopping the RabbitMQ started here"
    as_root rabbitmqctl -q shutdown >/dev/null 2>&1 || say "rabbitmqctl shutdown failed"
    STARTED_RABBIT=""
    # The Erlang port mapper that node started (none ran before), if it still runs.
    if [ -n "$STARTED_EPMD" ]; then
      epmd -kill >/dev/null 2>&1 || true
      STARTED_EPMD=""
    fi
  fi
  if [ -n "$STARTED_REDIS_PID" ]; then
    if [[ "$(readlink "/proc/$STARTED_REDIS_PID/exe" 2>/dev/null)" == *redis* ]]; then
      say "stopping the Redis started here (pid $STARTED_REDIS_PID)"
      kill -TERM "$STARTED_REDIS_PID" 2>/dev/null || true
      for _ in $(seq 1 100); do
        [ -e "/proc/$STARTED_REDIS_PID" ] || break
        sleep 0.1
      done
    fi
    STARTED_REDIS_PID=""
    rm -rf "$STARTED_REDIS_DIR"
  fi
  exit "$status"
}

start_services() {
  trap stop_started EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local _
  if [ -n "${REDIS_URL:-}" ]; then
    say "REDIS_URL is set: using $REDIS_URL as it is"
  elif redis_up; then
    say "Redis answers on 127.0.0.1:6379: using it"
  else
    STARTED_REDIS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/amqp-idempotency-redis.XXXXXX")"
    say "starting redis-server on 127.0.0.1:6379 (no persistence, files in $STARTED_REDIS_DIR)"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir "$STARTED_REDIS_DIR" --logfile "$STARTED_REDIS_DIR/redis.log" \
      --pidfile "$STARTED_REDIS_DIR/redis.pid" </dev/null >/dev/null
    for _ in $(seq 1 100); do
      [ -s "$STARTED_REDIS_DIR/redis.pid" ] && redis_up && break
      sleep 0.1
    done
    STARTED_REDIS_PID="$(cat "$STARTED_REDIS_DIR/redis.pid" 2>/dev/null || true)"
    redis_up || die "redis-server did not answer on 127.0.0.1:6379 within 10s" \
      "$(tail -n 5 "$STARTED_REDIS_DIR/redis.log" 2>/dev/null)"
  fi
  if [ -n "${AMQP_URL:-}" ]; then
    say "AMQP_URL is set: using it as it is"
  elif rabbit_up; then
    say "RabbitMQ answers on 127.0.0.1:5672: using it"
  else
    say "starting rabbitmq-server (rabbitmq-server -detached)"
    epmd_up || STARTED_EPMD=1
    as_root rabbitmq-server -detached >/dev/null
    STARTED_RABBIT=1
    for _ in $(seq 1 120); do
      rabbit_up && break
      sleep 1
    done
    rabbit_up || die "RabbitMQ did not answer on 127.0.0.1:5672 within 120s" \
      "its logs are under /var/log/rabbitmq/"
    # The port opens before the broker accepts logins.
    as_root timeout 120 rabbitmq-diagnostics -q check_running >/dev/null 2>&1 ||
      die "RabbitMQ answers on 127.0.0.1:5672 but is not running (rabbitmq-diagnostics check_running)" \
        "its logs are under /var/log/rabbitmq/"
  fi
}
