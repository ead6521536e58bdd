#!/usr/bin/env bash
# Hedged-read figure for issue 18: random 4 KiB reads from `sa-image serve` (cold cache) while one
# of six client PCs sits behind a 10 Mbit/s link, against the same reads with every link at full
# speed, measured in the same run, round after round. Goal: p99 <= 20 ms with the slow PC.
# Six PCs, each a network namespace on its own veth pair (bench/pcs.sh) with an agent inside;
# k=4 m=2. The slow link is `tc tbf` at RATE on both ends of PC 6's pair. The reads are fio's
# nbd engine, 4 KiB randread at queue depth 16 for SECS seconds over the whole export.
# Usage: sudo bench/hedge.sh [WORKDIR]   (root: namespaces, tc; fio; needs cargo build --release)
#   SIZE_MIB=2048 (the image, well above serve's default cache), RATE=10mbit, SECS=10, ROUNDS=3
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-hedge.XXXXXX)}
size=${SIZE_MIB:-2048}
rate=${RATE:-10mbit}
secs=${SECS:-10}
rounds=${ROUNDS:-3}
tag=$(( $$ % 100000 ))
net=197
pc=h
# shellcheck source=bench/pcs.sh
. "$here/bench/pcs.sh"
# shellcheck source=bench/fio.sh
. "$here/bench/fio.sh"
pcs="1 2 3 4 5 6"
slow=6
mkdir -p "$work"
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $pcs; do del_pc "$i"; done
  rm -rf "$work"
}
trap cleanup EXIT
command -v fio > /dev/null || { echo "needs fio (apt-get install fio)" >&2; exit 1; }
wait_for() { # FILE PATTERN: poll until FILE has a line matching PATTERN (10 ms steps, 30 s)
  for _ in $(seq 3000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.01; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}

for i in $pcs; do add_pc "$i"; done
"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
for i in $pcs; do
  mkdir -p "$work/a$i"
  ip netns exec "$(pc_ns "$i")" "$bin/shard-agent" --dir "$work/a$i" --listen "10.$net.$i.2:7710" \
    --owner "$owner" --min-free 0 > "$work/a$i.out" 2> "$work/a$i.log" &
  pids+=($!)
done
for i in $pcs; do wait_for "$work/a$i.out" listening; done
all=$(for i in $pcs; do printf '10.%s.%s.2:7710,' "$net" "$i"; done); all=${all%,}
sa_args=(--key "$work/key" --agents "$all" --cache-dir "$work/cache")
sa() { "$bin/sa-image" "$@" "${sa_args[@]}"; }
head -c $((size << 20)) /dev/urandom > "$work/img"
sa snapshot "$work/img" --data-shards 4 --parity-shards 2 > /dev/null

shape() { # on|off: PC 6's link at RATE both ways, or at full speed
  local op=add; [ "$1" = off ] && op=del
  if [ "$op" = add ]; then
    tc qdisc add dev "$(pc_host $slow)" root tbf rate "$rate" burst 64kb latency 400ms
    ip netns exec "$(pc_ns $slow)" tc qdisc add dev "$(pc_if $slow)" root tbf rate "$rate" burst 64kb latency 400ms
  else
    tc qdisc del dev "$(pc_host $slow)" root
    ip netns exec "$(pc_ns $slow)" tc qdisc del dev "$(pc_if $slow)" root
  fi
}
# One cold serve and fio against it -> "IOPS P50_MS P99_MS"; serve's stats in $work/serve.json.
reads() {
  local out="$work/serve.out" url spid
  rm -f "$out"
  # Not through `sa`: the pid must be serve's own, for the kill below to reach it.
  "$bin/sa-image" serve latest --listen 127.0.0.1:0 --wake-wait 0 --json "${sa_args[@]}" \
    > "$out" 2>> "$work/serve.log" &
  spid=$!; pids+=($spid)
  wait_for "$out" "^serving"
  url=$(grep -o 'nbd://[^ ]*' "$out" | head -1)
  fio_randread "$url" "$size" "$secs" "$work/fio.json" > "$work/fio.line"
  kill -TERM "$spid"; wait "$spid" 2>/dev/null || true
  sed -n '/^{/,$p' "$out" > "$work/serve.json"
  cat "$work/fio.line"
}

printf 'fio 4 KiB randread QD16 from serve (cold), %d MiB export, k=4 m=2 on 6 PCs, %ss per run\n' "$size" "$secs"
printf '%-6s %-22s %8s %9s %9s  %s\n' round links IOPS p50_ms p99_ms "serve stats"
for r in $(seq "$rounds"); do
  for mode in off on; do
    [ "$mode" = on ] && shape on
    read -r iops p50 p99 <<< "$(reads)"
    [ "$mode" = on ] && shape off
    label="all full speed"; [ "$mode" = on ] && label="PC $slow at $rate"
    stats=$(grep -E '"(hedged_shards|stripes_fetched|ranged_hedges|ranged_fallbacks)"' "$work/serve.json" | tr -d ' \n' || true)
    printf '%-6s %-22s %8s %9s %9s  %s\n' "$r" "$label" "$iops" "$p50" "$p99" "$stats"
  done
done
echo "goal: p99 <= 20 ms with PC $slow at $rate"
