#!/usr/bin/env bash
# Lints every CloudFormation template in infra/ with cfn-lint, installing it first (pinned, into a
# venv under ${KTK_CACHE:-$HOME/.cache/ktk}) if it is missing. Exits non-zero on any finding
# (error or warning) and on any failure to install or run the linter.
set -euo pipefail

CFN_LINT_VERSION="1.58.0"
INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KTK_CACHE="${KTK_CACHE:-$HOME/.cache/ktk}"
case "$KTK_CACHE" in /*) ;; *) KTK_CACHE="$PWD/$KTK_CACHE" ;; esac
VENV="$KTK_CACHE/cfn-lint-venv"

ME="infra/$(basename "$0")"
log() { printf '[%s] %s\n' "$ME" "$*"; }
die() {
  printf '[%s] ERROR: %s\n' "$ME" "$*" >&2
  exit 1
}

usage() {
  cat <<EOF
Usage: infra/lint.sh [TEMPLATE...]
Lints the given templates (default: every infra/*.yaml) with cfn-lint $CFN_LINT_VERSION.
Installs cfn-lint into $VENV when it is missing.
Env: KTK_CACHE (cache dir), KTK_PYTHON (interpreter for the venv instead of probing).
EOF
}
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac

# --- the interpreter: cfn-lint 1.58 needs Python >= 3.10 ------------------------------------------
# shellcheck source=../localstack/python.sh
source "$INFRA_DIR/../localstack/python.sh"

pip_tool_install cfn-lint "$CFN_LINT_VERSION" "$VENV"

if (($#)); then
  templates=("$@")
else
  templates=()
  for t in "$INFRA_DIR"/*.yaml; do
    [[ -f "$t" ]] && templates+=("$t")
  done
  ((${#templates[@]})) || die "no templates (*.yaml) in $INFRA_DIR"
fi

log "cfn-lint $CFN_LINT_VERSION on ${#templates[@]} template(s): ${templates[*]#"$INFRA_DIR"/}"
# cfn-lint's exit status is a bit set: 2 errors, 4 warnings, 8 informational (not shown by default);
# any finding it prints fails this script.
status=0
"$VENV/bin/cfn-lint" --format parseable -- "${templates[@]}" || status=$?
if ((status != 0)); then
  die "cfn-lint found problems (exit status $status: 2 = errors, 4 = warnings, bits combined)"
fi
log "clean"
