#!/usr/bin/env bash
# Manager at scale: one `zebu manager` (release build) on its redb store, NODES simulated nodes
# heartbeating over HTTP as node agents do (crates/zebu/examples/scale.rs), VOLUMES volumes of 3
# replicas created through the API. Prints create -> all replicas assigned p50/p99, heartbeat
# p50/p99 while creating and while idle, the manager's idle CPU, RSS and store size.
# Usage: bash bench/scale.sh [VOLUMES=10000] [NODES=100] [RUNS=1] [RATE=0 (creates/s; 0: unpaced)]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
VOLUMES=${1:-10000}
NODES=${2:-100}
RUNS=${3:-1}
RATE=${4:-0}
cargo build --release -q -p zebu --bin zebu --example scale
ZEBU=$PWD/target/release/zebu
SCALE=$PWD/target/release/examples/scale
WORK=$(mktemp -d /tmp/zebu-scale.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
for r in $(seq "$RUNS"); do
  rm -rf "$WORK/m"; mkdir -p "$WORK/m"
  "$ZEBU" manager --data-dir "$WORK/m" --api-listen 127.0.0.1:19660 >/dev/null 2>"$WORK/m.log" &
  PID=$!
  PIDS+=("$PID")
  wait_port 19660
  echo "run $r:"
  "$SCALE" --api http://127.0.0.1:19660 --token-file "$WORK/m/api-token" \
    --nodes "$NODES" --volumes "$VOLUMES" --pid "$PID" --idle-secs 20 --rate "$RATE"
  echo "manager RSS $(awk '/VmRSS/ {print $2, $3}' "/proc/$PID/status"); store $(du -h "$WORK/m/store.redb" | cut -f1)"
  kill "$PID"; wait "$PID" 2>/dev/null || true
done
