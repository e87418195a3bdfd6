#!/usr/bin/env bash
# DR benchmark: a 1 GiB volume (256 MiB random, 256 MiB text-like, 512 MiB zeros) is backed up; a
# standby volume is created from that backup (timed: the full restore); then 10 MiB change, a
# backup completes, and the time until the standby has applied it is measured (polling the API
# every 10 ms). Prints a markdown table.
#
# usage: bench/dr.sh   (needs: cargo build --release; qemu-utils, libnbd-bin)
set -euo pipefail
cd "$(dirname "$0")/.."
ZEBU=target/release/zebu
[ -x "$ZEBU" ] || { echo "build first: cargo build --release" >&2; exit 1; }
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zebu-drbench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
source bench/lib.sh
IMG=$WORK/image.raw
make_image "$IMG"
head -c 10M /dev/urandom >"$WORK/change.raw"

zebu_with_image 10951 10952 "$WORK/t" "$IMG"
B0=$("$ZEBU" backup create v --wait 2>/dev/null)
t0=$(now); "$ZEBU" volume create dr --from-backup "$B0" --standby --replicas 1 --wait >/dev/null 2>&1; t1=$(now)
FULL=$(secs "$t0" "$t1")
qemu-io -f raw "$URI" -c "write -s $WORK/change.raw 300M 10M" -c flush >/dev/null
B1=$("$ZEBU" backup create v --wait 2>/dev/null)
t0=$(now)
python3 - "$ZEBU_API" "$ZEBU_TOKEN" "$B1" <<'EOF'
import json, sys, time, urllib.request
api, token, want = sys.argv[1:]
req = urllib.request.Request(api + "/v1/volumes/dr", headers={"Authorization": "Bearer " + token})
deadline = time.time() + 120
while time.time() < deadline:
    v = json.load(urllib.request.urlopen(req))
    r = v["status"].get("restore", {})
    if r.get("lastRestoredBackup") == want and r.get("state") == "completed":
        sys.exit(0)
    time.sleep(0.01)
sys.exit("the standby did not apply the backup in 120 s")
EOF
t1=$(now)
INC=$(secs "$t0" "$t1")
"$ZEBU" volume activate dr >/dev/null
DURI=$("$ZEBU" volume attach dr)
nbdcopy "$DURI" "$WORK/dr.raw"
dd if="$WORK/change.raw" of="$IMG" bs=1M seek=300 conv=notrunc status=none
cmp -s "$IMG" "$WORK/dr.raw" || { echo "the activated standby differs from the source" >&2; exit 1; }
echo "| step | seconds |"
echo "|---|---|"
echo "| full restore into a new standby volume (1 GiB: 256 MiB random, 256 MiB text, 512 MiB zeros) | $FULL |"
echo "| backup of 10 MiB changed completed → standby has applied it | $INC |"
