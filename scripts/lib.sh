# Shared helpers of scripts/up and scripts/test: make sure Redis and
# PostgreSQL are installed and reachable on loopback, starting private ones
# under .data/ where none is running. Sourced, not executed.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/.data"
REDIS_PORT="${REDIS_PORT:-6379}"
PG_PORT="${PG_PORT:-5432}"
STARTED_REDIS=""
STARTED_PG=""

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

# Rust toolchain with rustfmt and clippy.
ensure_rust() {
  command -v cargo >/dev/null || die "cargo not found: install Rust 1.85 or newer (https://rustup.rs) and run this again"
  cargo fmt --version >/dev/null 2>&1 || { command -v rustup >/dev/null && rustup component add rustfmt; }
  cargo clippy --version >/dev/null 2>&1 || { command -v rustup >/dev/null && rustup component add clippy; }
}

# redis-server, redis-cli, PostgreSQL server and client, Mosquitto (broker
# for the load-test baselines, clients for the device examples).
ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  pg_bin_dir >/dev/null 2>&1 || missing+=(postgresql)
  command -v pg_isready >/dev/null || missing+=(postgresql-client)
  command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
  [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v gcc >/dev/null || missing+=(gcc)
  command -v curl >/dev/null || missing+=(curl ca-certificates)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

pg_bin_dir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; }

ensure_redis() {
  if redis_up; then log "Redis is running on 127.0.0.1:$REDIS_PORT"; return; fi
  mkdir -p "$DATA/redis"
  log "starting a private Redis on 127.0.0.1:$REDIS_PORT (data: .data/redis)"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$DATA/redis" --daemonize yes --pidfile "$DATA/redis/redis.pid" \
    --logfile "$DATA/redis/redis.log" >/dev/null
  STARTED_REDIS=1
  for _ in $(seq 1 100); do redis_up && return; sleep 0.1; done
  die "Redis did not start; see .data/redis/redis.log"
}

ensure_postgres() {
  if pg_up; then log "PostgreSQL is running on 127.0.0.1:$PG_PORT"; ensure_test_db; return; fi
  # A Debian cluster that is installed but stopped: start it.
  if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q " $PG_PORT "; then
    local ver name
    read -r ver name _ < <(pg_lsclusters -h | awk -v p="$PG_PORT" '$3==p')
    log "starting PostgreSQL cluster $ver/$name"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start || true
    for _ in $(seq 1 100); do pg_up && { ensure_test_db; return; }; sleep 0.1; done
  fi
  # Otherwise a private cluster under .data/postgres, trust auth on loopback.
  local bin; bin="$(pg_bin_dir)" || die "PostgreSQL is not installed"
  local dir="$DATA/postgres"
  mkdir -p "$dir"
  local run=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "user postgres missing (the postgresql package creates it)"
    chown -R postgres "$dir"
    run=(runuser -u postgres --)
  fi
  if [ ! -f "$dir/PG_VERSION" ]; then
    log "initialising a private PostgreSQL cluster in .data/postgres"
    "${run[@]}" "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  log "starting a private PostgreSQL on 127.0.0.1:$PG_PORT"
  "${run[@]}" "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k /tmp" start >/dev/null
  STARTED_PG=1
  for _ in $(seq 1 100); do pg_up && { ensure_test_db; return; }; sleep 0.1; done
  die "PostgreSQL did not start; see .data/postgres/server.log"
}

# The tests create their databases from postgres://postgres@127.0.0.1:PORT/test.
ensure_test_db() {
  local url="postgres://postgres@127.0.0.1:$PG_PORT"
  if ! psql "$url/postgres" -Atqc "select 1 from pg_database where datname='test'" 2>/dev/null | grep -q 1; then
    psql "$url/postgres" -qc "create database test" >/dev/null 2>&1 || true
  fi
  export TEST_DATABASE_URL="${TEST_DATABASE_URL:-$url/test}"
}

stop_started_services() {
  if [ -n "$STARTED_REDIS" ] && [ -f "$DATA/redis/redis.pid" ]; then
    log "stopping the private Redis"
    kill "$(cat "$DATA/redis/redis.pid")" 2>/dev/null || true
  fi
  if [ -n "$STARTED_PG" ]; then
    log "stopping the private PostgreSQL"
    local run=(); [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
    "${run[@]}" "$(pg_bin_dir)/pg_ctl" -D "$DATA/postgres" -m fast stop >/dev/null 2>&1 || true
  fi
}
