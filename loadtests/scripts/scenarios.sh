#!/usr/bin/env bash
# Runs the phase-2 scenarios of BENCHMARKS.md with release builds and
# writes the JSON reports into a directory (default loadtests/results/).
#
#   IOT_BIN_DIR=/path/to/release loadtests/scripts/scenarios.sh [OUTDIR]
#   ONLY=presence loadtests/scripts/scenarios.sh     (only names matching)
#   BIG=1 loadtests/scripts/scenarios.sh             (also the 1M attempt)
#
# The service binaries (iot-ingest, iot-projector, iot-api) come from
# IOT_BIN_DIR (default: target/release, built here with cargo build
# --release --bins). Each command waits (up to WAIT_QUIET seconds, default
# 600) until the machine is quiet (CPU idle >= 85% over 3 s), as
# baselines.sh does; the load average is in each report.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-loadtests/results}"
mkdir -p "$out"
if [ -z "${IOT_BIN_DIR:-}" ]; then
  cargo build --release --bins
  export IOT_BIN_DIR="$PWD/target/release"
else
  cargo build --release -p loadtests
fi
bench=target/release/iot-bench

idle_pct() {
  local a b
  read -r _ u n s i w x y z _ < /proc/stat; a=$((u+n+s+i+w+x+y+z)); ai=$((i+w))
  sleep 3
  read -r _ u n s i w x y z _ < /proc/stat; b=$((u+n+s+i+w+x+y+z)); bi=$((i+w))
  echo $(( 100 * (bi - ai) / (b - a) ))
}

wait_quiet() {
  local deadline=$((SECONDS + ${WAIT_QUIET:-600}))
  while [ "$(idle_pct)" -lt 85 ] && [ $SECONDS -lt $deadline ]; do :; done
}

run() {
  local name=$1; shift
  [[ -z "${ONLY:-}" || "$name" == *"$ONLY"* ]] || return 0
  wait_quiet
  echo "== $name: $bench $* (load $(cut -d' ' -f1-3 /proc/loadavg))"
  "$bench" "$@" -q --report "$out/$name.json"
}

run ingest-idle ingest-idle -n 19500
run connect-storm connect-storm -n 19000
run capacity-100k capacity -n 100000 --ingests 6 --hold 60s
run steady-state steady-state -n 38000 --ingests 2 --ping-interval 1s
run steady-state-half steady-state -n 19000 --ping-interval 1s --no-seed
run steady-state-10hz steady-state -n 19000 --ping-interval 100ms
run presence presence
run api-reads api-reads
run downlinks downlinks
run failover failover
if [ -n "${BIG:-}" ]; then
  big=(--ingests 0 --ping-interval 60s --check-every 5s --max-pending-connects 512)
  run capacity-300k capacity -n 300000 "${big[@]}" --hold 30s --settle-limit 300s
  run capacity-500k capacity -n 500000 "${big[@]}" --hold 30s --settle-limit 400s
  run capacity-1m capacity -n 1000000 --ingests 0 --ping-interval 60s --check-every 10s \
    --max-pending-connects 1024 --hold 60s --connect-limit 900s --settle-limit 600s
fi
