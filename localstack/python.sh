# shellcheck shell=bash
# Sourced by localstack/install.sh, infra/lint.sh and etl/lint-sql.sh: finding a Python to make a
# venv with, and installing a pinned PyPI tool into one.

# python_ok PY MINOR: PY is a Python >= 3.MINOR with the venv and ensurepip modules.
python_ok() {
  "$1" -c "import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, $2) else 1)" >/dev/null 2>&1
}

# find_python MINOR: prints the first Python >= 3.MINOR among $KTK_PYTHON (alone, when it is set),
# pyenv's 3.13.x and 3.12.x, then python3.13, python3.12 and python3 on PATH. Returns 1, printing
# nothing, when there is none.
find_python() {
  local minor="$1" pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}" candidates=() v c
  if [[ -n "${KTK_PYTHON:-}" ]]; then
    python_ok "$KTK_PYTHON" "$minor" && { printf '%s' "$KTK_PYTHON"; return 0; }
    return 1
  fi
  if [[ -d "$pyenv_root/versions" ]]; then
    for v in $(find "$pyenv_root/versions" -mindepth 1 -maxdepth 1 -printf '%f\n' |
      grep -E '^3\.1[23]\.[0-9]+$' | sort -rV); do
      candidates+=("$pyenv_root/versions/$v/bin/python3")
    done
  fi
  for c in python3.13 python3.12 python3; do
    command -v "$c" >/dev/null 2>&1 && candidates+=("$(command -v "$c")")
  done
  for c in "${candidates[@]}"; do
    python_ok "$c" "$minor" && { printf '%s' "$c"; return 0; }
  done
  return 1
}

# no_python MINOR WHY: dies (the caller's `die`) saying what was looked for and how to get it.
no_python() {
  if [[ -n "${KTK_PYTHON:-}" ]]; then
    die "KTK_PYTHON=$KTK_PYTHON is not a Python >= 3.$1 with the venv module ($2)"
  fi
  die "no Python >= 3.$1 with the venv module found (looked in ${PYENV_ROOT:-$HOME/.pyenv}/versions/3.1[23].*,
  python3.13, python3.12, python3 on PATH; $2). Install one, e.g. 'pyenv install 3.12' or
  'apt-get install python3.12 python3.12-venv' where available, or point KTK_PYTHON at one."
}

# pip_tool_ready NAME VERSION VENV: VENV holds NAME==VERSION, installed by pip_tool_install.
pip_tool_ready() {
  [[ -x "$3/bin/$1" && "$(cat "$3/.ktk-installed" 2>/dev/null)" == "$1==$2" ]]
}

# pip_tool_install NAME VERSION VENV: makes sure VENV holds the PyPI package NAME==VERSION, whose
# command is also NAME, in a venv of a Python >= 3.10: reuses it when it is there, else installs it
# (pip's cache and log under $KTK_CACHE), one installer at a time (a lock in $KTK_CACHE: tests may
# run the calling script concurrently). The caller sets KTK_CACHE and defines log and die.
pip_tool_install() {
  local name="$1" version="$2" venv="$3" py t0 log_file="$KTK_CACHE/$1-pip.log"
  mkdir -p "$KTK_CACHE"
  pip_tool_ready "$name" "$version" "$venv" && return 0
  exec 8>"$KTK_CACHE/$name-install.lock"
  flock -w 600 8 || die "another install of $name holds $KTK_CACHE/$name-install.lock for 10 min; giving up"
  if ! pip_tool_ready "$name" "$version" "$venv"; then
    t0="$(date +%s)"
    rm -f "$venv/.ktk-installed"
    if [[ -x "$venv/bin/python" ]] && python_ok "$venv/bin/python" 10; then
      log "reusing the venv $venv ($("$venv/bin/python" -V 2>&1))"
    else
      py="$(find_python 10)" || no_python 10 "$name $version needs Python 3.10 or later"
      log "creating the venv $venv with $py ($("$py" -V 2>&1))"
      rm -rf "$venv"
      "$py" -m venv "$venv"
    fi
    export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$KTK_CACHE/pip-cache}"
    log "pip install $name==$version (log: $log_file)"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off \
      "$name==$version" >"$log_file" 2>&1; then
      tail -n 30 "$log_file" >&2
      die "pip install $name==$version failed (full log: $log_file)"
    fi
    [[ "$("$venv/bin/$name" --version 2>&1)" == *"$version"* ]] ||
      die "$venv/bin/$name does not report version $version after pip install"
    printf '%s==%s' "$name" "$version" >"$venv/.ktk-installed"
    log "installed $name $version in $(($(date +%s) - t0)) s"
  fi
  exec 8>&-
}
