#!/usr/bin/env bash
# The project's test command (README, and what CI runs through .ci/run).
#
# On a fresh machine it installs and starts what the tests need: LocalStack (host mode, no
# Docker), PostgreSQL and MariaDB. Then: rustfmt check, buf lint and buf breaking on the schemas,
# the monitoring files (ops/lint.sh), clippy with warnings as errors, and every test of the
# workspace, integration tests included.
# Integration tests never skip: a missing service fails them. LocalStack is stopped at the end if
# this script started it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# One build directory outside the clone, reused across runs and clones.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktk/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

# The reused build directory only grows (every dependency change leaves old artifacts behind).
# Past a size, or when the disk is nearly full, start it afresh: a cold build costs minutes, a
# full disk fails every link.
target_limit_kb=$((30 * 1024 * 1024))
if [[ -d "$CARGO_TARGET_DIR" ]]; then
  target_kb=$(du -sk "$CARGO_TARGET_DIR" 2>/dev/null | awk '{print $1}')
  free_kb=$(df -Pk "$CARGO_TARGET_DIR" | awk 'NR == 2 {print $4}')
  if (( ${target_kb:-0} > target_limit_kb || ${free_kb:-0} < 8 * 1024 * 1024 )); then
    echo "build directory $CARGO_TARGET_DIR is $((${target_kb:-0} / 1024)) MB with $((${free_kb:-0} / 1024)) MB free: removing it"
    rm -rf "$CARGO_TARGET_DIR"
  fi
fi

step "toolchain"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
cargo --version
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

step "services: LocalStack, PostgreSQL, MariaDB"
localstack/up.sh
trap 'localstack/down.sh --if-started' EXIT
# A second LocalStack, on 4567, whose Kinesis fails 30% of PutRecord/PutRecords calls with
# ProvisionedThroughputExceededException (every entry of the call): the producer's throttling tests.
KTK_LOCALSTACK_PORT=4567 KINESIS_ERROR_PROBABILITY=0.3 localstack/up.sh
trap 'KTK_LOCALSTACK_PORT=4567 localstack/down.sh --if-started || true; localstack/down.sh --if-started' EXIT
localstack/databases.sh

# The tests reach AWS through the standard configuration chain, pointed at LocalStack.
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:4566}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export KTK_FLAKY_ENDPOINT_URL="${KTK_FLAKY_ENDPOINT_URL:-http://127.0.0.1:4567}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export MYSQL_URL="${MYSQL_URL:-mysql://root@127.0.0.1:3306/test}"

step "cargo fmt --check"
cargo fmt --all --check

step "buf lint and buf breaking"
# The schemas in proto/ against the lint rules and the released schema (docs/schema.md); the
# Buf CLI comes from the npm registry into a cache outside the clone.
scripts/buf.sh check

step "monitoring: Grafana dashboard, Prometheus rules, CloudWatch dashboard"
# promtool check and test rules, then every PromQL and SQL query and every CloudWatch widget
# parsed and checked against the code's metrics and the store's columns (docs/monitoring.md);
# promtool (Debian's prometheus package) and the npm packages are cached under ~/.cache/ktk.
ops/lint.sh

step "dashboard: npm packages and the page bundle"
# uPlot and esbuild from the npm registry (npm ci, cached under ~/.cache/ktk/npm), the page
# bundled into dashboard/web/dist, which the ktk-dashboard crate embeds when cargo compiles it
# (so before clippy and the tests); Debian's chromium for its browser test.
dashboard/web/scripts/setup.sh --browser

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# --- web SDK -------------------------------------------------------------------------------------
# npm packages (npm ci, cached under ~/.cache/ktk/npm) and Debian's chromium, the SDK generated
# from proto/protos and built, then its unit tests. Its browser tests run under cargo test
# (tests/tests/web_sdk.rs), against the collector, LocalStack, a consumer and PostgreSQL.
step "web SDK: install, build, unit tests"
sdk/web/scripts/setup.sh
web_log="$(mktemp)"
if ! (cd sdk/web && npm run --silent test:unit) >"$web_log" 2>&1; then
  cat "$web_log"
  rm -f "$web_log"
  echo "web SDK unit tests failed" >&2
  exit 1
fi
grep -E '^# (tests|pass|fail) ' "$web_log"
rm -f "$web_log"

step "cargo test (unit, property, integration, doc)"
log="$(mktemp)"
set +e
# --no-fail-fast: one failing suite must not hide the others (the closing count covers them all).
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '^test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
rm -f "$log"
if [[ $status -ne 0 && $failed -eq 0 ]]; then
  failed=1 # a build error or a crashed test binary counts as a failure
fi
printf '\ntests: %d passed, %d failed\n' "$passed" "$failed"
exit "$status"
