#!/usr/bin/env bash
# Idle cost of the control plane: a `zebu server` (release build) with N detached 16 MiB volumes
# of 3 replicas, created through the API; then the server's CPU over 20 s of doing nothing, its
# RSS and its store file. Usage: bash bench/idle.sh [N=1000] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
N=${1:-1000}
RUNS=${2:-3}
cargo build --release -q -p zebu
ZEBU=$PWD/target/release/zebu
WORK=$(mktemp -d /tmp/zebu-idle.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

mkdir -p "$WORK/z"
"$ZEBU" server --data-dir "$WORK/z" --api-listen 127.0.0.1:19650 --nbd-listen 127.0.0.1:19651 >/dev/null 2>"$WORK/z.log" &
PID=$!
PIDS+=("$PID")
wait_port 19650
TOKEN=$(cat "$WORK/z/api-token")
t0=$(now)
for i in $(seq "$N"); do
  curl -sf -o /dev/null -X POST -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d "{\"name\":\"v$i\",\"size\":16777216,\"replicas\":3}" http://127.0.0.1:19650/v1/volumes
done
t1=$(now)
# Settled: every volume detached.
while :; do
  left=$(curl -sf -H "Authorization: Bearer $TOKEN" http://127.0.0.1:19650/v1/volumes |
    python3 -c 'import json,sys; print(sum(1 for v in json.load(sys.stdin) if v["status"]["state"] != "detached"))')
  [ "$left" = 0 ] && break
  sleep 1
done
t2=$(now)
echo "created $N volumes in $(secs "$t0" "$t1") s; all detached $(secs "$t1" "$t2") s later"
sleep 5
for r in $(seq "$RUNS"); do
  a=$(ticks "$PID")
  sleep 20
  b=$(ticks "$PID")
  python3 -c "print(f'run $r: idle CPU {100*($b-$a)/$HZ/20:.1f} % of one core')"
done
echo "RSS $(awk '/VmRSS/ {print $2, $3}' "/proc/$PID/status"); store $(du -h "$WORK/z/store.redb" | cut -f1)"
