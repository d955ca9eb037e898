#!/usr/bin/env bash
# The daily ETL over a day of 1,000,000 events in S3 (LocalStack), one run per shipped job.
#
# Builds `ktk` and the seeding example in release mode, makes a fresh bucket on LocalStack
# (localstack/up.sh starts it when nothing answers), writes EVENTS synthetic events of one day
# with the S3 sink's own writer (etl/examples/seed_day.rs: Parquet objects per batch of BATCH
# events and hour), then times `ktk etl run --force` of each job under /usr/bin/time: wall time,
# CPU time (user + system) and peak RSS. Events per second per core is EVENTS divided by the
# run's CPU seconds (all of its threads: fetching, decoding, SQLite, Parquet). Prints a table and
# writes it to $KTK_BENCH_WORK/results.md. LocalStack is stopped at the end only if this script
# started it.
#
# Environment: EVENTS (1000000), BATCH (50000), DAY (2026-03-01), CACHE_MIB (16, the engine's
# page cache), KTK_BENCH_WORK ($HOME/.cache/ktk/bench-etl), CARGO_TARGET_DIR ($HOME/.cache/ktk/target).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
EVENTS="${EVENTS:-1000000}"
BATCH="${BATCH:-50000}"
DAY="${DAY:-2026-03-01}"
CACHE_MIB="${CACHE_MIB:-16}"
work="${KTK_BENCH_WORK:-$HOME/.cache/ktk/bench-etl}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktk/target}"
mkdir -p "$work"

export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:4566}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"

"$root/localstack/up.sh"
trap '"$root/localstack/down.sh" --if-started' EXIT

echo "==> building ktk and seed_day (release)"
cargo build --release --locked -p ktk-cli --bin ktk -p ktk-etl --example seed_day
ktk="$CARGO_TARGET_DIR/release/ktk"
seed="$CARGO_TARGET_DIR/release/examples/seed_day"

bucket="ktk-bench-etl-$(date +%s)-$$"
echo "==> bucket $bucket"
curl -fsS -X PUT "$AWS_ENDPOINT_URL/$bucket" >/dev/null
started=$SECONDS
"$seed" "$bucket" raw "$DAY" "$EVENTS" "$BATCH" | tee "$work/seed.txt"
echo "seeded in $((SECONDS - started)) s"

cores=$(nproc)
{
  echo "| job | wall s | CPU s | events/s | events/s per core (CPU s) | peak RSS MiB | rows |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
} >"$work/results.md"
for job in plays_per_title daily_active_users ad_completion user_segments; do
  log="$work/$job.time"
  /usr/bin/time -v "$ktk" etl run --force --json --job "$job" --date "$DAY" --bucket "$bucket" --prefix raw \
    --path-style true --cache-mib "$CACHE_MIB" >"$work/$job.json" 2>"$log"
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log" | awk -F: '{ if (NF == 3) print $1*3600 + $2*60 + $3; else print $1*60 + $2 }')
  user=$(awk -F': ' '/User time/ {print $2}' "$log")
  sys=$(awk -F': ' '/System time/ {print $2}' "$log")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
  rows=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifest"]["rows"])' "$work/$job.json")
  python3 - "$job" "$wall" "$user" "$sys" "$rss" "$rows" "$EVENTS" >>"$work/results.md" <<'PY'
import sys
job, wall, user, sys_, rss, rows, events = sys.argv[1:]
wall, cpu, events = float(wall), float(user) + float(sys_), int(events)
print(f"| {job} | {wall:.1f} | {cpu:.1f} | {events / wall:,.0f} | {events / cpu:,.0f} | {int(rss) / 1024:.0f} | {rows} |")
PY
done
echo
echo "EVENTS=$EVENTS BATCH=$BATCH, $(grep -o '[0-9]* objects, [0-9]* bytes' "$work/seed.txt"), $cores cores, LocalStack on the same machine"
cat "$work/results.md"
