#!/usr/bin/env bash
# The consumer's read-ahead benchmark on LocalStack, loopback only: one worker drains a backlog of
# RECORDS plain records (RECORD_BYTES bytes) from a SHARDS-shard stream through a processor that
# takes BATCH_MS per batch and checkpoints after each, with read-ahead off and on, RUNS times each,
# next to the polling reader alone (no processor). Builds the `drain` example in release mode and
# runs it (consumer/examples/drain.rs says what it measures); extra arguments go to it.
#
# Expects LocalStack at AWS_ENDPOINT_URL (default http://127.0.0.1:4566; localstack/up.sh starts
# one). Environment: RECORDS (100000), SHARDS (4), RECORD_BYTES (100), BATCH_MS (20), MAX_RECORDS
# (10000, records per GetRecords), RUNS (2), MODES (read,off,on), CARGO_TARGET_DIR
# ($HOME/.cache/ktk/target).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktk/target}"
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:4566}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"

cd "$root"
cargo build --release --locked -p ktk-consumer --example drain
exec "$CARGO_TARGET_DIR/release/examples/drain" \
  --records "${RECORDS:-100000}" --shards "${SHARDS:-4}" --record-bytes "${RECORD_BYTES:-100}" \
  --batch-ms "${BATCH_MS:-20}" --max-records "${MAX_RECORDS:-10000}" --runs "${RUNS:-2}" \
  --modes "${MODES:-read,off,on}" "$@"
