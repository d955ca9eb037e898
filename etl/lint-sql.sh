#!/usr/bin/env bash
# Checks that every job's SQL (etl/jobs/*/v*.sql) parses in each engine's SQL dialect: Athena
# (sqlfluff's athena and trino dialects) and the embedded engine (sqlite). The day placeholder
# {{dt}} is replaced with a day first, as the runner does. Installs sqlfluff (pinned, into a venv
# under ${KTK_CACHE:-$HOME/.cache/ktk}) if it is missing. Prints one OK line per file and dialect;
# exits non-zero when a file does not parse in a dialect (naming the file, the dialect and the
# unparsable part) and on any failure to install or run sqlfluff.
set -euo pipefail

SQLFLUFF_VERSION="4.5.0"
DIALECTS=(athena trino sqlite)
DAY="2026-03-01"
ETL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KTK_CACHE="${KTK_CACHE:-$HOME/.cache/ktk}"
case "$KTK_CACHE" in /*) ;; *) KTK_CACHE="$PWD/$KTK_CACHE" ;; esac
VENV="$KTK_CACHE/sqlfluff-venv"

ME="etl/$(basename "$0")"
log() { printf '[%s] %s\n' "$ME" "$*"; }
die() {
  printf '[%s] ERROR: %s\n' "$ME" "$*" >&2
  exit 1
}

usage() {
  cat <<EOF
Usage: etl/lint-sql.sh [FILE.sql...]
Parses the given job SQL files (default: every etl/jobs/*/v*.sql), with {{dt}} replaced by $DAY,
with sqlfluff $SQLFLUFF_VERSION in the dialects ${DIALECTS[*]}. Only parsing is checked, no style rule.
Installs sqlfluff into $VENV when it is missing.
Env: KTK_CACHE (cache dir), KTK_PYTHON (interpreter for the venv instead of probing).
EOF
}
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac

# --- the interpreter: sqlfluff 4.5 needs Python >= 3.10 ------------------------------------------
# shellcheck source=../localstack/python.sh
source "$ETL_DIR/../localstack/python.sh"

pip_tool_install sqlfluff "$SQLFLUFF_VERSION" "$VENV"

if (($#)); then
  files=("$@")
else
  files=()
  for f in "$ETL_DIR"/jobs/*/v*.sql; do
    [[ -f "$f" ]] && files+=("$f")
  done
  ((${#files[@]})) || die "no job SQL (jobs/*/v*.sql) in $ETL_DIR"
fi
for f in "${files[@]}"; do
  [[ -f "$f" ]] || die "$f: no such file"
done

log "sqlfluff $SQLFLUFF_VERSION, dialects ${DIALECTS[*]}, on ${#files[@]} file(s), {{dt}} = $DAY"
# How sqlfluff 4.5 is run, and why:
# - the SQL comes on stdin: given a path, sqlfluff skips a file over large_file_skip_byte_limit
#   (20000 bytes) with a warning and exit status 0;
# - --templater raw: the text is parsed as it is, so Jinja does not read {{ }} or {% %};
# - --disable-noqa: a `-- noqa` comment would otherwise hide an unparsable section;
# - --ignore-local-config: no .sqlfluff, setup.cfg, tox.ini or pyproject.toml changes the parse;
# - exit status 0 = parsed, 1 = an unlexable or unparsable section (listed under "==== parsing
#   violations ====" at the end of the human output), 2 = a usage or internal error.
# (--nofail would make every status 0: it is not used.)
# sqlfluff also obeys in-file settings, lines that begin with `-- sqlfluff` or `--sqlfluff` (e.g.
# `-- sqlfluff:dialect:sqlite`, `-- sqlfluff:ignore:parsing`): a file with one fails the check.
failed=0
for f in "${files[@]}"; do
  name="${f#"$ETL_DIR"/}"
  if inline="$(grep -nE '^-- ?sqlfluff' "$f")"; then
    failed=$((failed + 1))
    log "FAIL $name: sqlfluff settings in the file would change the check"
    mapfile -t lines <<<"$inline"
    printf '    line %s\n' "${lines[@]}"
    continue
  fi
  sql="$(<"$f")"
  sql="${sql//"{{dt}}"/$DAY}"
  for dialect in "${DIALECTS[@]}"; do
    status=0
    out="$(printf '%s\n' "$sql" | "$VENV/bin/sqlfluff" parse - --dialect "$dialect" --templater raw \
      --disable-noqa --ignore-local-config --nocolor --format human 2>&1)" || status=$?
    case "$status" in
      0) log "OK   $name ($dialect)" ;;
      1)
        failed=$((failed + 1))
        log "FAIL $name ($dialect): does not parse in the $dialect dialect"
        # The violations, without the parse tree above them and the dialect hint below.
        violations="$(sed '0,/^==== parsing violations ====$/d' <<<"$out" |
          grep -v '^WARNING: Parsing errors found' || true)"
        [[ -n "$violations" ]] || violations="$(tail -n 30 <<<"$out")"
        mapfile -t lines <<<"$violations"
        printf '    %s\n' "${lines[@]}"
        ;;
      *)
        printf '%s\n' "$out" | tail -n 30 >&2
        die "sqlfluff parse failed on $name in the $dialect dialect (exit status $status)"
        ;;
    esac
  done
done
if ((failed)); then
  die "$failed check(s) failed (see FAIL above)"
fi
log "all ${#files[@]} file(s) parse in ${DIALECTS[*]}"
