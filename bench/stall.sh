#!/usr/bin/env bash
# No-stall figure for issue 18: what a client PC cut off the network without a reset (its link
# goes down mid-operation: no answer, no refusal) costs a snapshot, a restore and a serving read
# (nbdcopy through `sa-image serve`), against the same operation with every PC healthy, measured
# in the same run, round after round. Target: at most about 5 s extra (the stall timeout, 4 s by
# default), where the request timeout (60 s) was what a cut PC cost before.
# Seven PCs, each a network namespace on its own veth pair with an agent inside; k=4 m=2 (the
# seventh PC lets a snapshot that loses one commit with every stripe whole). The cut is PC 7's
# namespace end of its pair going down, once the operation has moved CUT_MIB over that link; the
# PC joins again before the next measurement.
# Usage: sudo bench/stall.sh [WORKDIR]   (root: namespaces; needs cargo build --release)
#   SIZE_MIB=256 (the image), CUT_MIB=4, ROUNDS=3
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-stall.XXXXXX)}
size=${SIZE_MIB:-256}
cut_mib=${CUT_MIB:-4}
rounds=${ROUNDS:-3}
tag=$(( $$ % 100000 ))
net=198
pc=s
# shellcheck source=bench/pcs.sh
. "$here/bench/pcs.sh"
pcs="1 2 3 4 5 6 7"
victim=7
mkdir -p "$work"
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $pcs; do del_pc "$i"; done
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() { # FILE PATTERN: poll until FILE has a line matching PATTERN (10 ms steps, 30 s)
  for _ in $(seq 3000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.01; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
now() { date +%s.%N; }
since() { echo "$(now) $1" | awk '{printf "%.2f", $1 - $2}'; }

for i in $pcs; do add_pc "$i"; done

"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
for i in $pcs; do
  mkdir -p "$work/a$i"
  ip netns exec "$(pc_ns "$i")" "$bin/shard-agent" --dir "$work/a$i" --listen "10.$net.$i.2:7710" \
    --owner "$owner" --min-free 0 > "$work/a$i.out" 2>> "$work/a$i.log" &
  pids+=($!)
  wait_for "$work/a$i.out" "listening on"
done
all=$(for i in $pcs; do printf '10.%s.%s.2:7710,' "$net" "$i"; done); all=${all%,}
sa_args=(--key "$work/key" --agents "$all" --cache-dir "$work/cache")
sa() { "$bin/sa-image" "$@" "${sa_args[@]}"; }

traffic() { # bytes through PC 7's link so far
  local h; h="/sys/class/net/$(pc_host $victim)/statistics"
  echo $(( $(cat "$h/rx_bytes") + $(cat "$h/tx_bytes") ))
}
cut() { ip netns exec "$(pc_ns $victim)" ip link set "$(pc_if $victim)" down; }
join() { # the link up again, and the agent reachable through it
  ip netns exec "$(pc_ns $victim)" ip link set "$(pc_if $victim)" up
  for _ in $(seq 1000); do
    timeout 1 bash -c "exec 3<>/dev/tcp/10.$net.$victim.2/7710" 2>/dev/null && return 0
    sleep 0.01
  done
  echo "PC $victim did not come back" >&2; return 1
}
# timed CUT CMD...: runs CMD, with CUT=1 cuts PC 7 once CMD has moved CUT_MIB over its link;
# prints the seconds CMD took. CMD must succeed.
timed() {
  local want=$1; shift
  local t0 start pid
  start=$(traffic); t0=$(now)
  "$@" > "$work/op.out" 2>> "$work/op.log" &
  pid=$!; pids+=($pid)
  if [ "$want" = 1 ]; then
    while kill -0 "$pid" 2>/dev/null && [ $(( $(traffic) - start )) -lt $((cut_mib << 20)) ]; do
      sleep 0.01
    done
    kill -0 "$pid" 2>/dev/null || { echo "the operation ended before the cut: raise SIZE_MIB" >&2; exit 1; }
    cut
  fi
  wait "$pid" || { echo "the operation failed ($*):" >&2; tail -20 "$work/op.log" >&2; exit 1; }
  since "$t0"
  if [ "$want" = 1 ]; then join; fi
}

snapshot_op() { head -c $((size << 20)) /dev/urandom > "$work/img"; timed "$1" sa snapshot "$work/img" \
  --data-shards 4 --parity-shards 2; }
# Restores and serving reads use one snapshot stored while every PC was healthy (the latest may be
# one cut short, of which PC 7 holds little).
head -c $((size << 20)) /dev/urandom > "$work/base.img"
base=$(sa snapshot "$work/base.img" --data-shards 4 --parity-shards 2 --json \
  | grep -o '"snapshot": *"[^"]*"' | head -1 | sed 's/.*"\([^"]*\)"$/\1/')
[ -n "$base" ] || { echo "no snapshot id from the base snapshot" >&2; exit 1; }
restore_op() {
  rm -f "$work/out.img"
  timed "$1" sa restore "$base" --to "$work/out.img" --wake-wait 0
  cmp -s "$work/out.img" "$work/base.img" || { echo "restored bytes differ" >&2; exit 1; }
}
serve_op() {
  local out="$work/serve.out" url spid secs
  rm -f "$out"
  # Not through `sa`: the pid must be serve's own, for the kill below to reach it.
  "$bin/sa-image" serve "$base" --listen 127.0.0.1:0 --cache 8MiB --wake-wait 0 "${sa_args[@]}" \
    > "$out" 2>> "$work/serve.log" &
  spid=$!; pids+=($spid)
  wait_for "$out" "^serving"
  url=$(grep -o 'nbd://[^ ]*' "$out" | head -1)
  secs=$(timed "$1" nbdcopy "$url" null:)
  kill "$spid"; wait "$spid" 2>/dev/null || true
  echo "$secs"
}

printf 'what a PC cut mid-operation costs (k=4 m=2, 7 PCs, %d MiB image, cut after %d MiB on its link)\n' "$size" "$cut_mib"
printf '%-6s %-11s %9s %9s %9s\n' round operation healthy cut extra
for r in $(seq "$rounds"); do
  for op in snapshot restore serve-read; do
    f=${op%-read}_op
    h=$($f 0)
    c=$($f 1)
    printf '%-6s %-11s %8.2fs %8.2fs %+8.2fs\n' "$r" "$op" "$h" "$c" "$(echo "$c $h" | awk '{print $1 - $2}')"
  done
done
