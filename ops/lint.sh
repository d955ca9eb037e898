#!/usr/bin/env bash
# Validates the monitoring files (docs/monitoring.md):
#   - ops/prometheus/*.yml: `promtool check rules`, and `promtool test rules` on each *.test.yml;
#   - ops/grafana/*.json, the same rules again, and the CloudWatch dashboards of infra/*.yaml:
#     ops/lint/check.mjs (Node.js) parses every PromQL expression (the Prometheus project's grammar),
#     every SQL query (PostgreSQL's own parser) and every DashboardBody, and checks each metric,
#     label, table and column against the Rust code and the store's schema.
# Tools come from the package registries into ${KTK_CACHE:-$HOME/.cache/ktk}, outside the clone:
# promtool from Debian's `prometheus` package (downloaded with apt-get and unpacked, only promtool
# is kept, nothing is installed), the npm packages pinned by ops/package-lock.json (`npm ci`).
# Prints what it checked; exits 1 on any problem, naming the file and what is wrong.
set -euo pipefail
# A failed install inside $(...) stops the script too.
shopt -s inherit_errexit

OPS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$OPS_DIR/.." && pwd)"
KTK_CACHE="${KTK_CACHE:-$HOME/.cache/ktk}"
case "$KTK_CACHE" in /*) ;; *) KTK_CACHE="$PWD/$KTK_CACHE" ;; esac
TIMEOUT_S=300

ME="ops/$(basename "$0")"
log() { printf '[%s] %s\n' "$ME" "$*"; }
die() {
  printf '[%s] ERROR: %s\n' "$ME" "$*" >&2
  exit 1
}

case "${1:-}" in
  -h | --help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    echo "Env: KTK_CACHE (cache dir), KTK_PROMTOOL (a promtool to use instead of Debian's)."
    exit 0
    ;;
  "") ;;
  *) die "no arguments expected (see --help)" ;;
esac

# as_root CMD...: runs CMD as root (directly, or with sudo -n), or fails saying what to run.
as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    die "this user cannot run '$*' (root or passwordless sudo needed); run it once as root"
  fi
}

# --- promtool, from Debian's prometheus package ---------------------------------------------------
# Prints the path of a promtool that runs: $KTK_PROMTOOL, else the one unpacked into
# $KTK_CACHE/promtool/<Debian version>/, downloading the package first when it is not there.
install_promtool() {
  if [[ -n "${KTK_PROMTOOL:-}" ]]; then
    "$KTK_PROMTOOL" --version >/dev/null 2>&1 || die "KTK_PROMTOOL=$KTK_PROMTOOL does not run"
    printf '%s\n' "$KTK_PROMTOOL"
    return
  fi
  if ! command -v apt-cache >/dev/null || ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    die "promtool comes from Debian's prometheus package: apt-get and dpkg-deb are needed (or set KTK_PROMTOOL)"
  fi
  local cache="$KTK_CACHE/promtool" version
  mkdir -p "$cache"
  version="$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')"
  if [[ -z "$version" || "$version" == "(none)" ]]; then
    log "apt-get update (the package lists do not know prometheus yet)" >&2
    as_root apt-get update -q >/dev/null || die "apt-get update failed"
    version="$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')"
    [[ -n "$version" && "$version" != "(none)" ]] || die "Debian's package lists have no prometheus package"
  fi
  local dir="$cache/$version"
  (
    # One install at a time: the tests and scripts/test.sh may run this script together.
    flock -w 600 9 || die "another install of promtool holds $cache/install.lock for 10 min"
    if [[ -x "$dir/promtool" ]] && "$dir/promtool" --version >/dev/null 2>&1; then
      exit 0
    fi
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    log "downloading Debian's prometheus $version for its promtool (log: $cache/apt-download.log)" >&2
    # apt-get download needs no root; as root it warns that it cannot drop to the _apt user.
    if ! (cd "$tmp" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "prometheus=$version") >"$cache/apt-download.log" 2>&1; then
      tail -n 20 "$cache/apt-download.log" >&2
      die "apt-get download prometheus=$version failed"
    fi
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool ||
      die "the prometheus package has no usr/bin/promtool"
    rm -rf "$dir"
    mkdir -p "$dir"
    mv "$tmp/usr/bin/promtool" "$dir/promtool"
    "$dir/promtool" --version >/dev/null || die "the unpacked $dir/promtool does not run"
  ) 9>"$cache/install.lock"
  printf '%s\n' "$dir/promtool"
}

# --- the npm packages of ops/lint/check.mjs -------------------------------------------------------
# Prints the node_modules folder, installed by `npm ci` into $KTK_CACHE/ops-lint/<digest of the
# lock file> unless it is there already.
install_node_modules() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    die "node and npm are needed (Debian: apt-get install -y nodejs npm)"
  fi
  node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
    die "node >= 20 is needed, found $(node --version)"
  local digest cache="$KTK_CACHE/ops-lint" dir
  digest="$(cat "$OPS_DIR/package.json" "$OPS_DIR/package-lock.json" | sha256sum | cut -c1-16)"
  dir="$cache/$digest"
  mkdir -p "$cache"
  (
    flock -w 600 9 || die "another npm ci holds $cache/install.lock for 10 min"
    [[ -f "$dir/.installed" ]] && exit 0
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$OPS_DIR/package.json" "$OPS_DIR/package-lock.json" "$dir/"
    log "npm ci of ops/package-lock.json into $dir" >&2
    if ! (cd "$dir" && timeout 600 npm ci --cache "$KTK_CACHE/npm" --prefer-offline --ignore-scripts \
      --no-audit --no-fund --loglevel=error >&2); then
      rm -rf "$dir"
      die "npm ci failed (the npm registry must be reachable the first time)"
    fi
    touch "$dir/.installed"
  ) 9>"$cache/install.lock"
  printf '%s\n' "$dir/node_modules"
}

# Outside any `if`, so that a failed install stops the script.
promtool="$(install_promtool)"
node_modules="$(install_node_modules)"
log "promtool: $("$promtool" --version 2>&1 | head -n 1)"

failures=()
shopt -s nullglob
rules=()
tests=()
for f in "$OPS_DIR"/prometheus/*.yml; do
  if [[ "$f" == *.test.yml ]]; then tests+=("$f"); else rules+=("$f"); fi
done
((${#rules[@]})) || die "no rule files in ops/prometheus/"

log "promtool check rules ${rules[*]#"$ROOT"/}"
timeout "$TIMEOUT_S" "$promtool" check rules "${rules[@]}" || failures+=("promtool check rules")
for t in "${tests[@]}"; do
  log "promtool test rules ${t#"$ROOT"/}"
  # promtool reads the test's rule_files relative to the test file.
  (cd "$(dirname "$t")" && timeout "$TIMEOUT_S" "$promtool" test rules "$(basename "$t")") ||
    failures+=("promtool test rules ${t#"$ROOT"/}")
done

log "ops/lint/check.mjs: the Grafana dashboards, the rules, the CloudWatch dashboards against the code"
timeout "$TIMEOUT_S" node "$OPS_DIR/lint/check.mjs" "$ROOT" "$node_modules" || failures+=("ops/lint/check.mjs")

if ((${#failures[@]})); then
  joined="$(IFS=';' && echo "${failures[*]}")"
  die "failed: ${joined//;/; } (the problems are listed above)"
fi
log "clean"
