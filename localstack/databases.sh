#!/usr/bin/env bash
# Makes sure the test databases are up (Debian/Ubuntu hosts without Docker):
#   PostgreSQL  127.0.0.1:5432, user postgres, trust auth (no password), database test
#   MariaDB     127.0.0.1:3306, user root, empty password, database test
# Looks first; starts them if installed but stopped; installs them with apt-get if missing; then
# fixes auth and creates the databases when needed. Safe to run repeatedly. Needs root (or sudo) only
# for installing, starting or reconfiguring.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DB_TIMEOUT="${KTK_DB_TIMEOUT:-60}"
case "${1:-}" in
  -h | --help)
    printf 'Usage: localstack/databases.sh\nEnv: KTK_DB_TIMEOUT (seconds to wait for each server, default 60)\n'
    exit 0
    ;;
  "") ;;
  *) die "unknown argument: $1 (see --help)" ;;
esac
[[ "$DB_TIMEOUT" =~ ^[0-9]+$ ]] || die "KTK_DB_TIMEOUT must be whole seconds, got '$DB_TIMEOUT'"
T0="$(now_ms)"

as_root() {
  if ((EUID == 0)); then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    die "needs root (or sudo) to run: $*"
  fi
}
as_postgres() {
  if ((EUID == 0)); then runuser -u postgres -- "$@"; else sudo -n -u postgres "$@"; fi
}

# wait_until DESCRIPTION COMMAND...: retry COMMAND every 0.5 s for up to DB_TIMEOUT seconds.
wait_until() {
  local what="$1" end
  shift
  end=$(($(now_ms) + DB_TIMEOUT * 1000))
  until "$@"; do
    (($(now_ms) < end)) || die "$what: not reachable within ${DB_TIMEOUT}s"
    sleep 0.5
  done
}

# --- install what is missing ---------------------------------------------------------------------
pg_installed() { command -v pg_ctlcluster >/dev/null 2>&1 && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }
my_installed() { [[ -x /usr/sbin/mariadbd ]] && command -v mariadb >/dev/null 2>&1; }

missing=()
pg_installed || missing+=(postgresql)
my_installed || missing+=(mariadb-server)
if ((${#missing[@]})); then
  command -v apt-get >/dev/null 2>&1 ||
    die "${missing[*]} not installed and no apt-get here: install PostgreSQL and MariaDB yourself (or use docker-compose.yml)"
  log "installing ${missing[*]} (apt-get update; apt-get install -y ${missing[*]})"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# --- PostgreSQL ----------------------------------------------------------------------------------
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 -t 2; }
pg_tcp() { env -u PGPASSWORD PGPASSFILE=/nonexistent/ktk-no-pgpass psql -h 127.0.0.1 -p 5432 -U postgres -w -X -Atq "$@"; }
pg_trust_ok() { pg_tcp -d postgres -c 'select 1' >/dev/null 2>&1; }

pg_ver="$(find /etc/postgresql -mindepth 2 -maxdepth 2 -name main -printf '%h\n' 2>/dev/null | xargs -r -n1 basename | sort -V | tail -n 1)"
if pg_up; then
  log "PostgreSQL: already running on 127.0.0.1:5432"
else
  if [[ -z "$pg_ver" ]]; then
    pg_ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
    log "PostgreSQL: no cluster yet, creating $pg_ver/main"
    as_root pg_createcluster "$pg_ver" main
  fi
  if as_root pg_ctlcluster "$pg_ver" main status >/dev/null 2>&1; then
    die "PostgreSQL $pg_ver/main runs but does not answer on 127.0.0.1:5432 (check port/listen_addresses in /etc/postgresql/$pg_ver/main/postgresql.conf)"
  fi
  log "PostgreSQL: $pg_ver/main is stopped, starting it"
  as_root pg_ctlcluster --skip-systemctl-redirect "$pg_ver" main start
  wait_until "PostgreSQL on 127.0.0.1:5432" pg_up
  log "PostgreSQL: up after $(elapsed "$T0")"
fi

if ! pg_trust_ok; then
  # A fresh install asks for a password (scram-sha-256) on TCP. pg_hba.conf is first-match, so
  # put trust lines for loopback at the top, once, and reload.
  hba="$(as_postgres psql -X -Atqc 'show hba_file' 2>/dev/null || true)"
  [[ -n "$hba" ]] || hba="/etc/postgresql/$pg_ver/main/pg_hba.conf"
  as_root test -f "$hba" || die "PostgreSQL: cannot find pg_hba.conf (tried $hba)"
  if as_root grep -q 'ktk localstack/databases.sh' "$hba"; then
    die "PostgreSQL: trust lines are already in $hba but password-less login as postgres still fails"
  fi
  log "PostgreSQL: TCP login as postgres needs a password; adding trust for 127.0.0.1/32 and ::1/128 to $hba"
  tmp_hba="$(mktemp)"
  {
    printf '%s\n' '# added by ktk localstack/databases.sh: password-less local TCP for the test databases'
    printf '%s\n' 'host    all    all    127.0.0.1/32    trust' 'host    all    all    ::1/128    trust' ''
    as_root cat "$hba"
  } >"$tmp_hba"
  as_root cp "$tmp_hba" "$hba" # cp into the existing file keeps its owner and mode
  rm -f "$tmp_hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$pg_ver" main reload
  wait_until "PostgreSQL trust login on 127.0.0.1" pg_trust_ok
fi

if [[ "$(pg_tcp -d postgres -c "select 1 from pg_database where datname = 'test'")" != 1 ]]; then
  log "PostgreSQL: creating database test"
  pg_tcp -d postgres -c 'create database test' >/dev/null
fi
pg_tcp -d test -c 'select 1' >/dev/null || die "PostgreSQL: cannot connect to database test"
log "PostgreSQL: ok  postgres://postgres@127.0.0.1:5432/test (trust)"

# --- MariaDB -------------------------------------------------------------------------------------
my_admin="$(command -v mariadb-admin || command -v mysqladmin || true)"
[[ -n "$my_admin" ]] || die "MariaDB: neither mariadb-admin nor mysqladmin found (apt-get install -y mariadb-client)"
# Does a MariaDB server answer on 127.0.0.1:3306? 'ping' succeeds even if the login is refused,
# but not if the host is refused (1130, e.g. no root@127.0.0.1 with skip-name-resolve): count that.
my_up() {
  local out
  out="$("$my_admin" --protocol=tcp -h127.0.0.1 -P3306 --connect-timeout=2 ping 2>&1)" && return 0
  grep -Eq '1130|1045|is not allowed to connect|Access denied' <<<"$out"
}
my_tcp() { mariadb --protocol=tcp -h127.0.0.1 -P3306 -uroot --password= --connect-timeout=3 "$@"; }
my_root_ok() { my_tcp -e 'select 1' >/dev/null 2>&1; }

if my_up; then
  log "MariaDB: already running on 127.0.0.1:3306"
else
  log "MariaDB: not running, starting /usr/sbin/mariadbd"
  # /run is a tmpfs: the socket/pid directory is gone after a reboot (systemd would recreate it).
  as_root install -d -o mysql -g mysql -m 0755 /run/mysqld
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  wait_until "MariaDB on 127.0.0.1:3306 (see /var/log/mysql/error.log if configured)" my_up
  log "MariaDB: up after $(elapsed "$T0")"
fi

if ! my_root_ok; then
  # Fresh Debian: root@localhost is unix_socket-only. Allow an empty password too (keeping
  # unix_socket), and add root@127.0.0.1 for servers running with skip-name-resolve.
  log "MariaDB: root cannot log in over TCP with an empty password; fixing it over the unix socket"
  as_root mariadb --protocol=socket -uroot <<'SQL' || die "MariaDB: could not log in as root over the unix socket to fix root's authentication"
ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('');
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
SQL
  my_root_ok || die "MariaDB: root still cannot log in over TCP with an empty password"
fi

my_tcp -e 'CREATE DATABASE IF NOT EXISTS test' || die "MariaDB: cannot create database test"
my_tcp -D test -e 'select 1' >/dev/null || die "MariaDB: cannot connect to database test"
log "MariaDB: ok  mysql://root@127.0.0.1:3306/test (empty password)"
log "databases ready in $(elapsed "$T0")"
