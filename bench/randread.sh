#!/usr/bin/env bash
# Random reads from `serve` with a cold cache (issue 18), against qemu-nbd in the same run:
#   fio --ioengine=nbd, 4 KiB random reads at queue depth 16 for $SECS seconds (default 20) over
#   a $SIZE_MIB MiB export (default 4096, all random data), one connection; IOPS and completion
#   latency p50/p99. Baseline: `qemu-nbd -r -f raw` on the raw image (page cache warm, as the
#   agents' shard files are). Ours: `sa-image serve` from 6 local agents (k=4 m=2), a new
#   process per run (its stripe cache empty), healthy and with 2 of 6 agents killed.
# Every run is printed; the best run (by IOPS) of each is compared. Goal of issue 18: IOPS ratio
# >= 0.25 and p99 <= 20 ms, healthy and degraded. The snapshot is sealed in 4 KiB chunks (seal
# format 2, the default): a 4 KiB miss fetches its 4,112-byte sealed chunk from one agent, or with
# that agent down the same bytes of 4 other shards to rebuild it. SEAL_FORMAT=1 measures the old
# format, where every miss fetches a whole 4 MiB stripe.
# Usage: bench/randread.sh [WORKDIR]   (needs: cargo build --release; fio; libnbd-bin; qemu-utils)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-randread.XXXXXX)}
runs=${RUNS:-3}
secs=${SECS:-20}
size_mib=${SIZE_MIB:-4096}
mkdir -p "$work"
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
trap cleanup EXIT
command -v fio > /dev/null || { echo "needs fio (apt-get install fio)" >&2; exit 1; }

# shellcheck source=bench/fio.sh
. "$here/bench/fio.sh"
fio_run() { fio_randread "$1" "$size_mib" "$secs" "$work/fio.json"; }
serve_fio() { # -> fio line, after a cold serve start; serve's JSON in $work/serve.json
  local out="$work/serve.out" pid url r
  "$bin/sa-image" serve latest --key "$work/key" --agents "$addrs" --listen 127.0.0.1:0 --json \
    > "$out" 2> "$work/serve.err" &
  pid=$!; pids+=($pid)
  wait_for "$out" '^serving snapshot .* on nbd://[0-9.]*:[0-9][0-9]*$'
  url=$(sed -n 's/^serving snapshot .* on \(nbd:.*\)$/\1/p' "$out" | head -1)
  r=$(fio_run "$url")
  kill -TERM "$pid"; wait "$pid" || true
  sed -n '/^{/,$p' "$out" > "$work/serve.json"
  echo "$r"
}

runs_of() { # LABEL CMD... : prints each run, leaves "IOPS P50 P99" lines in $work/runs
  local label=$1 i r; shift
  : > "$work/runs"
  for i in $(seq "$runs"); do
    r=$("$@"); echo "$r" >> "$work/runs"
    read -r iops p50 p99 <<< "$r"
    printf '  %-24s run %d: %6.0f IOPS  p50 %6.2f ms  p99 %7.2f ms\n' "$label" "$i" "$iops" "$p50" "$p99"
  done
  sort -n -r "$work/runs" | head -1 > "$work/best.$label"
}

make_key
head -c $((size_mib << 20)) /dev/urandom > "$work/img"
start_agents 6 "$work/agents"
"$bin/sa-image" snapshot "$work/img" --key "$work/key" --agents "$addrs" --volume bench --seal-format "${SEAL_FORMAT:-2}" --json > /dev/null
cat "$work/img" > /dev/null

port=$((20000 + RANDOM % 20000))
qemu-nbd -r -f raw -t --shared=16 -b 127.0.0.1 -p "$port" "$work/img" &
qpid=$!; pids+=($qpid)
for _ in $(seq 200); do nbdinfo "nbd://127.0.0.1:$port" > /dev/null 2>&1 && break; sleep 0.05; done
runs_of qemu-nbd fio_run "nbd://127.0.0.1:$port"
kill "$qpid"; wait "$qpid" 2>/dev/null || true

runs_of serve-healthy serve_fio
grep -E '"(stripes_fetched|hedged_shards|ranged_hedges|ranged_fallbacks)"' "$work/serve.json" | tr -d ' \n'; echo
stop_agents 2 5
runs_of serve-degraded serve_fio
grep -E '"(stripes_fetched|stripes_reconstructed|hedged_shards|ranged_hedges|ranged_fallbacks)"' "$work/serve.json" | tr -d ' \n'; echo

read -r qi qp50 qp99 < "$work/best.qemu-nbd"
echo "fio 4 KiB randread QD16, ${secs}s, $size_mib MiB export, best of $runs by IOPS"
printf '%-24s %6.0f IOPS  p50 %6.2f ms  p99 %7.2f ms\n' "qemu-nbd -r -f raw" "$qi" "$qp50" "$qp99"
for l in serve-healthy serve-degraded; do
  read -r i p50 p99 < "$work/best.$l"
  printf '%-24s %6.0f IOPS  p50 %6.2f ms  p99 %7.2f ms  ratio IOPS serve/qemu-nbd %.3f\n' "$l" "$i" "$p50" "$p99" \
    "$(echo "$i / $qi" | bc -l)"
done
