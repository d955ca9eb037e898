#!/usr/bin/env bash
# The README's main job. Until the end-to-end demo (collector -> Kinesis -> consumers -> S3 and the
# real-time store) exists, it shows the foundation at work: `ktk agg` packs a sample of streaming-app
# events into KPL aggregates and unpacks them again, and the result is checked against the input.
#
# Usage: scripts/demo.sh [USER_RECORDS_JSONL]   (default: examples/user-records.jsonl)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktk/target}"
input="${1:-$root/examples/user-records.jsonl}"
[[ -r "$input" ]] || { echo "cannot read $input" >&2; exit 1; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
echo "==> building ktk (release)"
cargo build --release --locked -p ktk-cli --manifest-path "$root/Cargo.toml"
ktk="$CARGO_TARGET_DIR/release/ktk"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "==> ktk agg encode < $input"
"$ktk" agg encode <"$input" >"$work/kinesis.jsonl"
echo "==> ktk agg decode"
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
