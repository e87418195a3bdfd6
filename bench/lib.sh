#!/usr/bin/env bash
# Shared by the backup benchmarks (sourced): helpers and the 1 GiB test image.

wait_port() { for _ in $(seq 400); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }

# make_image FILE: 256 MiB random, 256 MiB text-like lines (5,000-word vocabulary), 512 MiB zeros.
make_image() {
  head -c 256M /dev/urandom >"$1"
  python3 - "$1" <<'PY'
import random, sys
random.seed(7)
words = [''.join(random.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(random.randint(2, 10))) for _ in range(5000)]
out = open(sys.argv[1], 'ab')
left = 256 << 20
while left > 0:
    buf = bytearray()
    while len(buf) < (1 << 20):
        buf += (' '.join(random.choices(words, k=12)) + '.\n').encode()
    buf = bytes(buf[:min(1 << 20, left)])
    out.write(buf)
    left -= len(buf)
PY
  truncate -s 1G "$1"
}

# zebu_with_image API_PORT NBD_PORT TARGET_DIR IMAGE: starts a `zebu server` in $WORK/z (its pid
# added to PIDS), points the default backup target at TARGET_DIR, creates the 1-replica volume
# `v` holding IMAGE and sets URI to its NBD address. Needs ZEBU, WORK and PIDS.
zebu_with_image() {
  mkdir -p "$WORK/z"
  "$ZEBU" server --data-dir "$WORK/z" --api-listen 127.0.0.1:"$1" --nbd-listen 127.0.0.1:"$2" >/dev/null 2>"$WORK/z.log" & PIDS+=($!)
  wait_port "$1"
  export ZEBU_API=http://127.0.0.1:$1 ZEBU_TOKEN=$(cat "$WORK/z/api-token")
  "$ZEBU" backup-target update default --url "file://$3" >/dev/null
  "$ZEBU" volume create v --size 1GiB --replicas 1 --wait >/dev/null
  URI=$("$ZEBU" volume attach v)
  nbdcopy "$4" "$URI"
}
