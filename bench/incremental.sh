#!/usr/bin/env bash
# Incremental figures for issue 5, each against a baseline measured in the same run:
#   second snapshot of a 4 GiB image with 1% of its stripes changed (no hint), vs reading the
#     image once (`cat img > /dev/null`), both from a cold page cache; bytes sent vs 1% x 1.5 x 4 GiB;
#   the same second snapshot with a changed-map hint, vs the first snapshot's time;
#   `restic backup --stdin` of the changed image into a repository that holds the first one.
# Usage: bench/incremental.sh [WORKDIR]   (needs: cargo build --release; restic; root for
#   drop_caches, else the "cold" runs are warm and the script says so)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-inc.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cold=yes
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || cold=no; }
now() { date +%s.%N; }
secs() { echo "scale=2; ($2 - $1) / 1" | bc; }
field() { sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" "$2" | head -1; }

"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
addrs=""
for i in 1 2 3 4 5 6; do
  mkdir -p "$work/a$i"
  "$bin/shard-agent" --dir "$work/a$i" --listen "127.0.0.$((i+1)):0" --owner "$owner" > "$work/a$i.out" 2>"$work/a$i.log" &
  pids+=($!)
done
for i in 1 2 3 4 5 6; do
  for _ in $(seq 100); do grep -q listening "$work/a$i.out" 2>/dev/null && break; sleep 0.05; done
  addrs="$addrs${addrs:+,}$(sed -n 's/^listening on //p' "$work/a$i.out")"
done
sa() { "$bin/sa-image" "$@" --key "$work/key" --agents "$addrs"; }

img="$work/disk.img"
size=$((4 << 30)); stripe=$((4 << 20)); nstripes=$((size / stripe))
head -c "$size" /dev/urandom > "$img"

drop; t0=$(now)
sa snapshot "$img" --volume bench --cache-dir "$work/cache" --json > "$work/s1.json"
t_first=$(secs "$t0" "$(now)")
s1=$(sed -n 's/.*"snapshot": *"\([0-9a-f]*\)".*/\1/p' "$work/s1.json")
cp "$img" "$work/orig.img"   # for restic's first backup

# Change 1% of the stripes: 4 KiB at a random place in each of nstripes/100 distinct stripes.
changed=$((nstripes / 100))
: > "$work/changed.map"
for s in $(shuf -i 0-$((nstripes - 1)) -n "$changed"); do
  off=$((s * stripe + (RANDOM % 1000) * 4096))
  dd if=/dev/urandom of="$img" bs=4096 count=1 seek=$((off / 4096)) conv=notrunc status=none
  echo "$off 4096" >> "$work/changed.map"
done

drop; t0=$(now); cat "$img" > /dev/null; t_cat=$(secs "$t0" "$(now)")

drop; t0=$(now)
sa snapshot "$img" --volume bench --cache-dir "$work/cache" --json > "$work/s2.json"
t_second=$(secs "$t0" "$(now)")
s2=$(sed -n 's/.*"snapshot": *"\([0-9a-f]*\)".*/\1/p' "$work/s2.json")
sent2=$(field bytes_sent "$work/s2.json")

# Undo the second snapshot (and collect its new shards) so the hinted run sends them again.
sa forget "$s2" --gc-grace 0s > /dev/null
drop; t0=$(now)
sa snapshot "$img" --volume bench --cache-dir "$work/cache" --changed-since "$s1" --changed-map "$work/changed.map" --json > "$work/s3.json"
t_hint=$(secs "$t0" "$(now)")
sent3=$(field bytes_sent "$work/s3.json")
unread=$(field unread_stripes "$work/s3.json")
mbytes=$(field manifest_bytes "$work/s3.json")

# restic: the original image first, then the changed one (cold).
export RESTIC_PASSWORD=bench
restic init -q --repo "$work/restic" > /dev/null
restic -q --repo "$work/restic" backup --stdin --stdin-filename disk.img < "$work/orig.img" > /dev/null
rm -f "$work/orig.img"
drop; t0=$(now)
restic --repo "$work/restic" backup --stdin --stdin-filename disk.img < "$img" > "$work/restic2.out"
t_restic=$(secs "$t0" "$(now)")
restic_added=$(grep -i "added to the repo" "$work/restic2.out" || true)

ideal=$((changed * stripe * 3 / 2))
echo "4 GiB image, $nstripes stripes of 4 MiB, $changed changed (1%), 6 agents k=4 m=2; cold cache: $cold"
echo "first snapshot:                         ${t_first}s"
echo "cat img > /dev/null (floor):            ${t_cat}s"
echo "second snapshot, no hint:               ${t_second}s  ($(echo "scale=2; $t_second / $t_cat" | bc)x the read floor)"
echo "  bytes sent: $sent2 vs 1% x 1.5 x 4 GiB = $ideal ($(echo "scale=3; $sent2 / $ideal" | bc)x)"
echo "second snapshot, --changed-map hint:    ${t_hint}s  ($(echo "scale=3; $t_hint / $t_first" | bc)x the first snapshot), $unread stripes not read"
echo "  bytes sent: $sent3"
echo "restic backup --stdin of the changed image (repo has the first): ${t_restic}s; $restic_added"
echo "sealed manifest: $mbytes bytes for 4 GiB = $((mbytes * 256)) bytes per TiB at this ratio"
