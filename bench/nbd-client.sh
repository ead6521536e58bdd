#!/usr/bin/env bash
# NBD client figure, against a baseline measured in the same run:
#   reading a 1 GiB random raw image served by `qemu-nbd -r` on a Unix socket, page cache warm,
#   with nbd-server's client (`--example read`: its defaults, 1 MiB requests, 16 in flight per connection), vs
#   `nbdcopy URI null:` (libnbd), each with 1 and with 4 connections.
# Each timing is the best of $RUNS runs (default 3).
# Usage: bench/nbd-client.sh [WORKDIR]
#   (needs: cargo build --release -p nbd-server --example read; libnbd-bin; qemu-utils)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
reader=${SA_BIN_DIR:-$here/target/release}/examples/read
work=${1:-$(mktemp -d /var/tmp/sa-bench-nbdclient.XXXXXX)}
runs=${RUNS:-3}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

now() { date +%s.%N; }
best() { sort -n | head -1; }
[ -x "$reader" ] || { echo "build it first: cargo build --release -p nbd-server --example read" >&2; exit 1; }

head -c $((1024 << 20)) /dev/urandom > "$work/img"
cat "$work/img" > /dev/null
sock="$work/nbd.sock"
qemu-nbd -r -f raw --persistent --shared=16 --socket "$sock" "$work/img" 2> "$work/qemu-nbd.log" &
pids+=($!)
for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "qemu-nbd did not start" >&2; cat "$work/qemu-nbd.log" >&2; exit 1; }
uri="nbd+unix:///?socket=$sock"

time_of() { local t0 t1; t0=$(now); "$@" > /dev/null; t1=$(now); echo "$t1 - $t0" | bc; }
for conns in 1 4; do
  ours=$(for _ in $(seq "$runs"); do time_of "$reader" "$uri" --connections "$conns"; done | best)
  base=$(for _ in $(seq "$runs"); do time_of nbdcopy --connections="$conns" "$uri" null:; done | best)
  printf 'connections=%d  client %.3f s (%.0f MiB/s)  nbdcopy %.3f s (%.0f MiB/s)  ratio client/nbdcopy time %.2f\n' \
    "$conns" "$ours" "$(echo "1024 / $ours" | bc -l)" "$base" "$(echo "1024 / $base" | bc -l)" \
    "$(echo "$ours / $base" | bc -l)"
done
