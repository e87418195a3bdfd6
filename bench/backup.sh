#!/usr/bin/env bash
# Backup benchmark: a 1 GiB volume holding 256 MiB random, 256 MiB text-like data and 512 MiB of
# zeros, backed up to a local directory (full), then 10 MiB changed and backed up again
# (incremental), then restored into a new volume. In the same run, restic backs up the same
# image file to a local repository, backs up the changed file, and restores it. Prints a
# markdown table with times, ratios, stored bytes and object counts.
#
# usage: bench/backup.sh   (needs: cargo build --release; apt-get install restic qemu-utils libnbd-bin)
set -euo pipefail
cd "$(dirname "$0")/.."
ZEBU=target/release/zebu
[ -x "$ZEBU" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v restic >/dev/null || { echo "restic is missing: apt-get install restic" >&2; exit 1; }
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zebu-bkbench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
source bench/lib.sh
IMG=$WORK/image.raw
make_image "$IMG"
CHANGE=$WORK/change.raw
head -c 10M /dev/urandom >"$CHANGE"
CHANGE_AT=$((300 << 20)) # inside the text-like part

# --- Zebu -----------------------------------------------------------------------------------
zebu_with_image 10931 10932 "$WORK/zt" "$IMG"
t0=$(now); B1=$("$ZEBU" backup create v --wait 2>/dev/null); t1=$(now)
Z_FULL=$(secs "$t0" "$t1")
Z_FULL_BYTES=$(du -sb "$WORK/zt" | cut -f1); Z_FULL_OBJS=$(find "$WORK/zt" -type f | wc -l)
qemu-io -f raw "$URI" -c "write -s $CHANGE $CHANGE_AT 10M" -c flush >/dev/null
t0=$(now); B2=$("$ZEBU" backup create v --wait 2>/dev/null); t1=$(now)
Z_INC=$(secs "$t0" "$t1")
Z_UPLOADED=$("$ZEBU" backup get "$B2" -o json | python3 -c 'import json,sys; b=json.load(sys.stdin)["status"]; print(b["blocks"]["uploaded"], b["blocks"]["present"], b["blocks"]["zero"])')
Z_BYTES=$(du -sb "$WORK/zt" | cut -f1); Z_OBJS=$(find "$WORK/zt" -type f | wc -l)
t0=$(now); "$ZEBU" volume create r --from-backup "$B2" --replicas 1 --wait >/dev/null 2>&1; t1=$(now)
Z_RESTORE=$(secs "$t0" "$t1")
RURI=$("$ZEBU" volume attach r)
nbdcopy "$RURI" "$WORK/restored.raw"
# restic works on a file: the same image, then the same change.
mkdir -p "$WORK/rdata"
cp "$IMG" "$WORK/rdata/image.raw"
dd if="$CHANGE" of="$IMG" bs=1M seek=$((CHANGE_AT >> 20)) conv=notrunc status=none
cmp -s "$IMG" "$WORK/restored.raw" || { echo "Zebu's restored volume differs from the changed image" >&2; exit 1; }
rm -f "$WORK/restored.raw"

# --- restic ---------------------------------------------------------------------------------
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$WORK/rr
restic init >/dev/null
t0=$(now); restic backup --quiet "$WORK/rdata/image.raw" >/dev/null; t1=$(now)
R_FULL=$(secs "$t0" "$t1")
R_FULL_BYTES=$(du -sb "$WORK/rr" | cut -f1); R_FULL_OBJS=$(find "$WORK/rr" -type f | wc -l)
dd if="$CHANGE" of="$WORK/rdata/image.raw" bs=1M seek=$((CHANGE_AT >> 20)) conv=notrunc status=none
t0=$(now); restic backup --quiet "$WORK/rdata/image.raw" >/dev/null; t1=$(now)
R_INC=$(secs "$t0" "$t1")
R_BYTES=$(du -sb "$WORK/rr" | cut -f1); R_OBJS=$(find "$WORK/rr" -type f | wc -l)
t0=$(now); restic restore --quiet latest --target "$WORK/rrest" >/dev/null; t1=$(now)
R_RESTORE=$(secs "$t0" "$t1")
cmp -s "$IMG" "$WORK/rrest$WORK/rdata/image.raw" || { echo "restic's restore differs" >&2; exit 1; }

ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
mib() { python3 -c "print(f'{$1/1048576:.1f} MiB')"; }
echo "| step | Zebu (s) | restic (s) | Zebu faster by |"
echo "|---|---|---|---|"
echo "| full backup, 1 GiB (256 MiB random, 256 MiB text, 512 MiB zeros) | $Z_FULL | $R_FULL | $(ratio "$R_FULL" "$Z_FULL") |"
echo "| incremental backup after 10 MiB changed | $Z_INC | $R_INC | $(ratio "$R_INC" "$Z_INC") |"
echo "| restore of the incremental backup | $Z_RESTORE | $R_RESTORE | $(ratio "$R_RESTORE" "$Z_RESTORE") |"
echo
echo "| store | after full: bytes | objects | after incremental: bytes | objects |"
echo "|---|---|---|---|---|"
echo "| Zebu (2 MiB blocks, zstd) | $(mib "$Z_FULL_BYTES") | $Z_FULL_OBJS | $(mib "$Z_BYTES") | $Z_OBJS |"
echo "| restic (repository v2, compression auto) | $(mib "$R_FULL_BYTES") | $R_FULL_OBJS | $(mib "$R_BYTES") | $R_OBJS |"
echo
echo "Zebu incremental blocks (uploaded present zero): $Z_UPLOADED"
