#!/usr/bin/env bash
# The Buf CLI for the schemas in proto/ (see docs/schema.md).
#
#   scripts/buf.sh check [DIR]   buf lint DIR, then buf breaking DIR against the released schema
#                                (proto/baseline/schema.binpb) and, when HEAD is on a branch off
#                                main, against proto/protos at the merge base with main. DIR is a
#                                buf workspace (a folder with buf.yaml), proto/ by default.
#   scripts/buf.sh baseline      the release step: rebuilds proto/baseline/schema.binpb from proto/.
#   scripts/buf.sh path          installs the CLI if needed and prints the path of buf.
#   scripts/buf.sh ARGS...       runs buf with ARGS.
#
# The CLI is the npm package @bufbuild/buf at the version pinned by scripts/buf-cli/package.json
# and package-lock.json, installed with `npm ci` into a cache outside the clone,
# $KTK_CACHE/buf-cli ($KTK_CACHE is $HOME/.cache/ktk by default, as for the LocalStack scripts),
# one folder per pinned version. Every buf run is bounded by a timeout of 120 s and needs no
# network: proto/buf.yaml has no remote dependencies.
set -euo pipefail
shopt -s inherit_errexit
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
baseline="$root/proto/baseline/schema.binpb"
timeout_s=120

fail() {
  echo "scripts/buf.sh: $*" >&2
  exit 1
}

# Installs the pinned CLI unless the cache already holds it; prints the path of buf.
install_buf() {
  local lock="$root/scripts/buf-cli/package-lock.json"
  command -v npm >/dev/null || fail "npm not found: install Node.js 18 or later with npm (Debian: apt-get install nodejs npm)"
  local digest
  digest="$(cat "$root/scripts/buf-cli/package.json" "$lock" | sha256sum | cut -c1-16)"
  local cache="${KTK_CACHE:-$HOME/.cache/ktk}/buf-cli"
  local dir="$cache/$digest"
  local buf="$dir/node_modules/.bin/buf"
  mkdir -p "$cache"
  (
    # One install at a time: tests and scripts/test.sh may ask for the CLI together.
    flock -w 900 9 || fail "timed out waiting for another install of the Buf CLI ($cache/install.lock)"
    if [[ -f "$dir/.installed" && -x "$buf" ]]; then
      exit 0
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$root/scripts/buf-cli/package.json" "$lock" "$dir/"
    # --ignore-scripts: the package's postinstall only checks its binary; bin/buf finds the
    # platform's binary (an optional dependency in the lock file) by itself.
    if ! (cd "$dir" && timeout 600 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2); then
      rm -rf "$dir"
      fail "npm ci of the Buf CLI failed (the npm registry must be reachable the first time)"
    fi
    "$buf" --version >/dev/null || fail "the installed Buf CLI does not run: $buf"
    touch "$dir/.installed"
  ) 9>"$cache/install.lock"
  printf '%s\n' "$buf"
}

# The path of buf, set once (outside any `if`, so that a failed install stops the script).
buf=""

run_buf() {
  timeout "$timeout_s" "$buf" "$@"
}

# buf breaking DIR against one reference; on failure, buf's message and what to do.
breaking_against() {
  local dir="$1" against="$2" what="$3"
  if run_buf breaking "$dir" --against "$against"; then
    echo "buf breaking against $what: ok"
  else
    echo "buf breaking against $what: the change above breaks clients of the schema; see docs/schema.md" >&2
    return 1
  fi
}

check() {
  local dir="${1:-$root/proto}"
  [[ -f "$dir/buf.yaml" ]] || fail "$dir has no buf.yaml"
  [[ -f "$baseline" ]] || fail "the released schema $baseline is missing; see docs/schema.md"
  if run_buf lint "$dir"; then
    echo "buf lint: ok"
  else
    echo "buf lint: the schema breaks the lint rules of $dir/buf.yaml; see docs/schema.md" >&2
    return 1
  fi
  breaking_against "$dir" "$baseline" "the released schema (proto/baseline/schema.binpb)"

  # On a branch, also against main's schema: a field added on main since the release is already
  # compiled into clients built from main. (On main itself this would compare main with itself.)
  [[ "$(cd "$dir" && pwd -P)" == "$(cd "$root/proto" && pwd -P)" ]] || return 0
  local head base
  if ! head="$(git -C "$root" rev-parse --verify -q HEAD)" || ! base="$(git -C "$root" merge-base HEAD main 2>/dev/null)"; then
    echo "buf breaking against main: skipped (no git history with a main branch here)"
    return 0
  fi
  if [[ "$base" == "$head" ]]; then
    echo "buf breaking against main: nothing to compare (HEAD is main's tip)"
    return 0
  fi
  main_schema="$(mktemp -d)"
  trap 'rm -rf "$main_schema"' EXIT
  git -C "$root" archive "$base" proto/protos | tar -x -C "$main_schema"
  breaking_against "$dir" "$main_schema/proto/protos" "main (merge base ${base:0:12})"
}

case "${1:-}" in
  "" | -h | --help | path) ;;
  *) buf="$(install_buf)" ;;
esac

case "${1:-}" in
  check)
    shift
    check "$@"
    ;;
  baseline)
    run_buf build "$root/proto" --exclude-source-info -o "$baseline"
    echo "wrote $baseline: commit it with the release"
    ;;
  path)
    install_buf
    ;;
  "" | -h | --help)
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    ;;
  *)
    run_buf "$@"
    ;;
esac
