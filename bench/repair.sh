#!/usr/bin/env bash
# Health figures for issue 6 (and issue 18: repair >= 2x 171 MB/s, bytes read per byte rebuilt):
#   repair throughput (MB/s of rebuilt shard files) after one of 7 agents holding a 1 GiB
#     snapshot (k=4 m=2, all random data) is lost for good (killed, directory deleted);
#   scrub rate and CPU cost on one agent: a full pass asked for with `sa-image scrub`, unlimited
#     (agent started with --scrub-rate 0) and at the default 20 MiB/s, CPU = utime+stime of the
#     agent process (/proc/PID/stat) over the pass.
# Usage: bench/repair.sh [WORKDIR]   (needs: cargo build --release)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
n=7
tck=$(getconf CLK_TCK)

start_agent() { # I EXTRA... -> pid_I, addr_I
  local i=$1; shift
  mkdir -p "$work/a$i"; : > "$work/a$i.out"
  "$bin/shard-agent" --dir "$work/a$i" --listen "127.0.0.$((i+1)):${port[$i]:-0}" --owner "$owner" "$@" \
    > "$work/a$i.out" 2>>"$work/a$i.log" &
  pids+=($!); eval "pid_$i=$!"
  for _ in $(seq 200); do grep -q listening "$work/a$i.out" 2>/dev/null && break; sleep 0.05; done
  eval "addr_$i=$(sed -n 's/^listening on //p' "$work/a$i.out")"
  port[$i]=$(sed -n 's/^listening on .*://p' "$work/a$i.out")
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
addrs() { local a="" i; for i in $(seq 1 $n); do a="$a${a:+,}$(eval echo "\$addr_$i")"; done; echo "$a"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

declare -a port
"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
head -c $((1 << 30)) /dev/urandom > "$work/img"
for i in $(seq 1 $n); do start_agent "$i" --scrub-rate 0; done
sa() { "$bin/sa-image" "$@" --key "$work/key" --agents "$(addrs)" --cache-dir "$work/cache"; }
sa snapshot "$work/img" --volume bench --json > "$work/snap.json"
echo "snapshot: $(field 'd["bytes_sent"]' < "$work/snap.json") bytes of shards on $n agents"

# Scrub, unlimited: agent 1 restarted with --scrub-rate 0 (a pass asked for runs unthrottled).
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(cpu_ticks "$pid_1"); s0=$(date +%s.%N)
"$bin/sa-image" scrub --json --key "$work/key" --agents "$(addrs)" > "$work/scrub0.json" || true
t1=$(cpu_ticks "$pid_1"); s1=$(date +%s.%N)
bytes=$(field '[a for a in d["agents"] if a["addr"]=="'"$addr_1"'"][0]["bytes"]' < "$work/scrub0.json")
secs=$(echo "$s1 - $s0" | bc)
cpu=$(echo "scale=3; ($t1 - $t0) / $tck" | bc)
echo "scrub unlimited (all $n agents at once, agent 1 measured): $bytes bytes in ${secs}s wall; agent 1 CPU ${cpu}s = $(echo "scale=1; $bytes / 1048576 / ($cpu + 0.0001)" | bc) MiB per CPU-second"

# Scrub at the default rate on agent 1 alone (restarted with the default --scrub-rate).
kill "$pid_1"; wait "$pid_1" 2>/dev/null || true
start_agent 1
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(cpu_ticks "$pid_1"); s0=$(date +%s.%N)
"$bin/sa-image" scrub --json --key "$work/key" --agents "$addr_1" > "$work/scrub1.json" || true
t1=$(cpu_ticks "$pid_1"); s1=$(date +%s.%N)
bytes=$(field '[a for a in d["agents"] if a["addr"]=="'"$addr_1"'"][0]["bytes"]' < "$work/scrub1.json")
secs=$(echo "$s1 - $s0" | bc)
cpu=$(echo "scale=3; ($t1 - $t0) / $tck" | bc)
echo "scrub at the default 20 MiB/s: $bytes bytes in ${secs}s = $(echo "scale=1; $bytes / 1048576 / $secs" | bc) MiB/s; CPU ${cpu}s ($(echo "scale=1; 100 * $cpu / $secs" | bc)% of one core)"
# (the --agents of this run named only agent 1, but the catalog names all: every agent scrubbed;
#  only agent 1 is measured)

# Repair: agent 4 lost for good.
kill "$pid_4"; wait "$pid_4" 2>/dev/null || true
rm -rf "$work/a4"
sa status --json > "$work/status0.json" || echo "status before repair: exit $? (2 = below m)"
/usr/bin/time -f '%e %U %S %M' -o "$work/t_repair" "$bin/sa-image" repair --json --key "$work/key" \
  --agents "$(addrs)" --cache-dir "$work/cache" > "$work/repair.json"
read -r rw ru rs rrss < "$work/t_repair"
echo "repair after losing 1 of $n agents (1 GiB snapshot): $(field 'd["shards_rebuilt"]' < "$work/repair.json") shards," \
  "$(field 'd["bytes_rebuilt"]' < "$work/repair.json") bytes rebuilt in $(field 'round(d["rebuild_seconds"],2)' < "$work/repair.json")s" \
  "= $(field 'round(d["rebuild_mb_per_s"],1)' < "$work/repair.json") MB/s; whole run ${rw}s, imager CPU ${ru}u+${rs}s, peak RSS $((rrss/1024)) MiB"
echo "  bytes read per byte rebuilt: $(field 'round(d["bytes_read"] / d["bytes_rebuilt"], 2)' < "$work/repair.json");" \
  "ratio to the issue-18 baseline of 171 MB/s: $(field 'round(d["rebuild_mb_per_s"] / 171, 2)' < "$work/repair.json")x (goal >= 2)"
sa status --json > "$work/status1.json" && echo "status after repair: exit 0 (margin $(field 'd["snapshots"][0]["margin"]' < "$work/status1.json"))"
