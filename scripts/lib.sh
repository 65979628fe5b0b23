# shellcheck shell=bash
# Shared helpers of scripts/up and scripts/test: make sure Redis and
# PostgreSQL are installed and usable on loopback, starting private ones
# where none is. Sourced, not executed.
#
# What "usable" means: Redis answers PING without a password; PostgreSQL
# accepts a TCP login as user postgres without a password (what the tests
# and the local stack use). A server that is running but asks for a
# password is left alone: a private one on another port is used instead.
#
# Results, read by the scripts (and the tests):
#   REDIS_URL            redis://127.0.0.1:PORT/0 of the Redis chosen
#   TEST_DATABASE_URL    postgres://postgres@127.0.0.1:PORT/test of the
#                        PostgreSQL chosen (test-support creates its test
#                        databases from it; scripts/up uses it as DATABASE_URL)
#
# Overrides (environment):
#   REDIS_PORT=6379      the port probed for a running Redis
#   PG_PORT=5432         the port probed for a running PostgreSQL
#   TEST_DATABASE_URL    use this PostgreSQL as it is (it may carry a
#                        password); nothing is probed or started
#   PG_BIN_DIR           PostgreSQL server binaries (initdb, pg_ctl)
# Private servers that are not on the probed port take the first free port
# from 16379 (Redis) and 15432 (PostgreSQL) upward.
#
# Call stop_started_services on exit (the scripts trap EXIT): it stops
# exactly the servers this run started and nothing else.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/.data"
REDIS_PORT="${REDIS_PORT:-6379}"
PG_PORT="${PG_PORT:-5432}"
# What this run started, for stop_started_services.
STARTED_REDIS_PID=""
STARTED_REDIS_PORT=""
STARTED_PG_DIR=""
STARTED_PG_BIN=""
STARTED_PG_CLUSTER=""

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found: install $* yourself"
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  log "installing $* from Debian packages"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The minimum Rust version, from the workspace Cargo.toml.
rust_min_version() { sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$ROOT/Cargo.toml"; }

# Rust toolchain (the workspace's rust-version or newer) with rustfmt and clippy.
ensure_rust() {
  local min; min="$(rust_min_version)"
  { command -v cargo >/dev/null && command -v rustc >/dev/null; } ||
    die "cargo not found: install Rust $min or newer (https://rustup.rs) and run this again"
  local ver; ver="$(rustc --version | awk '{print $2}')"
  if [ "$(printf '%s\n%s\n' "$min" "${ver%%-*}" | sort -V | sed -n 1p)" != "$min" ]; then
    if command -v rustup >/dev/null; then
      die "Rust $ver is older than $min, which the locked dependencies need: run 'rustup update stable'"
    fi
    die "Rust $ver is older than $min, which the locked dependencies need: install a newer Rust (https://rustup.rs)"
  fi
  local tool component
  for tool in fmt clippy; do
    component="$tool"; [ "$tool" = fmt ] && component=rustfmt
    cargo "$tool" --version >/dev/null 2>&1 && continue
    command -v rustup >/dev/null ||
      die "$component is missing ('cargo $tool' does not run) and rustup is not installed: install Rust through rustup (https://rustup.rs), or add $component to your Rust toolchain"
    log "installing $component (rustup component add $component)"
    rustup component add "$component" || die "'rustup component add $component' failed; run it yourself"
    cargo "$tool" --version >/dev/null 2>&1 || die "'cargo $tool' still does not run after 'rustup component add $component'"
  done
}

# redis-server, redis-cli, PostgreSQL server and client, Mosquitto (broker
# for the load-test baselines, clients for the device examples).
ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  pg_bin_dir >/dev/null 2>&1 || missing+=(postgresql)
  { command -v pg_isready >/dev/null && command -v psql >/dev/null; } || missing+=(postgresql-client)
  command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
  [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v gcc >/dev/null || missing+=(gcc)
  command -v curl >/dev/null || missing+=(curl ca-certificates)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# The newest PostgreSQL server binaries (PG_BIN_DIR wins).
pg_bin_dir() {
  if [ -n "${PG_BIN_DIR:-}" ]; then
    [ -x "$PG_BIN_DIR/initdb" ] && { echo "$PG_BIN_DIR"; return 0; }
    return 1
  fi
  local d
  d="$(for b in /usr/lib/postgresql/*/bin; do [ -x "$b/initdb" ] && echo "$b"; done | sort -V | tail -n1)"
  [ -n "$d" ] && { echo "$d"; return 0; }
  command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

# Something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# The first free loopback port from $1 upward.
free_port() {
  local p="$1"
  while port_in_use "$p"; do
    p=$((p + 1))
    [ "$p" -lt $(($1 + 100)) ] || die "no free port in $1..$p"
  done
  echo "$p"
}

# ---- Redis ---------------------------------------------------------------

# Redis on 127.0.0.1:$1 answers PING without a password.
redis_usable() {
  [ "$(env -u REDISCLI_AUTH timeout 3 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]
}

ensure_redis() {
  local port="$REDIS_PORT"
  if redis_usable "$port"; then
    log "Redis: using the server running on 127.0.0.1:$port"
  else
    if port_in_use "$port"; then
      local other; other="$(free_port 16379)"
      log "Redis: 127.0.0.1:$port is in use but does not answer PING without a password; leaving it alone and starting a private redis-server on 127.0.0.1:$other"
      port="$other"
    fi
    start_private_redis "$port"
  fi
  REDIS_PORT="$port"
  export REDIS_URL="redis://127.0.0.1:$port/0"
}

# A redis-server on 127.0.0.1:$1 without persistence, in its own session
# (a Ctrl-C reaches the services first; stop_started_services stops it).
start_private_redis() {
  local port="$1" dir="$DATA/redis-$1"
  mkdir -p "$dir"
  log "Redis: starting a private redis-server on 127.0.0.1:$port (log: ${dir#"$ROOT"/}/redis.log)"
  setsid redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir "$dir" --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
  STARTED_REDIS_PID=$!
  STARTED_REDIS_PORT="$port"
  for _ in $(seq 1 100); do
    redis_usable "$port" && return
    kill -0 "$STARTED_REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  die "the private Redis did not start on 127.0.0.1:$port; see ${dir#"$ROOT"/}/redis.log"
}

# ---- PostgreSQL ----------------------------------------------------------

# psql that never prompts for a password, ignores ~/.pgpass and
# PGPASSWORD, and gives up connecting after 5 s.
psql_nopw() {
  env -u PGPASSWORD PGPASSFILE=/nonexistent/pgpass PGCONNECT_TIMEOUT=5 psql -X -w -Atq "$@"
}

# A TCP login as postgres without a password works on 127.0.0.1:$1.
pg_login_ok() {
  [ "$(psql_nopw "postgres://postgres@127.0.0.1:$1/postgres" -c 'select 1' 2>/dev/null)" = 1 ]
}

# PostgreSQL on 127.0.0.1:$1 accepts connections (no login), within 30 s.
pg_wait_ready() {
  for _ in $(seq 1 300); do
    pg_isready -q -h 127.0.0.1 -p "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

ensure_postgres() {
  if [ -n "${TEST_DATABASE_URL:-}" ]; then
    psql_nopw "$TEST_DATABASE_URL" -c 'select 1' >/dev/null ||
      die "TEST_DATABASE_URL=$TEST_DATABASE_URL does not accept a login (without a password prompt); fix it, or unset it to let this script find or start a PostgreSQL"
    log "PostgreSQL: using TEST_DATABASE_URL=$TEST_DATABASE_URL"
    export TEST_DATABASE_URL
    return
  fi
  local port="$PG_PORT"
  if pg_login_ok "$port"; then
    log "PostgreSQL: using the server running on 127.0.0.1:$port (user postgres, no password)"
  elif port_in_use "$port"; then
    log "PostgreSQL: the server on 127.0.0.1:$port refuses a passwordless login as postgres (its pg_hba.conf asks for a password); leaving it alone and using a private cluster on another port (or set TEST_DATABASE_URL with a password)"
    start_private_pg "$(free_port 15432)"
  else
    local cluster; cluster="$(debian_cluster_down_on "$port")"
    if [ -n "$cluster" ]; then
      log "PostgreSQL: starting the stopped Debian cluster $cluster on port $port"
      STARTED_PG_CLUSTER="$cluster"
      # shellcheck disable=SC2086 # "version name"
      as_root pg_ctlcluster --skip-systemctl-redirect $cluster start ||
        log "PostgreSQL: 'pg_ctlcluster $cluster start' failed"
      if pg_wait_ready "$port" && pg_login_ok "$port"; then
        log "PostgreSQL: using the Debian cluster $cluster on 127.0.0.1:$port (stopped again on exit)"
      else
        log "PostgreSQL: the Debian cluster $cluster refuses a passwordless login as postgres on 127.0.0.1:$port (on a fresh install its pg_hba.conf asks for a password); stopping it again and using a private cluster"
        stop_debian_cluster
        start_private_pg "$(free_port 15432)"
      fi
    else
      start_private_pg "$port"
    fi
  fi
  ensure_test_db
}

# "version name" of a stopped Debian cluster configured on port $1, if any.
debian_cluster_down_on() {
  command -v pg_lsclusters >/dev/null || return 0
  # awk reads all of its input: an early exit would fail the pipe (pipefail).
  pg_lsclusters -h 2>/dev/null | awk -v p="$1" '!found && $3 == p && $4 == "down" { print $1, $2; found = 1 }' || true
}

stop_debian_cluster() {
  [ -n "$STARTED_PG_CLUSTER" ] || return 0
  log "stopping the Debian PostgreSQL cluster $STARTED_PG_CLUSTER"
  # shellcheck disable=SC2086 # "version name"
  as_root pg_ctlcluster --skip-systemctl-redirect $STARTED_PG_CLUSTER stop >/dev/null 2>&1 ||
    log "'pg_ctlcluster $STARTED_PG_CLUSTER stop' failed; stop it yourself"
  STARTED_PG_CLUSTER=""
}

# PostgreSQL refuses to run as root: as root, its tools run as the postgres
# user, and the cluster must live where that user can reach it.
PG_RUN=()
pg_private_dir() {
  PG_DIR="$DATA/postgres"
  mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] || { mkdir -p "$PG_DIR"; return 0; }
  id postgres >/dev/null 2>&1 || die "user postgres missing (the postgresql package creates it)"
  PG_RUN=(runuser -u postgres --)
  if runuser -u postgres -- test -x "$DATA"; then
    mkdir -p "$PG_DIR"
    chown -R postgres "$PG_DIR"
    chmod 700 "$PG_DIR"
    return 0
  fi
  # The clone is in a directory the postgres user cannot enter (e.g. under
  # /root, mode 700): keep the cluster in /var/tmp, one per clone.
  PG_DIR="/var/tmp/iot-session-pg-$(printf '%s' "$ROOT" | md5sum | cut -c1-12)"
  [ -L "$PG_DIR" ] && die "$PG_DIR is a symlink; remove it"
  [ -d "$PG_DIR" ] || install -d -o postgres -m 700 "$PG_DIR"
  [ "$(stat -c %U "$PG_DIR")" = postgres ] || die "$PG_DIR is not owned by postgres; remove it"
  printf '%s\n' "$PG_DIR" >"$DATA/postgres-dir"
  log "PostgreSQL: the postgres user cannot reach $DATA, so the private cluster lives in $PG_DIR (recorded in .data/postgres-dir)"
}

# A private cluster with trust auth on 127.0.0.1:$1 (initialised once).
start_private_pg() {
  local port="$1" bin
  bin="$(pg_bin_dir)" || die "PostgreSQL server binaries not found (install postgresql, or set PG_BIN_DIR)"
  pg_private_dir
  if [ ! -f "$PG_DIR/PG_VERSION" ]; then
    log "PostgreSQL: initialising a private cluster in $PG_DIR (trust auth, user postgres)"
    "${PG_RUN[@]}" "$bin/initdb" -D "$PG_DIR" -U postgres --auth=trust -E UTF8 >"$DATA/initdb.log" 2>&1 ||
      die "initdb failed; see .data/initdb.log"
  fi
  # Already running (another run of these scripts): use it, leave it running.
  if "${PG_RUN[@]}" "$bin/pg_ctl" -D "$PG_DIR" status >/dev/null 2>&1; then
    local running; running="$(sed -n 4p "$PG_DIR/postmaster.pid")"
    pg_login_ok "$running" ||
      die "the private cluster in $PG_DIR runs on port $running but refuses a login; stop it: ${PG_RUN[*]} $bin/pg_ctl -D $PG_DIR stop"
    log "PostgreSQL: using the private cluster already running on 127.0.0.1:$running (another run started it; this one leaves it running)"
    PG_PORT="$running"
    return
  fi
  log "PostgreSQL: starting a private cluster on 127.0.0.1:$port (data: $PG_DIR)"
  STARTED_PG_DIR="$PG_DIR"
  STARTED_PG_BIN="$bin"
  "${PG_RUN[@]}" "$bin/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k /tmp" start >/dev/null ||
    die "the private PostgreSQL did not start; see $PG_DIR/server.log"
  pg_login_ok "$port" || die "the private PostgreSQL on 127.0.0.1:$port refuses a login; see $PG_DIR/server.log"
  PG_PORT="$port"
}

# The tests create their databases from postgres://postgres@127.0.0.1:PORT/test.
ensure_test_db() {
  local admin="postgres://postgres@127.0.0.1:$PG_PORT"
  local exists="select count(*) from pg_database where datname = 'test'"
  if [ "$(psql_nopw "$admin/postgres" -c "$exists")" != 1 ]; then
    # Another run may create it at the same moment: check again on failure.
    psql_nopw "$admin/postgres" -c "create database test" >/dev/null 2>&1 ||
      [ "$(psql_nopw "$admin/postgres" -c "$exists")" = 1 ] ||
      die "cannot create database test on 127.0.0.1:$PG_PORT"
  fi
  export TEST_DATABASE_URL="$admin/test"
  log "PostgreSQL: TEST_DATABASE_URL=$TEST_DATABASE_URL"
}

# Stops exactly what this run started (private Redis, private PostgreSQL, a
# Debian cluster it started); servers that were running are left alone.
stop_started_services() {
  if [ -n "$STARTED_REDIS_PID" ]; then
    log "stopping the private Redis on 127.0.0.1:$STARTED_REDIS_PORT"
    kill -TERM "$STARTED_REDIS_PID" 2>/dev/null || true
    wait "$STARTED_REDIS_PID" 2>/dev/null || true
    STARTED_REDIS_PID=""
  fi
  if [ -n "$STARTED_PG_DIR" ]; then
    local ctl=("${PG_RUN[@]}" "$STARTED_PG_BIN/pg_ctl" -D "$STARTED_PG_DIR")
    # A start cut short by Ctrl-C may still be writing its pid file.
    for _ in 1 2 3; do
      "${ctl[@]}" status >/dev/null 2>&1 && break
      sleep 0.5
    done
    if "${ctl[@]}" status >/dev/null 2>&1; then
      log "stopping the private PostgreSQL ($STARTED_PG_DIR)"
      "${ctl[@]}" -m fast -w stop >/dev/null 2>&1 ||
        log "the private PostgreSQL in $STARTED_PG_DIR did not stop; stop it: pg_ctl -D $STARTED_PG_DIR stop"
    fi
    STARTED_PG_DIR=""
  fi
  stop_debian_cluster
}
