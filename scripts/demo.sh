#!/usr/bin/env bash
# The README's main job: the whole system on this machine, checked end to end.
#
# On a fresh machine with nothing but Rust installed it brings up what the demo needs: LocalStack
# (host mode, no Docker: localstack/up.sh installs it the first time) and PostgreSQL
# (localstack/databases.sh). It builds ktk, collector and consumer (release), then runs
# `ktk demo`: a Kinesis stream, the collector, two consumer processes, S3 and PostgreSQL, with
# simulated streaming-app traffic, live progress, the real-time dashboard (its URL printed while
# the demo runs) and a closing report (exit status 1 if any accepted event was lost or S3 and the
# store disagree). The report and a headless-Chromium screenshot of the dashboard are saved in
# demo-output/ ($KTK_DEMO_OUT). Node.js and npm build the dashboard's page bundle
# (dashboard/web/scripts/setup.sh, which also installs Debian's chromium when it is missing).
# LocalStack is stopped at the end only if this script started it.
#
# Usage: scripts/demo.sh [KTK DEMO OPTIONS]     e.g. --duration 30s --rate 1000 --shards 8 --keep
#                                               (all options: ktk demo --help)
#        scripts/demo.sh agg [USER_RECORDS_JSONL]
#            the KPL aggregation round trip alone, no services: `ktk agg encode` packs a sample of
#            events into KPL aggregates, `ktk agg decode` unpacks them, and the result is checked
#            (default input: examples/user-records.jsonl)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktk/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n==> %s\n' "$*"; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

if [[ "${1:-}" == agg ]]; then
  input="${2:-$root/examples/user-records.jsonl}"
  [[ -r "$input" ]] || { echo "cannot read $input" >&2; exit 1; }
  step "building ktk (release)"
  cargo build --release --locked -p ktk-cli --bin ktk --manifest-path "$root/Cargo.toml"
  ktk="$CARGO_TARGET_DIR/release/ktk"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  step "ktk agg encode < $input"
  "$ktk" agg encode <"$input" >"$work/kinesis.jsonl"
  step "ktk agg decode"
  "$ktk" agg decode <"$work/kinesis.jsonl" >"$work/decoded.jsonl"
  python3 - "$input" "$work/kinesis.jsonl" "$work/decoded.jsonl" <<'PY'
import base64, json, sys
users = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
kinesis = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
decoded = [json.loads(l) for l in open(sys.argv[3]) if l.strip()]
user_bytes = sum(len(base64.b64decode(u["data"])) + len(u["partition_key"]) for u in users)
kin_bytes = sum(len(base64.b64decode(k["data"])) + len(k["partition_key"]) for k in kinesis)
print(f"user records in:        {len(users)} ({user_bytes} bytes with keys)")
print(f"Kinesis records out:    {len(kinesis)} ({kin_bytes} bytes with keys)")
for k in kinesis:
    size = len(base64.b64decode(k["data"]))
    print(f"  partition key {k['partition_key']!r:>10}  hash key {k.get('explicit_hash_key', '-'):>39}  {k['user_records']:>4} user records  {size:>6} bytes")
print(f"PutRecords entries saved: {len(users) - len(kinesis)} of {len(users)} "
      f"(a shard takes 1,000 records/s: {len(users) / max(len(kinesis), 1):.0f}x the event rate per shard)")
same = len(decoded) == len(users) and all(
    d["partition_key"] == u["partition_key"] and d["data"] == u["data"] for d, u in zip(decoded, users))
print(f"user records decoded:   {len(decoded)}; identical to the input, in order: {'yes' if same else 'NO'}")
sys.exit(0 if same else 1)
PY
  exit
fi

# Building first: if it fails, nothing was started.
step "the dashboard's page bundle and Chromium (for its screenshot)"
"$root/dashboard/web/scripts/setup.sh" --browser

step "building ktk, collector and consumer (release)"
cargo build --release --locked --manifest-path "$root/Cargo.toml" \
  -p ktk-cli --bin ktk -p ktk-producer --bin collector -p ktk-ecs --bin consumer

step "services: LocalStack, PostgreSQL"
"$root/localstack/up.sh"
trap '"$root/localstack/down.sh" --if-started' EXIT
"$root/localstack/databases.sh"

# ktk demo and the processes it starts reach AWS through the standard configuration chain.
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:4566}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_EC2_METADATA_DISABLED=true
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

step "ktk demo $*"
"$CARGO_TARGET_DIR/release/ktk" demo --out-dir "${KTK_DEMO_OUT:-$root/demo-output}" "$@"
