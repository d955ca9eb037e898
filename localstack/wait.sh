#!/usr/bin/env bash
# Waits until LocalStack on 127.0.0.1:$KTK_LOCALSTACK_PORT (default 4566) is really usable: init
# stage completed, health lists kinesis/dynamodb/s3/secretsmanager as running/available, and a real DynamoDB
# ListTables and Kinesis ListStreams both answer 200 (health says "available" before DynamoDB
# Local's JVM is up).
# Works for the host-mode LocalStack of up.sh and for the Docker one alike.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: localstack/wait.sh [--pid PID] [TIMEOUT_SECONDS]
  TIMEOUT_SECONDS  default \$KTK_LOCALSTACK_TIMEOUT or 120 (now $LS_TIMEOUT)
  --pid PID        fail at once if this process (the LocalStack runtime) exits while waiting
Env: KTK_LOCALSTACK_PORT (which instance, now $LS_PORT)
EOF
}

timeout="$LS_TIMEOUT"
watch_pid=""
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --pid) watch_pid="${2:?--pid needs a PID}"; shift 2 ;;
    *[!0-9]* | "") usage >&2; die "bad argument: $1" ;;
    *) timeout="$1"; shift ;;
  esac
done
[[ "$timeout" =~ ^[0-9]+$ ]] || die "timeout must be whole seconds, got '$timeout'"

T0="$(now_ms)"
deadline=$(($(now_ms) + timeout * 1000))
last=""  # what the last failed check saw, for the error message

check_alive() {
  if [[ -n "$watch_pid" ]] && ! pid_alive "$watch_pid"; then
    die "LocalStack (pid $watch_pid) exited while starting (after $(elapsed "$T0")); last state: ${last:-none}"
  fi
}

# One AWS JSON-protocol call with a dummy SigV4 header (LocalStack does not check signatures).
# Prints "<http code> <body>"; code 000 if nothing answered.
aws_json_call() {
  local service="$1" target="$2" ctype="$3" out
  out="$(curl -sS --max-time 5 -X POST "$LS_URL/" \
    -H "X-Amz-Target: $target" \
    -H "Content-Type: $ctype" \
    -H "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/$service/aws4_request, SignedHeaders=host, Signature=0" \
    -d '{}' -w '\n%{http_code}' 2>/dev/null)" || true
  printf '%s %s' "${out##*$'\n'}" "${out%$'\n'*}" | tr '\n' ' ' | cut -c1-300
}

ready_and_healthy() {
  local ready health svc
  ready="$(curl -sS --max-time 3 "$LS_URL/_localstack/init/ready" 2>&1)" || { last="init/ready: $ready"; return 1; }
  grep -Eq '"completed": *true' <<<"$ready" || { last="init/ready: $ready"; return 1; }
  health="$(curl -sS --max-time 3 "$LS_URL/_localstack/health" 2>&1)" || { last="health: $health"; return 1; }
  for svc in kinesis dynamodb s3 secretsmanager; do
    grep -Eq "\"$svc\": *\"(running|available)\"" <<<"$health" || { last="health: $svc not running/available: $health"; return 1; }
  done
}

smoke_ok() {
  local r
  r="$(aws_json_call dynamodb DynamoDB_20120810.ListTables application/x-amz-json-1.0)"
  [[ "$r" == "200 "* ]] || { last="DynamoDB ListTables: $r"; return 1; }
  r="$(aws_json_call kinesis Kinesis_20131202.ListStreams application/x-amz-json-1.1)"
  [[ "$r" == "200 "* ]] || { last="Kinesis ListStreams: $r"; return 1; }
}

wait_for() {
  local what="$1" fn="$2"
  until "$fn"; do
    check_alive
    if (($(now_ms) >= deadline)); then
      die "LocalStack at $LS_URL: $what not reached within ${timeout}s; last: ${last:-nothing}"
    fi
    sleep 0.5
  done
  log "$what: ok after $(elapsed "$T0")"
}

log "waiting up to ${timeout}s for LocalStack at $LS_URL"
wait_for "init ready + health (kinesis, dynamodb, s3, secretsmanager)" ready_and_healthy
wait_for "DynamoDB ListTables + Kinesis ListStreams answer 200" smoke_ok
log "LocalStack is ready ($(elapsed "$T0"))"
