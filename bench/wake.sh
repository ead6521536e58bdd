#!/usr/bin/env bash
# Wake-on-LAN figure for issue 16: the time from starting `sa-image serve` to the first block a
# real NBD client (qemu-img dd, 64 KiB at offset 0) reads, with 3 of 6 client PCs asleep.
# Each PC is a network namespace on its own veth pair; a sleeping PC is tests/wake-harness.py,
# which listens on UDP 9 and 7 and only on a magic packet for its MAC waits WAKE_DELAY seconds
# (the PC booting) and becomes the agent. Target: within WAKE_DELAY + 2 s.
# Same-run reference: the same measurement with all 6 PCs awake (no waking at all), so the
# figure minus the reference is what waking costs beyond the boot delay.
# Usage: sudo bench/wake.sh [WORKDIR]   (root: namespaces, ports 9 and 7; needs cargo build --release)
#   WAKE_DELAY=2 (seconds), SIZE_MIB=64, RUNS=3 (each figure is the median of RUNS)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-wake.XXXXXX)}
delay=${WAKE_DELAY:-2}
size=${SIZE_MIB:-64}
runs=${RUNS:-3}
tag=$(( $$ % 100000 ))
net=199
pc=b
# shellcheck source=bench/pcs.sh
. "$here/bench/pcs.sh"
mkdir -p "$work"
pids=()
ns_names=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  # An agent the wake harness started on a magic packet is the harness's child, not in pids.
  pkill -f -- "--dir $work/a" 2>/dev/null || true
  wait 2>/dev/null || true
  for i in 1 2 3 4 5 6; do del_pc "$i"; done
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() { # FILE PATTERN [TRIES]: poll until FILE has a line matching PATTERN (10 ms steps)
  for _ in $(seq "${3:-3000}"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.01; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
now() { date +%s.%N; }

# Six PCs (bench/pcs.sh): namespace sab<tag>-i, 10.199.i.2/30 inside, 10.199.i.1/30 on this side.
for i in 1 2 3 4 5 6; do add_pc "$i"; done

"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
agent_cmd() { echo "$bin/shard-agent --dir $work/a$1 --listen 10.$net.$1.2:7710 --owner $owner --min-free 0"; }
agent_pid=()
start_agent() { # I: the agent of PC I, awake
  # shellcheck disable=SC2046
  ip netns exec "$(pc_ns "$1")" $(agent_cmd "$1") > "$work/a$1.out" 2>> "$work/a$1.log" &
  agent_pid[$1]=$!; pids+=($!)
  wait_for "$work/a$1.out" "listening on"
}
sleep_pc() { # I: PC I goes to sleep: its agent stops, the harness waits for its magic packet
  kill "${agent_pid[$1]}" 2>/dev/null || true; wait "${agent_pid[$1]}" 2>/dev/null || true
  local mac; mac=$(ip netns exec "$(pc_ns "$1")" cat "/sys/class/net/$(pc_if "$1")/address")
  rm -f "$work/h$1.ready" "$work/a$1.out"
  # shellcheck disable=SC2046
  ip netns exec "$(pc_ns "$1")" python3 "$here/tests/wake-harness.py" "$mac" "$delay" "$work/h$1.ready" \
    -- $(agent_cmd "$1") > "$work/a$1.out" 2>> "$work/a$1.log" &
  agent_pid[$1]=$!; pids+=($!)
  wait_for "$work/h$1.ready" listening
}
for i in 1 2 3 4 5 6; do mkdir -p "$work/a$i"; start_agent "$i"; done
all=$(for i in 1 2 3 4 5 6; do printf '10.%s.%s.2:7710,' "$net" "$i"; done); all=${all%,}
head -c $((size << 20)) /dev/urandom > "$work/img"
"$bin/sa-image" snapshot "$work/img" --key "$work/key" --agents "$all" --data-shards 4 \
  --parity-shards 2 --cache-dir "$work/cache" > /dev/null
head -c 65536 "$work/img" > "$work/want"

first_byte() { # prints the seconds from starting serve (through PC 1 only) to the first block read
  local out="$work/serve.out" t0 url secs
  rm -f "$out" "$work/got"
  t0=$(now)
  "$bin/sa-image" serve latest --listen 127.0.0.1:0 --key "$work/key" --agents "10.$net.1.2:7710" \
    --cache-dir "$work/serve-cache" --wake-wait 60s > "$out" 2>> "$work/serve.log" &
  local spid=$!; pids+=($spid)
  wait_for "$out" "^serving"
  url=$(grep -o 'nbd://[^ ]*' "$out" | head -1)
  qemu-img dd -f raw -O raw bs=65536 count=1 "if=$url" "of=$work/got" > /dev/null
  secs=$(echo "$(now) $t0" | awk '{printf "%.3f", $1 - $2}')
  kill "$spid"; wait "$spid" 2>/dev/null || true
  cmp -s "$work/got" "$work/want" || { echo "first block differs" >&2; exit 1; }
  echo "$secs"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

awake=$(for _ in $(seq "$runs"); do first_byte; done | median)
asleep=$(for _ in $(seq "$runs"); do
  for i in 4 5 6; do sleep_pc "$i"; done
  first_byte
done | median)
grep -q "magic packet" "$work/a4.log" || { echo "PC 4 never got its magic packet" >&2; exit 1; }
awk -v s="$asleep" -v a="$awake" -v d="$delay" -v r="$runs" 'BEGIN {
  printf "first byte served, serve start to 64 KiB read by qemu-img, median of %d:\n", r
  printf "  3 of 6 agents asleep: %.2f s   (wake delay %.1f s, bound %.1f s: %s)\n", s, d, d + 2, (s <= d + 2) ? "within" : "OVER"
  printf "  all 6 awake:          %.2f s   (reference)\n", a
  printf "  waking cost beyond the wake delay: %.2f s (%.2f s over the reference)\n", s - d, s - d - a
}'
