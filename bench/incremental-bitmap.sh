#!/usr/bin/env bash
# Incremental from a QEMU dirty bitmap (issue 15), against baselines measured in the same run
# (3 rounds, each a baseline then an incremental, all printed; the ratio of the best times):
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

# Change 1% of the stripes: 64 KiB at a random 64 KiB-aligned place in nstripes/100 distinct
# stripes. Each round writes new bytes at the same places (so its stripes are new: nothing is
# found already stored), measures the baseline and the incremental, and forgets the incremental
# (the next round builds on the first snapshot again, whose bitmap b1 keeps growing over the
# same places). Rounds: $ROUNDS (default 3); all are printed, and the best ratio.
changed=$((nstripes / 100))
for s in $(shuf -i 0-$((nstripes - 1)) -n "$changed"); do
  echo "$((s * stripe + (RANDOM % 64) * 65536))"
done > "$work/offsets.txt"
phase() { python3 -c "import json,sys; print('%.3f' % json.load(open(sys.argv[1]))['phases'][sys.argv[2]])" "$work/s2.json" "$1"; }
rounds=${ROUNDS:-3}
best_read=""; best_incr=""
report=()
for r in $(seq "$rounds"); do
  io=()
  for o in $(cat "$work/offsets.txt"); do io+=(-c "write -P $(( (r * 37) % 250 + 1 )) $o 64k"); done
  qemu-io -f qcow2 "${io[@]}" "$img" > /dev/null
  serve --bitmap b1
  # The dirty stripes, by libnbd's reading of the bitmap.
  nbdinfo --map=qemu:dirty-bitmap:b1 "$uri" \
    | awk -v s="$stripe" '$3 % 2 == 1 { for (o = int($1 / s); o <= int(($1 + $2 - 1) / s); o++) print o }' \
    | sort -un > "$work/dirty.txt"
  ndirty=$(wc -l < "$work/dirty.txt")

  # Baseline: libnbd reads exactly those stripes (1% of the disk) from the same export, cold;
  # timed inside nbdsh, after it connected (stricter than timing the command, python's start
  # included).
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
  new2=$(field new_stripes "$work/s2.json")
  grep -q '"changes_from": "dirty bitmap b1"' "$work/s2.json" || { echo "the bitmap was not used:"; cat "$work/s2.json"; exit 1; }
  ratio=$(echo "scale=2; $t_incr / $t_read" | bc)
  if [ -z "$best_read" ] || [ "$(echo "$t_read < $best_read" | bc)" = 1 ]; then best_read=$t_read; fi
  if [ -z "$best_incr" ] || [ "$(echo "$t_incr < $best_incr" | bc)" = 1 ]; then best_incr=$t_incr; fi
  dirty_bytes=$((ndirty * stripe))
  report+=("round $r: libnbd reading the $ndirty dirty stripes ${t_read}s; incremental ${t_incr}s = ${ratio}x;"
    "  bytes read $read2 ($stripes2 stripes, $new2 new) vs dirty stripes $dirty_bytes = $(echo "scale=3; $read2 / $dirty_bytes" | bc)x;"
    "  phases (s from the run's start): agents+source $(phase reached), plan $(phase planned), lease $(phase leased), read $(phase read), stored $(phase stored), committed $(phase committed)")
  sa forget "$(sed -n 's/.*"snapshot": *"\([0-9a-f]*\)".*/\1/p' "$work/s2.json" | head -1)" > /dev/null
  stop
done

serve --bitmap b1
# For scale: the same export read whole (no bitmap), cold.
drop; t0=$(now)
sa snapshot "$uri" --volume bench --json > "$work/s3.json"
t_full=$(secs "$t0" "$(now)")
stop

echo "4 GiB qcow2 (random data), $nstripes stripes of 4 MiB, $changed changed (1%) by 64 KiB each;"
echo "  qemu-nbd -B b1, 6 agents k=4 m=2; cold cache: $cold; $rounds rounds"
printf '%s\n' "${report[@]}"
echo "best of $rounds: incremental through dirty bitmap b1 ${best_incr}s vs libnbd reading the dirty stripes ${best_read}s = $(echo "scale=2; $best_incr / $best_read" | bc)x (goal <= 1.5x)"
echo "the same snapshot without the bitmap:      ${t_full}s  ($(echo "scale=1; $t_full / $t_incr" | bc)x the last incremental)"
