#!/usr/bin/env bash
# Data-path benchmark: fio's nbd engine against a Zebu volume with 1 and 3 replicas (`zebu
# server`) and against qemu-nbd serving a raw file on the same disk with --cache=none
# --aio=native (as VMs use it; ratios are to this one) and in writeback mode (a second column),
# in one run. Prints a markdown table of IOPS and ratios.
#
# usage: bench/fio.sh [RUNTIME_SECONDS]   (default 15; needs a release build: cargo build --release)
#   MODE=cluster: a manager and three `zebu node` processes instead of `zebu server`; the
#   1-replica volume's replica is kept off the engine's node (n1), so it is reached over TCP;
#   the 3-replica volume has one replica on each node. ZEBU=PATH picks another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-15}
SIZE=1GiB
ZEBU=${ZEBU:-target/release/zebu}
[ -x "$ZEBU" ] || { echo "build first: cargo build --release" >&2; exit 1; }
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zebu-bench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# name rw bs iodepth
JOBS=("randread4k randread 4k 16" "randwrite4k randwrite 4k 16" "seqread1m read 1M 16" "seqwrite1m write 1M 16" "randread4k-qd1 randread 4k 1" "randwrite4k-qd1 randwrite 4k 1")

# ONLY=job1,job2 and REPLICAS="1 3" narrow a run.
if [ -n "${ONLY:-}" ]; then
  sel=(); for j in "${JOBS[@]}"; do set -- $j; [[ ",$ONLY," == *",$1,"* ]] && sel+=("$j"); done; JOBS=("${sel[@]}")
fi

run_fio() { # uri name rw bs qd -> "iops bw_kib lat_us"
  fio --name="$2" --ioengine=nbd --uri="$1" --rw="$3" --bs="$4" --iodepth="$5" --size=1G \
      --time_based --runtime="$RUNTIME" --ramp_time=2 --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1
  python3 -c '
import json,sys
j=json.load(open(sys.argv[1]))["jobs"][0]
side=j["read"] if j["read"]["io_bytes"]>0 else j["write"]
print(side["iops"], side["bw"], side["lat_ns"]["mean"]/1000)' "$WORK/fio.json"
}

# The prefill's dirty pages are written back before measuring (`sync`), so no peer measures
# the writeback of its own prefill.
prefill() { fio --name=fill --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=16 --size=1G >/dev/null 2>&1; sync; }

declare -A R
measure() { # label uri
  local label=$1 uri=$2
  prefill "$uri"
  for j in "${JOBS[@]}"; do
    set -- $j
    R["$label/$1"]=$(run_fio "$uri" "$1" "$2" "$3" "$4")
  done
}

# qemu-nbd on a raw file on the same disk: O_DIRECT with native AIO, then writeback.
truncate -s 1G "$WORK/raw.img"
qemu-nbd -f raw -t --cache=none --aio=native -b 127.0.0.1 -p 10901 -x exp "$WORK/raw.img" & PIDS+=($!)
wait_port 10901
measure qemu "nbd://127.0.0.1:10901/exp"
truncate -s 1G "$WORK/rawwb.img"
qemu-nbd -f raw -t -b 127.0.0.1 -p 10902 -x exp "$WORK/rawwb.img" & PIDS+=($!)
wait_port 10902
measure qemuwb "nbd://127.0.0.1:10902/exp"

healthy() { for _ in $(seq 300); do "$ZEBU" volume get "$1" -o json | grep -q '"robustness": "healthy"' && return 0; sleep 0.1; done; }

if [ "${MODE:-server}" = cluster ]; then
  mkdir -p "$WORK/m"
  "$ZEBU" manager --data-dir "$WORK/m" --api-listen 127.0.0.1:10930 >/dev/null 2>"$WORK/m.log" & PIDS+=($!)
  wait_port 10930
  export ZEBU_API=http://127.0.0.1:10930 ZEBU_TOKEN=$(cat "$WORK/m/api-token")
  for i in 1 2 3; do
    "$ZEBU" node --manager "$ZEBU_API" --data-dir "$WORK/n$i" --name "n$i" --nbd-listen 127.0.0.1:1094$i \
      --metrics-listen 127.0.0.1:1095$i >/dev/null 2>"$WORK/n$i.log" & PIDS+=($!)
  done
  for _ in $(seq 200); do [ "$("$ZEBU" node list -o json | grep -c '"state": "up"')" = 3 ] && break; sleep 0.1; done
  for n in ${REPLICAS:-3 1}; do
    # The 1-replica volume's replica goes to n2 or n3: reached over TCP from the engine on n1.
    [ "$n" = 1 ] && "$ZEBU" node update n1 --scheduling false >/dev/null
    "$ZEBU" volume create "b$n" --size $SIZE --replicas $n --wait >/dev/null
    uri=$("$ZEBU" volume attach "b$n" --node n1)
    healthy "b$n"
    measure "zebu$n" "$uri"
  done
else
  for n in ${REPLICAS:-1 3}; do
    mkdir -p "$WORK/z$n"
    "$ZEBU" server --data-dir "$WORK/z$n" --api-listen 127.0.0.1:1092$n --nbd-listen 127.0.0.1:1091$n >/dev/null 2>"$WORK/z$n.log" & PIDS+=($!)
    wait_port 1092$n
    export ZEBU_API=http://127.0.0.1:1092$n ZEBU_TOKEN=$(cat "$WORK/z$n/api-token")
    "$ZEBU" volume create "b$n" --size $SIZE --replicas $n --wait >/dev/null
    uri=$("$ZEBU" volume attach "b$n")
    # Every replica in the set before measuring.
    healthy "b$n"
    measure "zebu$n" "$uri"
  done
fi

echo "| job | qemu-nbd none/native IOPS | qemu-nbd writeback IOPS | Zebu 1 replica IOPS | ratio | Zebu 3 replicas IOPS | ratio | qemu-nbd lat µs | Zebu 1r lat µs | Zebu 3r lat µs |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for j in "${JOBS[@]}"; do
  set -- $j
  read -r qi qb ql <<<"${R[qemu/$1]}"; read -r wi wb wl <<<"${R[qemuwb/$1]}"
  read -r ai ab al <<<"${R[zebu1/$1]:-0 0 0}"; read -r ci cb cl <<<"${R[zebu3/$1]:-0 0 0}"
  python3 - "$1" "$qi" "$wi" "$ai" "$ci" "$ql" "$al" "$cl" <<'PY'
import sys
n,q,w,a,c,ql,al,cl=sys.argv[1],*map(float,sys.argv[2:])
print(f"| {n} | {q:,.0f} | {w:,.0f} | {a:,.0f} | {a/q:.2f}× | {c:,.0f} | {c/q:.2f}× | {ql:,.0f} | {al:,.0f} | {cl:,.0f} |")
PY
done
