# Helpers shared by the bench scripts (sourced, not run). Each script sets `bin` and `work`
# before calling them; every process started is recorded in `pids` and killed by `cleanup`.
# shellcheck shell=bash

pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }

now() { date +%s.%N; }
# FILE PATTERN [TRIES]: poll until FILE has a line matching PATTERN (20 ms steps; 30 s by default).
wait_for() {
  for _ in $(seq "${3:-1500}"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.02; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
best() { sort -n | head -1; }
# Seconds a command takes (its output discarded).
time_of() { local t0 t1; t0=$(now); "$@" > /dev/null; t1=$(now); echo "$t1 - $t0" | bc; }
ratio() { echo "scale=2; $1 / $2" | bc; }
# A 1 GiB-style image: RANDOM_MIB of random data then ZERO_MIB of zeroes (a hole).
make_image() { head -c "$(( $2 << 20 ))" /dev/urandom > "$1"; truncate -s "$(( ($2 + $3) << 20 ))" "$1"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# keygen into $work/key; sets owner.
make_key() {
  "$bin/sa-image" keygen --out "$work/key" > /dev/null
  owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
}

# N DIR [AGENT FLAGS...]: starts agents 1..N on 127.0.0.(i+1), port 0, directories DIR/aI;
# sets addrs (comma-separated), addr_I and pid_I.
start_agents() {
  local n=$1 dir=$2 i; shift 2
  addrs=""
  for i in $(seq "$n"); do
    mkdir -p "$dir/a$i"
    "$bin/shard-agent" --dir "$dir/a$i" --listen "127.0.0.$((i+1)):0" --owner "$owner" "$@" \
      > "$dir/a$i.out" 2> "$dir/a$i.log" &
    pids+=($!); eval "pid_$i=$!"
  done
  for i in $(seq "$n"); do
    wait_for "$dir/a$i.out" listening
    eval "addr_$i=$(sed -n 's/^listening on //p' "$dir/a$i.out")"
    addrs="$addrs${addrs:+,}$(eval echo "\$addr_$i")"
  done
}

# Kills agents by number (e.g. `stop_agents 2 5`).
stop_agents() {
  local i p
  for i in "$@"; do p=$(eval echo "\$pid_$i"); kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}
