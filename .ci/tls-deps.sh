# Sourced by .ci/run: the programs tests/tls.rs needs, installed if missing.
#   openssl  makes the test CA and certificates
#   stunnel  puts TLS in front of RabbitMQ for amqps://
# redis-server (installed by .ci/run) must be built with TLS, as Debian's is.
# Written to be sourced under `set -euo pipefail`, after redis-server is installed.
tls_dep() {
  # $1: command, $2: Debian package
  if ! command -v "$1" >/dev/null 2>&1; then
    printf '\n== installing %s (for the TLS tests)\n' "$2"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"
  fi
}
tls_dep openssl openssl
tls_dep stunnel stunnel4
if command -v redis-server >/dev/null 2>&1 \
  && ! ldd "$(command -v redis-server)" 2>/dev/null | grep -q libssl; then
  echo "warning: redis-server does not link libssl: the TLS tests need one built with TLS (Debian's is)" >&2
fi
