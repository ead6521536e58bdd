#!/usr/bin/env bash
# NBD serving figures for issue 3, each against a baseline measured in the same run:
#   `nbdcopy nbd://... null:` of a 1 GiB snapshot (768 MiB random, 256 MiB zero) served by
#     `sa-image serve` from 6 local agents (k=4 m=2), vs `qemu-nbd -r -f raw` serving the raw image;
#     healthy, and with 2 of 6 agents killed;
#   serve's peak RSS (VmHWM) with the default cache, and its time to first byte after start
#     (start of `sa-image serve` to the first 4 KiB read by a client).
# Each timing is the best of $RUNS runs (default 3); every serve run starts cold (empty cache).
# Usage: bench/serve.sh [WORKDIR]   (needs: cargo build --release; libnbd-bin; qemu-utils)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-serve.XXXXXX)}
runs=${RUNS:-3}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export PATH=/usr/bin:$PATH   # nbdsh needs Debian's python3

now() { date +%s.%N; }
wait_for() { # FILE PATTERN : poll until FILE has a line matching PATTERN (deadline 30 s)
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
start_agents() { # DIR -> sets addrs, pid_1..pid_6
  addrs=""
  for i in 1 2 3 4 5 6; do
    mkdir -p "$1/a$i"
    "$bin/shard-agent" --dir "$1/a$i" --listen "127.0.0.$((i+1)):0" --owner "$owner" > "$1/a$i.out" 2>"$1/a$i.log" &
    pids+=($!); eval "pid_$i=$!"
  done
  for i in 1 2 3 4 5 6; do
    wait_for "$1/a$i.out" listening
    addrs="$addrs${addrs:+,}$(sed -n 's/^listening on //p' "$1/a$i.out")"
  done
}
best() { sort -n | head -1; }
copy_time() { # URL -> seconds of one nbdcopy to null:
  local t0 t1; t0=$(now); nbdcopy "$1" null:; t1=$(now); echo "$t1 - $t0" | bc
}

# One cold serve run: start serve, time to first byte, time an nbdcopy, stop it; prints
# "COPY_SECONDS TTFB_SECONDS PEAK_RSS_KIB" and leaves serve's JSON in $work/serve.json.
serve_run() {
  local out="$work/serve.out" err="$work/serve.err" t0 t1 url pid copy hwm
  t0=$(now)
  "$bin/sa-image" serve latest --key "$work/key" --agents "$addrs" --listen 127.0.0.1:0 --json > "$out" 2> "$err" &
  pid=$!; pids+=($pid)
  wait_for "$out" '^serving snapshot .* on nbd://[0-9.]*:[0-9][0-9]*$'
  url=$(sed -n 's/^serving snapshot .* on \(nbd:.*\)$/\1/p' "$out" | head -1)
  nbdsh -u "$url" -c 'h.pread(4096, 0)'
  t1=$(now)
  copy=$(copy_time "$url")
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill -TERM "$pid"; wait "$pid" || true
  sed -n '/^{/,$p' "$out" > "$work/serve.json"
  echo "$copy $(echo "$t1 - $t0" | bc) $hwm"
}

"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
head -c $((768 << 20)) /dev/urandom > "$work/img"
truncate -s $((1024 << 20)) "$work/img"
start_agents "$work/agents"
"$bin/sa-image" snapshot "$work/img" --key "$work/key" --agents "$addrs" --volume bench --json > /dev/null
cat "$work/img" > /dev/null   # qemu-nbd reads from page cache, as the agents do

# Baseline: qemu-nbd serving the raw file, read-only.
port=$((20000 + RANDOM % 20000))
qemu-nbd -r -f raw -t -b 127.0.0.1 -p "$port" "$work/img" &
qpid=$!; pids+=($qpid)
for _ in $(seq 200); do nbdinfo "nbd://127.0.0.1:$port" > /dev/null 2>&1 && break; sleep 0.05; done
nbdsh_start=$( { t0=$(now); nbdsh -u "nbd://127.0.0.1:$port" -c 'h.pread(4096, 0)'; t1=$(now); echo "$t1 - $t0" | bc; } )
q=$(for _ in $(seq "$runs"); do copy_time "nbd://127.0.0.1:$port"; done | best)
kill "$qpid"; wait "$qpid" 2>/dev/null || true

report() { # LABEL
  local best_copy best_ttfb hwm
  best_copy=$(cut -d' ' -f1 "$work/runs" | best)
  best_ttfb=$(cut -d' ' -f2 "$work/runs" | best)
  hwm=$(cut -d' ' -f3 "$work/runs" | sort -n | tail -1)
  printf '%-26s nbdcopy %6.3fs = %5.0f MiB/s  ratio qemu-nbd/serve %.2f  TTFB %.3fs  peak RSS %d MiB\n' \
    "$1" "$best_copy" "$(echo "1024 / $best_copy" | bc -l)" "$(echo "$q / $best_copy" | bc -l)" "$best_ttfb" "$((hwm / 1024))"
  grep -E '"(stripes_fetched|stripes_reconstructed|stripes_from_cache|readahead|hedged_shards|requests)"' "$work/serve.json" | tr -d ' \n'; echo
}

printf '%-26s nbdcopy %6.3fs = %5.0f MiB/s  (nbdsh start + first read: %.3fs)\n' "qemu-nbd -r -f raw" "$q" "$(echo "1024 / $q" | bc -l)" "$nbdsh_start"
: > "$work/runs"; for _ in $(seq "$runs"); do serve_run >> "$work/runs"; done
report "serve, 6 of 6 agents"
kill "$pid_2" "$pid_5"; wait "$pid_2" "$pid_5" 2>/dev/null || true
: > "$work/runs"; for _ in $(seq "$runs"); do serve_run >> "$work/runs"; done
report "serve, 4 of 6 agents"
