#!/usr/bin/env bash
# Builds the dashboard's page bundle on a fresh machine: the npm packages of package-lock.json
# (`npm ci`, npm's download cache under ${KTK_CACHE:-$HOME/.cache/ktk}/npm, outside the clone;
# skipped while node_modules matches the lock file), then dist/dashboard.{js,css} (uPlot and
# src/ bundled by esbuild), which the ktk-dashboard crate embeds when it is compiled. With
# --browser it also installs Debian's chromium (apt-get, when /usr/bin/chromium is missing) for
# the browser tests and the demo's screenshot.
set -euo pipefail
web="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KTK_CACHE:-$HOME/.cache/ktk}"
browser=0
case "${1:-}" in
  --browser) browser=1 ;;
  "") ;;
  *) echo "usage: dashboard/web/scripts/setup.sh [--browser]" >&2; exit 2 ;;
esac
log() { printf '[dashboard/web/setup.sh] %s\n' "$*"; }
die() { printf '[dashboard/web/setup.sh] ERROR: %s\n' "$*" >&2; exit 1; }

command -v node >/dev/null && command -v npm >/dev/null ||
  die "node and npm are needed (Debian: apt-get install -y nodejs npm)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
  die "node >= 20 is needed, found $(node --version)"

if ((browser)) && [[ ! -x /usr/bin/chromium ]]; then
  log "installing chromium (Debian package) for the browser tests and screenshots"
  if [[ $(id -u) -eq 0 ]]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo -n); else
    die "/usr/bin/chromium is missing and this user cannot install it: apt-get install -y chromium"
  fi
  "${sudo[@]}" apt-get update -q >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q chromium >/dev/null || die "apt-get install chromium failed"
  [[ -x /usr/bin/chromium ]] || die "apt-get installed chromium but /usr/bin/chromium is missing"
fi

cd "$web"
stamp="node_modules/.ktk-package-lock.sha256"
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  log "node_modules matches package-lock.json, npm ci skipped"
else
  mkdir -p "$cache/npm"
  log "npm ci (cache $cache/npm)"
  npm ci --cache "$cache/npm" --prefer-offline --no-audit --no-fund --loglevel=error
  echo "$want" >"$stamp"
fi
npm run --silent build
