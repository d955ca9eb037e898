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
STAMP="$VENV/.ktk-installed"

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

installed() {
  [[ -x "$VENV/bin/cfn-lint" && "$(cat "$STAMP" 2>/dev/null)" == "cfn-lint==$CFN_LINT_VERSION" ]]
}

install_cfn_lint() {
  local py t0 log_file="$KTK_CACHE/cfn-lint-pip.log"
  t0="$(date +%s)"
  rm -f "$STAMP"
  if [[ -x "$VENV/bin/python" ]] && python_ok "$VENV/bin/python" 10; then
    log "reusing the venv $VENV ($("$VENV/bin/python" -V 2>&1))"
  else
    py="$(find_python 10)" || no_python 10 "cfn-lint $CFN_LINT_VERSION needs Python 3.10 or later"
    log "creating the venv $VENV with $py ($("$py" -V 2>&1))"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
  fi
  export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$KTK_CACHE/pip-cache}"
  log "pip install cfn-lint==$CFN_LINT_VERSION (log: $log_file)"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off \
    "cfn-lint==$CFN_LINT_VERSION" >"$log_file" 2>&1; then
    tail -n 30 "$log_file" >&2
    die "pip install cfn-lint==$CFN_LINT_VERSION failed (full log: $log_file)"
  fi
  [[ "$("$VENV/bin/cfn-lint" --version 2>&1)" == *"$CFN_LINT_VERSION"* ]] ||
    die "$VENV/bin/cfn-lint does not report version $CFN_LINT_VERSION after pip install"
  printf 'cfn-lint==%s' "$CFN_LINT_VERSION" >"$STAMP"
  log "installed cfn-lint $CFN_LINT_VERSION in $(($(date +%s) - t0)) s"
}

mkdir -p "$KTK_CACHE"
if ! installed; then
  # One installer at a time (tests may call this script concurrently).
  exec 8>"$KTK_CACHE/cfn-lint-install.lock"
  flock -w 600 8 || die "another infra/lint.sh holds $KTK_CACHE/cfn-lint-install.lock for 10 min; giving up"
  installed || install_cfn_lint
  exec 8>&-
fi

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
