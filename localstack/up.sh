#!/usr/bin/env bash
# Makes sure LocalStack answers on 127.0.0.1:$KTK_LOCALSTACK_PORT (default 4566) with kinesis,
# dynamodb, s3 and secretsmanager usable. Reuses a healthy LocalStack that already runs on that
# port (host mode or Docker; one that lacks a service is restarted when up.sh started it);
# otherwise starts the host-mode one (no Docker) in the background, installing it first if
# needed, and waits until it is ready. Records the PID in $KTK_CACHE/localstack.pid, and in
# $KTK_CACHE/localstack.started-by-up only if this very call started it (down.sh --if-started reads
# that); on another port those files (and log, lock, FILESYSTEM_ROOT) are suffixed -PORT.
# The caller's environment reaches LocalStack, so LocalStack settings pass through, e.g.
#   KTK_LOCALSTACK_PORT=4567 KINESIS_ERROR_PROBABILITY=0.3 localstack/up.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: localstack/up.sh
Env: KTK_CACHE (now $KTK_CACHE), KTK_LOCALSTACK_TIMEOUT (seconds to wait for readiness, now $LS_TIMEOUT),
     KTK_LOCALSTACK_PORT (which instance, now $LS_PORT); LocalStack settings such as
     KINESIS_ERROR_PROBABILITY pass through to a LocalStack this call starts
EOF
}
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "") ;;
  *) usage >&2; die "unknown argument: $1" ;;
esac
[[ "$LS_TIMEOUT" =~ ^[0-9]+$ ]] || die "KTK_LOCALSTACK_TIMEOUT must be whole seconds, got '$LS_TIMEOUT'"

T0="$(now_ms)"
mkdir -p "$KTK_CACHE"
# One up.sh at a time (fd 9 is closed for LocalStack itself, so it never holds the lock).
exec 9>"$LS_LOCK"
flock -w $((LS_TIMEOUT + 120)) 9 || die "another up.sh holds $LS_LOCK; giving up"

# KINESIS_ERROR_PROBABILITY as asked for by the caller, and as shown in messages.
asked_kep="${KINESIS_ERROR_PROBABILITY:-}"
show_kep() { printf 'KINESIS_ERROR_PROBABILITY=%s' "${1:-unset (0)}"; }

# A reused LocalStack keeps the settings it was started with: say which, and warn on a mismatch.
report_reused_settings() {
  local pid="$1" running
  if is_localstack_pid "$pid"; then
    running="$(env_of_pid "$pid" KINESIS_ERROR_PROBABILITY)"
    log "it runs with $(show_kep "$running")"
    if [[ "$running" != "$asked_kep" ]]; then
      warn "$(show_kep "$asked_kep") was asked for, but the running LocalStack has $(show_kep "$running");" \
        "restart it (${LS_CALL_PREFIX}localstack/down.sh, then up.sh) for the new value"
    fi
  elif [[ -n "$asked_kep" ]]; then
    warn "$(show_kep "$asked_kep") was asked for, but the LocalStack at $LS_URL was not started by up.sh:" \
      "its setting is unknown"
  fi
}

# --- reuse what runs -----------------------------------------------------------------------------
pid="$(ls_recorded_pid)"
if ls_health_ok; then
  if is_localstack_pid "$pid"; then
    log "reusing LocalStack already running at $LS_URL (pid $pid, started earlier by up.sh)"
  else
    log "reusing LocalStack already running at $LS_URL (not started by these scripts, e.g. Docker)"
  fi
  report_reused_settings "$pid"
  rm -f "$LS_STARTED" # this call did not start it: down.sh --if-started must leave it alone
  if is_localstack_pid "$pid"; then
    # Ours: a wedged one (kinesis-mock slows as its streams grow) is restarted, not a failure.
    if "$LS_DIR/wait.sh" 30; then
      exit 0
    fi
    log "LocalStack pid $pid (from an earlier up.sh) is healthy but its services do not answer: restarting it"
    "$LS_DIR/down.sh"
  else
    "$LS_DIR/wait.sh" "$LS_TIMEOUT" || die "the running LocalStack at $LS_URL is not usable"
    exit 0
  fi
elif is_localstack_pid "$pid"; then
  log "LocalStack pid $pid (from an earlier up.sh) runs but is not healthy yet; giving it 20 s"
  if "$LS_DIR/wait.sh" --pid "$pid" 20; then
    report_reused_settings "$pid"
    rm -f "$LS_STARTED"
    exit 0
  fi
  log "LocalStack pid $pid is still not healthy: restarting it"
  "$LS_DIR/down.sh"
elif ls_port_answers; then
  log "something answers on $LS_URL but is not a healthy LocalStack yet; waiting for it"
  "$LS_DIR/wait.sh" "$LS_TIMEOUT" ||
    die "port $LS_PORT is taken by something that is not a working LocalStack; free it and retry"
  rm -f "$LS_STARTED"
  exit 0
fi

# --- start our own -------------------------------------------------------------------------------
if ! ls_install_complete; then
  log "LocalStack is not (fully) installed under $KTK_CACHE: running install.sh"
  "$LS_DIR/install.sh"
fi
# An instance on another port gets a FILESYSTEM_ROOT of its own (LocalStack clears its tmp dir at
# start), whose package dir is a symlink to the installed one: nothing is installed twice.
if [[ "$LS_INSTANCE_LIB" != "$LS_LIB" ]]; then
  mkdir -p "$(dirname "$LS_INSTANCE_LIB")"
  if [[ -L "$LS_INSTANCE_LIB" && "$(readlink "$LS_INSTANCE_LIB")" != "$LS_LIB" ]]; then
    rm -f "$LS_INSTANCE_LIB"
  elif [[ -e "$LS_INSTANCE_LIB" && ! -L "$LS_INSTANCE_LIB" ]]; then
    die "$LS_INSTANCE_LIB should be a symlink to $LS_LIB (the installed packages); remove it and retry"
  fi
  [[ -L "$LS_INSTANCE_LIB" ]] || ln -s "$LS_LIB" "$LS_INSTANCE_LIB"
fi
rm -f "$LS_PIDFILE" "$LS_STARTED"
[[ -f "$LS_LOG" ]] && mv -f "$LS_LOG" "$LS_LOG.prev"

# Runs in a subshell that execs setsid, which execs python: $! is LocalStack's PID, and as the
# leader of its own session/process group, its PGID equals that PID (down.sh signals the group).
(
  cd "$KTK_CACHE"
  exec setsid env \
    OVERRIDE_IN_DOCKER=0 \
    FILESYSTEM_ROOT="$LS_INSTANCE_FS" \
    GATEWAY_LISTEN="$LS_HOST:$LS_PORT" \
    GATEWAY_SERVER=hypercorn \
    SERVICES=kinesis,dynamodb,s3,cloudwatch,sts,iam,cloudformation,secretsmanager \
    EAGER_SERVICE_LOADING=1 \
    KINESIS_LATENCY=0 \
    KINESIS_PERSISTENCE=0 \
    DYNAMODB_IN_MEMORY=1 \
    DNS_ADDRESS=0 \
    SKIP_SSL_CERT_DOWNLOAD=1 \
    DISABLE_EVENTS=1 \
    LOCALSTACK_TELEMETRY_DISABLED=1 \
    XDG_CACHE_HOME="$LS_INSTANCE_FS/xdg-cache" \
    "$LS_VENV/bin/python" -m localstack.runtime.main
) </dev/null >"$LS_LOG" 2>&1 8>&- 9>&- &
pid=$!
disown "$pid" # not a job of this shell: no "Killed" notices, no SIGHUP from it
echo "$pid" >"$LS_PIDFILE"
echo "$pid" >"$LS_STARTED"
for _ in {1..20}; do is_localstack_pid "$pid" && break; sleep 0.1; done # until setsid has exec'd python
pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ' || true)"
if [[ -n "$pgid" && "$pgid" != "$pid" ]]; then
  warn "LocalStack pid $pid is in process group $pgid, not its own; down.sh will stop it by PID and children"
fi
log "started LocalStack $LS_CORE_VERSION on $LS_URL with $(show_kep "$asked_kep") (pid $pid, log $LS_LOG)"

if ! "$LS_DIR/wait.sh" --pid "$pid" "$LS_TIMEOUT"; then
  printf '%s\n' "----- last 40 lines of $LS_LOG -----" >&2
  tail -n 40 "$LS_LOG" >&2 || true
  printf '%s\n' "-----" >&2
  "$LS_DIR/down.sh" || true
  die "LocalStack did not become ready within ${LS_TIMEOUT}s; stopped it (full log: $LS_LOG)"
fi
log "LocalStack is up at $LS_URL in $(elapsed "$T0") (pid $pid, $(show_kep "$asked_kep");" \
  "stop with ${LS_CALL_PREFIX}localstack/down.sh)"
