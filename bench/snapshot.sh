#!/usr/bin/env bash
# Snapshot and restore figures for issue 2, each against a baseline measured in the same run:
#   snapshot of a 1 GiB image (768 MiB random, 256 MiB zero) to 6 local agents, k=4 m=2,
#     vs `restic backup --stdin` of the same image into a local repository;
#   imager CPU seconds and peak RSS (1 GiB and 4 GiB images: RSS must not grow with the disk);
#   restore with 2 of 6 agents down, vs `cp` of the image.
# Usage: bench/snapshot.sh [WORKDIR]   (needs: cargo build --release; restic; GNU time)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

make_image() { # PATH RANDOM_MIB ZERO_MIB
  head -c "$(( $2 << 20 ))" /dev/urandom > "$1"
  truncate -s "$(( ($2 + $3) << 20 ))" "$1"
}
start_agents() { # DIR -> sets addrs
  addrs=""
  for i in 1 2 3 4 5 6; do
    mkdir -p "$1/a$i"
    "$bin/shard-agent" --dir "$1/a$i" --listen "127.0.0.$((i+1)):0" --owner "$owner" > "$1/a$i.out" 2>"$1/a$i.log" &
    pids+=($!); eval "pid_$i=$!"
  done
  for i in 1 2 3 4 5 6; do
    for _ in $(seq 100); do grep -q listening "$1/a$i.out" 2>/dev/null && break; sleep 0.05; done
    addrs="$addrs${addrs:+,}$(sed -n 's/^listening on //p' "$1/a$i.out")"
  done
}
timed() { # OUTFILE CMD... ; GNU time: wall, user, sys, max RSS KiB
  /usr/bin/time -f '%e %U %S %M' -o "$1" "${@:2}" > /dev/null
}

"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
make_image "$work/img1" 768 256
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
cat "$work/img1" > /dev/null   # both tools read from page cache

start_agents "$work/run1"
sync
timed "$work/t_snap" "$bin/sa-image" snapshot "$work/img1" --key "$work/key" --agents "$addrs" --volume bench --json
export RESTIC_PASSWORD=bench
restic init -q --repo "$work/restic" > /dev/null
sync
timed "$work/t_restic" restic -q --repo "$work/restic" backup --stdin --stdin-filename img1 < "$work/img1"

read -r sw su ss srss < "$work/t_snap"
read -r rw ru rs rrss < "$work/t_restic"
echo "snapshot 1 GiB -> 6 agents k4m2: ${sw}s (cpu ${su}u+${ss}s, peak RSS $((srss/1024)) MiB)"
echo "restic backup --stdin 1 GiB:    ${rw}s (cpu ${ru}u+${rs}s, peak RSS $((rrss/1024)) MiB)"
echo "ratio restic/sa-image time: $(echo "scale=2; $rw / $sw" | bc)  (>= 1 means sa-image is faster)"

# Restore with 2 agents down vs cp. This VM hands freed memory back to its host, so the first
# writer of fresh page cache pays for faulting it back in: alternate the runs, two rounds, and
# keep each one's best.
kill "$pid_2" "$pid_5"; wait "$pid_2" "$pid_5" 2>/dev/null || true
one=$(echo "$addrs" | cut -d, -f1)
best() { sort -n | head -1; }
for round in 1 2; do
  sync
  timed "$work/t_cp$round" cp "$work/img1" "$work/out1"; rm -f "$work/out1"; sync
  # restore ends with an fsync of the target; the fair durable baseline is cp followed by sync.
  timed "$work/t_cps$round" sh -c "cp '$work/img1' '$work/out1' && sync"; rm -f "$work/out1"; sync
  timed "$work/t_rest$round" "$bin/sa-image" restore latest --to "$work/out1" --key "$work/key" --agents "$one" --json
  cmp "$work/img1" "$work/out1"; rm -f "$work/out1"
done
tw=$(cat "$work"/t_rest? | awk '{print $1}' | best)
cw=$(cat "$work"/t_cp? | awk '{print $1}' | best)
csw=$(cat "$work"/t_cps? | awk '{print $1}' | best)
read -r _ tu ts trss < "$work/t_rest2"
mbs() { echo "scale=0; 1024 / $1" | bc; }
echo "restore 1 GiB, 2 of 6 agents down: ${tw}s = $(mbs "$tw") MiB/s (cpu ${tu}u+${ts}s, peak RSS $((trss/1024)) MiB)"
echo "cp of the image:                   ${cw}s = $(mbs "$cw") MiB/s (page cache only)"
echo "cp + sync of the image:            ${csw}s = $(mbs "$csw") MiB/s (durable, like restore)"
echo "ratio restore/cp throughput: $(echo "scale=2; $cw / $tw" | bc); restore/(cp+sync): $(echo "scale=2; $csw / $tw" | bc)"

# Peak RSS for a 4 GiB image (3 GiB random, 1 GiB zero).
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=()
rm -rf "$work/run1" "$work/restic" "$work/out1"
if [ "${BENCH_SKIP_4G:-0}" != 1 ]; then
  make_image "$work/img4" 3072 1024
  start_agents "$work/run4"
  timed "$work/t_snap4" "$bin/sa-image" snapshot "$work/img4" --key "$work/key" --agents "$addrs" --volume bench4 --json
  read -r w4 u4 s4 rss4 < "$work/t_snap4"
  echo "snapshot 4 GiB: ${w4}s (cpu ${u4}u+${s4}s), peak RSS $((rss4/1024)) MiB vs $((srss/1024)) MiB at 1 GiB"
fi
