#!/usr/bin/env bash
# Daemon idle figure for issue 13: `sa-image daemon` with 20 local agents, one volume and its
# default settings (a status check every 5 minutes, a repair pass every 15 minutes), measured
# between jobs: CPU time used over a window (utime + stime from /proc/PID/stat), as a share of
# one core, and its resident memory (VmRSS, VmHWM) at the end. Target: <= 0.1% of a core,
# <= 64 MiB.
# Same-run reference: the CPU time of one `sa-image status` over the same 20 agents (what one
# of the daemon's checks costs), so the window's CPU can be read as "N status checks' worth".
# The window starts after the daemon's start-up work (first check, first repair pass) is done.
# Usage: bench/daemon-idle.sh [WORKDIR]   (needs: cargo build --release)
#   WINDOW=900 (seconds measured; default one repair period), AGENTS=20, SIZE_MIB=256
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-daemon.XXXXXX)}
window=${WINDOW:-900}
n=${AGENTS:-20}
size=${SIZE_MIB:-256}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

wait_for() { # FILE PATTERN [TRIES]: poll until FILE has a line matching PATTERN (20 ms steps)
  for _ in $(seq "${3:-1500}"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.02; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime of PID, clock ticks
hz=$(getconf CLK_TCK)

"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
head -c $((size << 20)) /dev/urandom > "$work/img"
addrs=""
for i in $(seq "$n"); do
  mkdir -p "$work/a$i"
  "$bin/shard-agent" --dir "$work/a$i" --listen "127.0.11.$i:0" --owner "$owner" > "$work/a$i.out" 2>"$work/a$i.log" &
  pids+=($!)
done
for i in $(seq "$n"); do
  wait_for "$work/a$i.out" listening
  addrs="$addrs${addrs:+, }\"$(sed -n 's/^listening on //p' "$work/a$i.out")\""
done
cat > "$work/config.toml" <<TOML
key = "$work/key"
agents = [$addrs]
cache_dir = "$work/cache"
[daemon]
state_dir = "$work/state"
[web]
listen = "127.0.0.1:0"
[volume.bench]
source = "$work/img"
schedule = "never"
keep_daily = 7
TOML
agents_arg=$(echo "$addrs" | tr -d '" ')
"$bin/sa-image" snapshot "$work/img" --key "$work/key" --agents "$agents_arg" --volume bench \
  --cache-dir "$work/cache" --json > /dev/null

# Reference: one status over the same agents (CPU time of the process, from bash's `times`).
ref=$( { /usr/bin/time -f '%U %S' "$bin/sa-image" status --key "$work/key" --agents "$agents_arg" \
  --cache-dir "$work/cache" > /dev/null; } 2>&1 | tail -1 | awk '{print $1 + $2}')

"$bin/sa-image" daemon --config "$work/config.toml" > "$work/daemon.out" 2> "$work/daemon.log" &
dpid=$!; pids+=($dpid)
wait_for "$work/daemon.out" '^status page on'
url=$(sed -n 's/^status page on //p' "$work/daemon.out")
# Start-up work: the first status check and the first repair pass.
for _ in $(seq 3000); do
  curl -s "${url}status.json" 2>/dev/null | grep -q '"repair":{' && break; sleep 0.02
done
sleep 5
t0=$(ticks "$dpid"); s0=$(date +%s.%N)
sleep "$window"
t1=$(ticks "$dpid"); s1=$(date +%s.%N)
rss=$(awk '/^VmRSS/ {print $2}' "/proc/$dpid/status")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$dpid/status")
checks=$(curl -s "${url}metrics" | awk '/^sa_image_check_success/ {print $2}')
cpu=$(echo "($t1 - $t0) / $hz" | bc -l)
wall=$(echo "$s1 - $s0" | bc -l)
printf 'daemon idle, %d agents, %ds window: CPU %.3fs = %.4f%% of a core; RSS %.1f MiB (peak %.1f MiB); last check ok: %s\n' \
  "$n" "$window" "$cpu" "$(echo "100 * $cpu / $wall" | bc -l)" "$(echo "$rss / 1024" | bc -l)" "$(echo "$hwm / 1024" | bc -l)" "$checks"
printf 'reference: one `sa-image status` over the same agents: CPU %.3fs; the window used %.1f of them\n' \
  "$ref" "$(echo "$cpu / $ref" | bc -l)"
