#!/usr/bin/env bash
# Stops the host-mode LocalStack that up.sh started, by its recorded PID (never by process name):
# SIGTERM to its process group, up to 15 s grace, then SIGKILL to the group and to any remaining
# descendants (DynamoDB Local's java, kinesis-mock's node). No error if nothing runs.
# Only the instance of $KTK_LOCALSTACK_PORT (default 4566): its own pid file and started-by-up marker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: localstack/down.sh [--if-started]
  --if-started  stop only if the most recent up.sh call started LocalStack (for CI: leaves alone an
                instance that up.sh merely reused)
Env: KTK_LOCALSTACK_PORT (which instance, now $LS_PORT), KTK_CACHE (now $KTK_CACHE)
EOF
}
if_started=0
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --if-started) if_started=1 ;;
  "") ;;
  *) usage >&2; die "unknown argument: $1" ;;
esac
GRACE_S=15

T0="$(now_ms)"
pid="$(ls_recorded_pid)"
if [[ -z "$pid" ]]; then
  log "no $LS_PIDFILE: no LocalStack started by up.sh, nothing to stop"
  rm -f "$LS_STARTED"
  exit 0
fi
if ((if_started)); then
  started=""
  [[ -f "$LS_STARTED" ]] && started="$(tr -dc '0-9' <"$LS_STARTED")"
  if [[ "$started" != "$pid" ]]; then
    log "LocalStack (pid $pid) was not started by the last up.sh: leaving it running (--if-started)"
    exit 0
  fi
fi

# "<state> <starttime>" of a PID from /proc/PID/stat (fields 3 and 22), empty if gone.
proc_stat() {
  local s
  s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  s="${s##*) }" # drop "pid (comm) ", comm may contain spaces
  # shellcheck disable=SC2086
  set -- $s
  printf '%s %s' "$1" "${20}"
}

declare -A start_of=() # pid -> start time when first seen (guards against PID reuse)
remember() {
  local p st
  for p in "$@"; do
    [[ -n "${start_of[$p]:-}" ]] && continue
    st="$(proc_stat "$p")"
    [[ -n "$st" ]] && start_of[$p]="${st#* }"
  done
  return 0
}
# Same process as remembered, and not a zombie?
still_running() {
  local st
  st="$(proc_stat "$1")"
  [[ -n "$st" && "${st%% *}" != Z && "${st#* }" == "${start_of[$1]}" ]]
}
# Add the current descendants of the remembered, still running processes.
refresh() {
  local p
  for p in "${!start_of[@]}"; do
    # shellcheck disable=SC2046
    still_running "$p" && remember $(descendants "$p")
  done
  return 0
}
# Remembered processes still running, one per line.
alive_list() {
  local p
  for p in "${!start_of[@]}"; do
    still_running "$p" && printf '%s\n' "$p"
  done
  return 0
}
# Members of process group $pid that are ours (their command line mentions $KTK_CACHE), for the
# case where the leader is already gone but its children (java, node) linger.
our_group_members() {
  local p
  for p in $(pgrep -g "$pid" 2>/dev/null || true); do
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF "$KTK_CACHE" && printf '%s\n' "$p"
  done
  return 0
}

group_signal=0
if is_localstack_pid "$pid"; then
  pgid="$(ps -o pgid= -p "$pid" | tr -d ' ')"
  [[ "$pgid" == "$pid" ]] && group_signal=1
  # shellcheck disable=SC2046
  remember "$pid" $(descendants "$pid")
  # shellcheck disable=SC2046
  ((group_signal)) && remember $(pgrep -g "$pid" 2>/dev/null || true)
else
  # Leader gone (or PID reused by something else: then leave that alone), maybe orphans remain.
  # shellcheck disable=SC2046
  remember $(our_group_members)
  if ((${#start_of[@]} == 0)); then
    log "LocalStack pid $pid is not running (stale pid file): cleaned up"
    rm -f "$LS_PIDFILE" "$LS_STARTED"
    exit 0
  fi
fi

log "stopping LocalStack on port $LS_PORT (pid $pid, ${#start_of[@]} processes): SIGTERM, up to ${GRACE_S} s grace"
if ((group_signal)); then
  kill -TERM -- "-$pid" 2>/dev/null || true
else
  for p in $(alive_list); do kill -TERM "$p" 2>/dev/null || true; done
fi

deadline=$(($(now_ms) + GRACE_S * 1000))
while refresh && [[ -n "$(alive_list)" ]] && (($(now_ms) < deadline)); do
  sleep 0.25
done

refresh
left="$(alive_list)"
if [[ -n "$left" ]]; then
  log "still running after ${GRACE_S} s: $(echo "$left" | tr '\n' ' ')- sending SIGKILL"
  if ((group_signal)) && [[ -n "$(our_group_members)" ]]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
  for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
  deadline=$(($(now_ms) + 5000))
  while [[ -n "$(alive_list)" ]] && (($(now_ms) < deadline)); do sleep 0.1; done
fi

left="$(alive_list)"
if [[ -n "$left" ]]; then
  die "could not stop processes: $(echo "$left" | tr '\n' ' ')(pid file kept: $LS_PIDFILE)"
fi
rm -f "$LS_PIDFILE" "$LS_STARTED"
log "LocalStack stopped in $(elapsed "$T0")"
