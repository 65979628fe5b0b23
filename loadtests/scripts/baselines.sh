#!/usr/bin/env bash
# Runs every baseline of BENCHMARKS.md with release builds and writes the
# JSON reports into a directory (default loadtests/results/).
#
#   loadtests/scripts/baselines.sh [OUTDIR]
#   ONLY=mosquitto loadtests/scripts/baselines.sh   (only names matching)
#
# Each command waits (up to WAIT_QUIET seconds, default 600) until the
# machine is quiet (CPU idle >= 85% over 3 s), because other work on a
# 2-core machine skews every figure; the load average is in each report.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-loadtests/results}"
mkdir -p "$out"
cargo build --release -p loadtests
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
  echo "== $name: $bench $*"
  "$bench" "$@" --report "$out/$name.json"
}

run seed-heartbeat seed-heartbeat
run seed-heartbeat-100k seed-heartbeat --devices 100000
run count-scan count-scan
run mosquitto-idle-10k mosquitto-idle -n 10000 -q
run mosquitto-idle-19500 mosquitto-idle -n 19500 -q
run mosquitto-idle-100k mosquitto-idle -n 100000 --brokers 6 --max-pending-connects 384 -q
