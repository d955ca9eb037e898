#!/usr/bin/env bash
# The consumer's read-ahead benchmark on LocalStack, loopback only: one worker drains a backlog of
# RECORDS user records (RECORD_BYTES bytes, AGGREGATE to a Kinesis record) from a SHARDS-shard
# stream through a processor that takes BATCH_MS per batch and checkpoints after each, with
# read-ahead off and on, RUNS times each, next to the polling reader alone (no processor). Builds
# the `drain` example in release mode and runs it (consumer/examples/drain.rs says what it
# measures); extra arguments go to it.
#
# Expects LocalStack at AWS_ENDPOINT_URL (default http://127.0.0.1:4566; localstack/up.sh starts
# one). Environment: RECORDS (100000), SHARDS (4), RECORD_BYTES (100), AGGREGATE (10), BATCH_MS
# (20), MAX_RECORDS (250 Kinesis records per GetRecords), RUNS (3), MODES (read,off,on), STREAM
# (a stream to reuse, made and filled by the first run that names it, and kept; default a fresh one,
# deleted at the end), CARGO_TARGET_DIR ($HOME/.cache/ktk/target).
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
args=(--records "${RECORDS:-100000}" --shards "${SHARDS:-4}" --record-bytes "${RECORD_BYTES:-100}"
  --aggregate "${AGGREGATE:-10}" --batch-ms "${BATCH_MS:-20}" --max-records "${MAX_RECORDS:-250}"
  --runs "${RUNS:-3}" --modes "${MODES:-read,off,on}")
if [[ -n "${STREAM:-}" ]]; then
  args+=(--stream "$STREAM")
fi
exec "$CARGO_TARGET_DIR/release/examples/drain" "${args[@]}" "$@"
