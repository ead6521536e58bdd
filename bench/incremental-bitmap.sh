#!/usr/bin/env bash
# Incremental from a QEMU dirty bitmap (issue 15), against baselines measured in the same run:
#   a 4 GiB qcow2 full of random data, snapshotted through `qemu-nbd` with --new-bitmap b1; then
#   1% of its stripes changed through qemu-io (64 KiB at a random place in each of 10 of the 1024
#   4 MiB stripes), exported again with `qemu-nbd -B b1`, and:
#   - the incremental `sa-image snapshot --dirty-bitmap b1` (cold page cache): wall time of the
#     whole command (agents, catalog, bitmap, read, encode, upload, commit), vs the time libnbd
#     (nbdsh, timed after it connected) takes to read those same dirty stripes -- 1% of the
#     disk -- from the same export (cold page cache);
#   - its bytes read from the source vs the dirty stripes' bytes (from nbdinfo --map);
#   - the same snapshot without the bitmap (reads the whole export), for scale.
# Usage: bench/incremental-bitmap.sh [WORKDIR]   (needs: cargo build --release; qemu-utils,
#   libnbd-bin, python3-libnbd; root for drop_caches, else the "cold" runs are warm and it says so)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bitmap.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cold=yes
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || cold=no; }
now() { date +%s.%N; }
secs() { echo "scale=3; ($2 - $1) / 1" | bc; }
field() { sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" "$2" | head -1; }
nbdsh() { PATH=/usr/bin:$PATH command nbdsh "$@"; }   # Debian's nbdsh needs the system python

"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
addrs=""
for i in 1 2 3 4 5 6; do
  mkdir -p "$work/a$i"
  "$bin/shard-agent" --dir "$work/a$i" --listen "127.0.0.$((i+1)):0" --owner "$owner" --min-free 2G > "$work/a$i.out" 2>"$work/a$i.log" &
  pids+=($!)
done
for i in 1 2 3 4 5 6; do
  for _ in $(seq 100); do grep -q listening "$work/a$i.out" 2>/dev/null && break; sleep 0.05; done
  addrs="$addrs${addrs:+,}$(sed -n 's/^listening on //p' "$work/a$i.out")"
done
sa() { "$bin/sa-image" "$@" --key "$work/key" --agents "$addrs" --cache-dir "$work/cache"; }

size=$((4 << 30)); stripe=$((4 << 20)); nstripes=$((size / stripe))
img="$work/disk.qcow2"
head -c "$size" /dev/urandom > "$work/disk.raw"
qemu-img convert -q -f raw -O qcow2 "$work/disk.raw" "$img"
rm -f "$work/disk.raw"
qemu-img bitmap --add --enable "$img" b1

sock="$work/nbd.sock"
serve() {   # serve [qemu-nbd flags...]
  rm -f "$sock"
  qemu-nbd --read-only --persistent --shared=8 -f qcow2 --socket "$sock" "$@" "$img" 2>>"$work/qemu-nbd.log" &
  qpid=$!; pids+=($qpid)
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
}
stop() { kill "$qpid"; wait "$qpid" 2>/dev/null || true; }
uri="nbd+unix:///?socket=$sock"

serve
sa snapshot "$uri" --volume bench --new-bitmap b1 --json > "$work/s1.json"
stop

# Change 1% of the stripes: 64 KiB at a random 64 KiB-aligned place in nstripes/100 distinct stripes.
changed=$((nstripes / 100))
io=()
for s in $(shuf -i 0-$((nstripes - 1)) -n "$changed"); do
  io+=(-c "write -P $((s % 250 + 1)) $((s * stripe + (RANDOM % 64) * 65536)) 64k")
done
qemu-io -f qcow2 "${io[@]}" "$img" > /dev/null

serve --bitmap b1
# The dirty stripes, by libnbd's reading of the bitmap.
nbdinfo --map=qemu:dirty-bitmap:b1 "$uri" \
  | awk -v s="$stripe" '$3 % 2 == 1 { for (o = int($1 / s); o <= int(($1 + $2 - 1) / s); o++) print o }' \
  | sort -un > "$work/dirty.txt"
ndirty=$(wc -l < "$work/dirty.txt")

# Baseline: libnbd reads exactly those stripes (1% of the disk) from the same export, cold; timed
# inside nbdsh, after it connected (stricter than timing the command, python's start included).
drop
t_read=$(nbdsh -u "$uri" -c "
import time
t = time.monotonic()
for line in open('$work/dirty.txt'):
    s = int(line)
    h.pread($stripe, s * $stripe)
print('%.3f' % (time.monotonic() - t))
")

drop; t0=$(now)
sa snapshot "$uri" --volume bench --dirty-bitmap b1 --new-bitmap b2 --json > "$work/s2.json"
t_incr=$(secs "$t0" "$(now)")
read2=$(field bytes_read "$work/s2.json"); stripes2=$(field stripes_read "$work/s2.json")
grep -q '"changes_from": "dirty bitmap b1"' "$work/s2.json" || { echo "the bitmap was not used:"; cat "$work/s2.json"; exit 1; }

# For scale: the same export read whole (no bitmap), cold.
drop; t0=$(now)
sa snapshot "$uri" --volume bench --json > "$work/s3.json"
t_full=$(secs "$t0" "$(now)")
stop

dirty_bytes=$((ndirty * stripe))
echo "4 GiB qcow2 (random data), $nstripes stripes of 4 MiB, $changed changed (1%) by 64 KiB each;"
echo "  qemu-nbd -B b1, 6 agents k=4 m=2; cold cache: $cold"
echo "libnbd reading the $ndirty dirty stripes (1% of the disk): ${t_read}s"
echo "incremental through dirty bitmap b1:       ${t_incr}s  ($(echo "scale=2; $t_incr / $t_read" | bc)x the 1% read)"
echo "  bytes read from the source: $read2 ($stripes2 stripes) vs dirty stripes $dirty_bytes ($ndirty) = $(echo "scale=3; $read2 / $dirty_bytes" | bc)x"
phase() { python3 -c "import json,sys; print('%.3f' % json.load(open(sys.argv[1]))['phases'][sys.argv[2]])" "$work/s2.json" "$1"; }
echo "  its phases, seconds from the start of the run (the command's own start not counted):"
echo "    source + agents reached $(phase reached), base + bitmap + zeroes $(phase planned), lease $(phase leased),"
echo "    last stripe read $(phase read), every stripe stored $(phase stored), committed $(phase committed)"
echo "the same snapshot without the bitmap:      ${t_full}s  ($(echo "scale=1; $t_full / $t_incr" | bc)x the incremental)"
