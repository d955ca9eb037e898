# Sourced by localstack/install.sh, infra/lint.sh and etl/lint-sql.sh: finding a Python to make a venv with.

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
