#!/usr/bin/env bash
# Load and memory measurement of the `collector` (POST /v1/events) on LocalStack, loopback only.
#
# Builds the release collector, makes a fresh stream (SHARDS shards) on a LocalStack of its own
# (port LOCALSTACK_PORT, started with localstack/up.sh when nothing answers there, and stopped at
# the end only if this script started it: the load swamps LocalStack's Kinesis, which would fail
# the tests of anyone sharing it), starts the collector on a free loopback port and measures, each
# run bounded in time (DURATION seconds of wrk, events.lua: JSON batches of unique valid events):
#   - end to end: batches of ACKED_BATCH events with ?wait=acked (each answer waits for Kinesis);
#   a. valid traffic: batches of 10 and 100 events (BATCHES): requests/s, 200s/s, events accepted
#      per second (the collector's collector_events_accepted counter), p50/p99 latency;
#   b. the same while SLOW_CLIENTS slow connections are held open (load_tools.py hold: half send a
#      head and then a body a byte a second, half a head a byte a second; re-opened when closed);
#   c. the worst request mix (load_tools.py mix) for MIX_SECONDS: MIX_WORKERS connections cycling
#      through the largest valid and invalid bodies, JSON and protobuf, some with ?wait=acked,
#      while HELD_BODIES connections each hold a 1 MiB body but its last byte: peak RSS (VmHWM).
# A sampler records, every second, the CPU time and RSS of the collector and of LocalStack's
# processes, and the collector's counters. Prints the table and writes it to $work/results.txt.
# Stops everything it started on exit.
#
# Environment: DURATION (15), THREADS (2), CONNECTIONS (32), BATCHES ("10 100"; empty: no a or b
# runs), ACKED_BATCH (100; empty: no ?wait=acked runs), SLOW_CLIENTS (500; 0: no b runs),
# MIX_SECONDS (30), MIX_WORKERS (64), HELD_BODIES (256), SHARDS (4), PORT (the collector's; a free
# one), LOCALSTACK_PORT (4568), MAX_OUTSTANDING (1000000, the producer's --max-outstanding-records),
# COLLECTOR_ARGS (more flags for the collector, split on spaces), COLLECTOR_KEY (the one write key
# of the run's keys file, sent as `Authorization: Bearer <key>` with every request; a fresh one
# when unset), KTK_BENCH_WORK
# ($HOME/.cache/ktk/bench-collector-load), CARGO_TARGET_DIR ($HOME/.cache/ktk/target).
set -euo pipefail
began=$SECONDS
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

DURATION="${DURATION:-15}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
BATCHES="${BATCHES-10 100}"
ACKED_BATCH="${ACKED_BATCH-100}"
SLOW_CLIENTS="${SLOW_CLIENTS:-500}"
MIX_SECONDS="${MIX_SECONDS:-30}"
MIX_WORKERS="${MIX_WORKERS:-64}"
HELD_BODIES="${HELD_BODIES:-256}"
SHARDS="${SHARDS:-4}"
LOCALSTACK_PORT="${LOCALSTACK_PORT:-4568}"
MAX_OUTSTANDING="${MAX_OUTSTANDING:-1000000}"
COLLECTOR_ARGS="${COLLECTOR_ARGS:-}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktk/target}"
export AWS_ENDPOINT_URL="http://127.0.0.1:$LOCALSTACK_PORT"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_EC2_METADATA_DISABLED=true
work="${KTK_BENCH_WORK:-$HOME/.cache/ktk/bench-collector-load}"

say() { printf '[bench/collector-load] %s\n' "$*" >&2; }
sudo_if_needed() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

for number in DURATION THREADS CONNECTIONS SLOW_CLIENTS MIX_SECONDS MIX_WORKERS HELD_BODIES SHARDS MAX_OUTSTANDING \
  LOCALSTACK_PORT; do
  [[ "${!number}" =~ ^[0-9]+$ ]] || { say "$number must be a whole number, got '${!number}'"; exit 2; }
done
for n in $BATCHES $ACKED_BATCH; do
  [[ "$n" =~ ^[0-9]+$ ]] || { say "BATCHES and ACKED_BATCH must be whole numbers, got '$n'"; exit 2; }
done

# What it needs: wrk (Debian package), Python >= 3.11 (standard library only), cargo.
if ! command -v wrk >/dev/null; then
  say "installing wrk (Debian package 'wrk')"
  sudo_if_needed apt-get install -y -qq wrk >/dev/null || {
    sudo_if_needed apt-get update -qq && sudo_if_needed apt-get install -y -qq wrk >/dev/null
  }
fi
python=""
for candidate in "$(command -v python3 || true)" "$(command -v python3.12 || true)" "$(command -v python3.11 || true)"; do
  if [[ -x "$candidate" ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    python="$candidate"
    break
  fi
done
[[ -n "$python" ]] || { say "no Python >= 3.11 found"; exit 1; }
command -v cargo >/dev/null || { say "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
tools() { "$python" "$here/load_tools.py" "$@"; }

say "building the collector (release)"
(cd "$root" && cargo build -q --release --locked -p ktk-producer --features collector --bin collector)
collector="$CARGO_TARGET_DIR/release/collector"

mkdir -p "$work"
rm -f "$work"/*.wrk "$work"/*.json "$work"/*.jsonl "$work"/*.ready "$work"/*.log "$work/results.txt"

# Everything started from here on is stopped on exit.
pids=()
collector_pid=""
stream=""
started_localstack=0
# SIGTERM, then (after its 1 s drain and 1 s flush: what it still holds is not sent) SIGKILL.
stop_collector() {
  if [[ -n "$collector_pid" ]] && kill -0 "$collector_pid" 2>/dev/null; then
    kill -TERM "$collector_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$collector_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$collector_pid" 2>/dev/null || true
    wait "$collector_pid" 2>/dev/null || true
  fi
}
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  stop_collector
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ -z "$stream" ]] || tools delete "$stream"
  if ((started_localstack)); then
    KTK_LOCALSTACK_PORT="$LOCALSTACK_PORT" "$root/localstack/down.sh" --if-started >/dev/null 2>&1 || true
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if curl -fsS -m 5 "$AWS_ENDPOINT_URL/_localstack/health" >/dev/null 2>&1; then
  say "LocalStack answers at $AWS_ENDPOINT_URL: using it (and leaving it running)"
else
  say "starting a LocalStack for this run on port $LOCALSTACK_PORT (localstack/up.sh)"
  started_localstack=1
  KTK_LOCALSTACK_PORT="$LOCALSTACK_PORT" "$root/localstack/up.sh" >"$work/localstack-up.log" 2>&1 || {
    tail -n 5 "$work/localstack-up.log" >&2
    exit 1
  }
fi

# Every connection is a file descriptor in the collector and in the clients.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

stream="ktk-bench-collector-$(date +%s)-$$"
say "stream $stream ($SHARDS shards)"
tools create "$stream" --shards "$SHARDS"

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="${PORT:-$(free_port)}"
admin_port="$(free_port)"
export COLLECTOR_URL="http://127.0.0.1:$port"
export COLLECTOR_ADMIN_URL="http://127.0.0.1:$admin_port"
# The write keys: one key for every client of the run, without a rate limit (COLLECTOR_KEY, or a
# fresh one).
if [[ -z "${COLLECTOR_KEY:-}" ]]; then
  COLLECTOR_KEY="wk_bench_$("$python" -c 'import secrets; print(secrets.token_hex(16))')"
fi
export COLLECTOR_KEY
printf '{"keys": [{"app_id": "bench", "key": "%s"}]}\n' "$COLLECTOR_KEY" >"$work/keys.json"
# shellcheck disable=SC2206 # COLLECTOR_ARGS is a list of flags, split on spaces
extra=($COLLECTOR_ARGS)
# A collector (and the sampler that watches it), logging to $work/collector.log.
start_collector() {
  "$collector" --stream "$stream" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    --keys-file "$work/keys.json" --max-outstanding-records "$MAX_OUTSTANDING" \
    --drain-timeout-secs 1 --flush-timeout-secs 1 "${extra[@]}" >>"$work/collector.log" 2>&1 &
  collector_pid=$!
  for _ in $(seq 1 100); do
    curl -fsS -m 1 "$COLLECTOR_URL/health" >/dev/null 2>&1 && break
    kill -0 "$collector_pid" 2>/dev/null || { say "the collector exited:"; tail -n 5 "$work/collector.log" >&2; exit 1; }
    sleep 0.1
  done
  curl -fsS -m 1 "$COLLECTOR_URL/health" >/dev/null || { say "the collector does not answer /health"; exit 1; }
  say "collector pid $collector_pid on $COLLECTOR_URL (open files: $(ulimit -n))"
  "$python" "$here/load_tools.py" sample --collector "$collector_pid" --out "$work/samples.jsonl" &
  pids+=($!)
}
start_collector

metrics() { tools metrics; }
vm() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$collector_pid/status"; }
phase() { # NAME KEY=VALUE... : one line of phases.jsonl (values that read as JSON are kept as JSON)
  "$python" - "$@" >>"$work/phases.jsonl" <<'PY'
import json, sys
row = {"name": sys.argv[1]}
for arg in sys.argv[2:]:
    key, _, value = arg.partition("=")
    try:
        row[key] = json.loads(value)
    except ValueError:
        row[key] = value
print(json.dumps(row))
PY
}
start_holder() {
  rm -f "$work/hold.jsonl.ready"
  "$python" "$here/load_tools.py" hold --connections "$SLOW_CLIENTS" --seconds $((DURATION + 60)) \
    --out "$work/hold.jsonl" &
  holder=$!
  pids+=("$holder")
  for _ in $(seq 1 100); do [[ -e "$work/hold.jsonl.ready" ]] && break; sleep 0.1; done
  say "slow clients open: $(cat "$work/hold.jsonl.ready" 2>/dev/null || echo "fewer than $SLOW_CLIENTS")"
}
stop_holder() {
  kill -TERM "$holder" 2>/dev/null || true
  wait "$holder" 2>/dev/null || true
}

# One wrk run on a new collector (nothing left in its producer from an earlier run; its VmHWM is
# this run's peak RSS), with SLOW_CLIENTS slow connections held open around it when SLOW is 1.
run_wrk() { # NAME EVENTS_PER_REQUEST QUERY SLOW
  local name="$1" events="$2" query="$3" slow="$4" out="$work/$1.wrk" before after start end rss
  local held=()
  stop_collector
  start_collector
  if ((slow)); then
    start_holder
    held=(hold="$work/hold.jsonl")
  fi
  rss="$(vm VmRSS)"
  before="$(metrics)"
  start="$(date +%s.%N)"
  say "$name: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $events events per request $query"
  timeout $((DURATION + 30)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s --latency \
    -s "$here/events.lua" "$COLLECTOR_URL" -- "$events" "$query" >"$out" 2>&1 || say "wrk exited with $?"
  after="$(metrics)"
  end="$(date +%s.%N)"
  if ((slow)); then stop_holder; fi
  phase "$name" pid="$collector_pid" start="$start" end="$end" wrk="$out" metrics_before="$before" metrics_after="$after" \
    rss_before_kb="$rss" vmhwm_kb="$(vm VmHWM)" "${held[@]}"
}

slow_runs=0
if [[ "$SLOW_CLIENTS" -gt 0 ]]; then slow_runs=1; fi
# With ?wait=acked every answer waits for Kinesis: end to end, bounded by LocalStack. First, while
# LocalStack's Kinesis has no backlog.
if [[ -n "$ACKED_BATCH" ]]; then
  run_wrk "a-acked-$ACKED_BATCH" "$ACKED_BATCH" "?wait=acked" 0
  if ((slow_runs)); then run_wrk "b-acked-$ACKED_BATCH+$SLOW_CLIENTS-slow" "$ACKED_BATCH" "?wait=acked" 1; fi
fi
# a. valid traffic alone; b. the same with slow clients held open.
for n in $BATCHES; do run_wrk "a-valid-$n" "$n" "" 0; done
if ((slow_runs)); then
  for n in $BATCHES; do run_wrk "b-valid-$n+$SLOW_CLIENTS-slow" "$n" "" 1; done
fi

# c. the worst mix, for peak RSS, on a new collector too.
if [[ "$MIX_SECONDS" -gt 0 ]]; then
  stop_collector
  start_collector
  rss="$(vm VmRSS)"
  start="$(date +%s.%N)"
  say "c-worst-mix: $MIX_WORKERS connections cycling through the mix, $HELD_BODIES holding 1 MiB bodies, ${MIX_SECONDS}s"
  timeout $((MIX_SECONDS + 60)) "$python" "$here/load_tools.py" mix --workers "$MIX_WORKERS" --held "$HELD_BODIES" \
    --seconds "$MIX_SECONDS" --out "$work/mix.json" || say "the mix exited with $?"
  phase "c-worst-mix" pid="$collector_pid" start="$start" end="$(date +%s.%N)" mix="$work/mix.json" \
    rss_before_kb="$rss" vmhwm_kb="$(vm VmHWM)"
fi

say "stopping the collector"
stop_collector
echo
echo "collector on LocalStack ($SHARDS shards), $(nproc) CPUs shared by the collector, LocalStack and the clients;" \
  "wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s; max outstanding records $MAX_OUTSTANDING${COLLECTOR_ARGS:+; args: $COLLECTOR_ARGS}"
tools report "$work"
echo "(details: $work; $((SECONDS - began)) s in all)"
