#!/usr/bin/env bash
# Benchmark: `ktk produce` against the Python producer aiokpl 0.2.0, on LocalStack (loopback only).
#
# Same dataset for both (100,000 records of 100 bytes, 1,000 partition keys), a fresh 4-shard
# stream each, the same producer settings (aggregation on, 100 ms buffering, the same per-shard
# rate limit, the same bound on outstanding records). Each run is timed with /usr/bin/time -v
# (wall clock, CPU, peak RSS); each stream is then read back and deaggregated with Amazon's
# aws_kinesis_agg to check that it holds every record exactly once. Prints a table.
#
# Environment: RECORDS (100000), SHARDS (4), KEYS (1000), SIZE (100), RATE_LIMIT (150, percent of
# the shard quotas, for both tools), MAX_OUTSTANDING (10000), TOOLS ("ktk aiokpl"), AWS_* (LocalStack
# defaults), KTK_BENCH_VENV ($HOME/.cache/ktk/bench-venv), CARGO_TARGET_DIR ($HOME/.cache/ktk/target),
# KTK_ARGS (more `ktk produce` arguments: `TOOLS=ktk KTK_ARGS="--no-aggregation --progress-secs 30"`
# is the plain-records run of docs/producer.md), RUN_TIMEOUT (600 s per tool).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

RECORDS="${RECORDS:-100000}"
SHARDS="${SHARDS:-4}"
KEYS="${KEYS:-1000}"
SIZE="${SIZE:-100}"
RATE_LIMIT="${RATE_LIMIT:-150}"
MAX_OUTSTANDING="${MAX_OUTSTANDING:-10000}"
TOOLS="${TOOLS:-ktk aiokpl}"
RUN_TIMEOUT="${RUN_TIMEOUT:-600}"
# More `ktk produce` arguments, split on spaces: e.g. "--no-aggregation --progress-secs 30".
KTK_ARGS="${KTK_ARGS:-}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktk/target}"
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:4566}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_EC2_METADATA_DISABLED=true
venv="${KTK_BENCH_VENV:-$HOME/.cache/ktk/bench-venv}"
work="${KTK_BENCH_WORK:-$HOME/.cache/ktk/bench-produce}"

say() { printf '[bench/produce] %s\n' "$*" >&2; }

case "$AWS_ENDPOINT_URL" in
  http://127.0.0.1:* | http://localhost:* | http://\[::1\]:*) ;;
  *) say "AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL is not on loopback; this benchmark only runs against LocalStack"; exit 2 ;;
esac
if ! curl -fsS -m 5 "$AWS_ENDPOINT_URL/_localstack/health" >/dev/null; then
  say "LocalStack does not answer at $AWS_ENDPOINT_URL: start it with localstack/up.sh"
  exit 1
fi

if [[ ! -x /usr/bin/time ]]; then
  say "installing GNU time (Debian package 'time') for peak RSS"
  if [[ $(id -u) -eq 0 ]]; then apt-get install -y -qq time >/dev/null; else sudo apt-get install -y -qq time >/dev/null; fi
fi

# Python >= 3.11: pyenv's 3.12/3.13 first, then python3.
if [[ ! -x "$venv/bin/python" ]]; then
  python=""
  for candidate in /root/.pyenv/versions/3.12*/bin/python3 /root/.pyenv/versions/3.13*/bin/python3 \
    "$(command -v python3.12 || true)" "$(command -v python3.13 || true)" "$(command -v python3 || true)"; do
    if [[ -x "$candidate" ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      python="$candidate"
      break
    fi
  done
  [[ -n "$python" ]] || { say "no Python >= 3.11 found"; exit 1; }
  say "creating $venv with $("$python" --version)"
  "$python" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  say "installing bench/produce/requirements.txt into $venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
  echo "$want" >"$stamp"
fi
py="$venv/bin/python"

say "building ktk (release)"
(cd "$root" && cargo build -q --release -p ktk-cli)
ktk="$CARGO_TARGET_DIR/release/ktk"

mkdir -p "$work"
data="$work/records-$RECORDS-$KEYS-$SIZE.jsonl"
if [[ ! -s "$data" ]]; then
  say "generating $data"
  "$py" "$here/bench_tools.py" dataset --records "$RECORDS" --keys "$KEYS" --size "$SIZE" >"$data.tmp"
  mv "$data.tmp" "$data"
fi
results="$work/results.jsonl"
: >"$results"

for tool in $TOOLS; do
  stream="ktk-bench-$tool-$(date +%s)-$$"
  say "$tool: stream $stream ($SHARDS shards)"
  "$py" "$here/bench_tools.py" create "$stream" --shards "$SHARDS"
  case "$tool" in
    ktk)
      cmd=("$ktk" produce --stream "$stream" --summary-json --rate-limit "$RATE_LIMIT"
        --max-outstanding "$MAX_OUTSTANDING")
      read -r -a extra <<<"$KTK_ARGS"
      cmd+=("${extra[@]}")
      ;;
    aiokpl)
      cmd=("$py" "$here/aiokpl_producer.py" --stream "$stream" --input "$data" --rate-limit "$RATE_LIMIT"
        --max-outstanding "$MAX_OUTSTANDING")
      ;;
    *) say "unknown tool $tool"; exit 2 ;;
  esac
  status=0
  timeout "$RUN_TIMEOUT" /usr/bin/time -v -o "$work/$tool.time" "${cmd[@]}" <"$data" >"$work/$tool.summary.json" \
    2>"$work/$tool.stderr" || status=$?
  tail -n 3 "$work/$tool.stderr" | sed "s/^/  [$tool] /" >&2
  if [[ $status -ne 0 ]]; then
    say "$tool exited with status $status (see $work/$tool.stderr)"
  fi
  "$py" "$here/bench_tools.py" verify "$stream" "$data" >"$work/$tool.verify.json"
  say "$tool: verify $(cat "$work/$tool.verify.json")"
  "$py" "$here/bench_tools.py" delete "$stream"
  "$py" - "$tool" "$work" "$RECORDS" >>"$results" <<'PY'
import json, re, sys
tool, work, records = sys.argv[1], sys.argv[2], int(sys.argv[3])
time_v = open(f"{work}/{tool}.time").read()
def field(name):
    return re.search(rf"{re.escape(name)}: (.+)", time_v).group(1).strip()
wall = 0.0
for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
    wall = wall * 60 + float(part)
summary = json.loads(open(f"{work}/{tool}.summary.json").read().strip().splitlines()[-1])
print(json.dumps({
    "tool": tool,
    "summary": summary,
    "verify": json.load(open(f"{work}/{tool}.verify.json")),
    "wall_seconds": wall,
    "records_per_wall_second": summary["user_records"] / wall if wall else 0.0,
    "cpu_seconds": float(field("User time (seconds)")) + float(field("System time (seconds)")),
    "peak_rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024,
}))
PY
done

echo
echo "ktk produce vs aiokpl 0.2.0 on LocalStack: $RECORDS records x $SIZE B, $KEYS keys, $SHARDS shards," \
  "rate limit $RATE_LIMIT%, max outstanding $MAX_OUTSTANDING, $(nproc) CPUs (shared with LocalStack)"
"$py" "$here/bench_tools.py" table "$results"
echo "(details: $work)"
