#!/usr/bin/env bash
# Cost of TLS on agent connections (issue 7): snapshot of a 1 GiB image (768 MiB random, 256 MiB
# zero) to 6 local agents, k=4 m=2, and its restore with 2 agents down, with this build (TLS 1.3)
# against a build of the last commit before TLS (plain TCP), measured in the same run, rounds
# alternating, the best of each kept.
#
# Usage: PLAIN_BIN_DIR=DIR bench/tls.sh [ROUNDS]
#   DIR holds sa-image and shard-agent built from commit b0e5547 (the last plain-TCP commit):
#     git worktree add /tmp/sa-plain b0e5547 &&
#     (cd /tmp/sa-plain && cargo build --release -p shard-agent -p sa-imager)
#     PLAIN_BIN_DIR=/tmp/sa-plain/target/release bench/tls.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tls_bin=${SA_BIN_DIR:-$here/target/release}
plain_bin=${PLAIN_BIN_DIR:?set PLAIN_BIN_DIR to a build of commit b0e5547 (see the header)}
rounds=${1:-3}
work=$(mktemp -d /var/tmp/sa-tls.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

head -c $((768 << 20)) /dev/urandom > "$work/img"
truncate -s $((1024 << 20)) "$work/img"

run_one() { # BIN_DIR LABEL -> appends "LABEL snap_s snap_cpu restore_s restore_cpu" to results
  local bin=$1 label=$2 d="$work/run-$2-$RANDOM"
  mkdir -p "$d"
  "$bin/sa-image" keygen --out "$d/key" > /dev/null
  local owner; owner=$("$bin/sa-image" owner-id --key "$d/key" | tail -1)
  local addrs="" apids=()
  for i in 1 2 3 4 5 6; do
    mkdir -p "$d/a$i"
    "$bin/shard-agent" --dir "$d/a$i" --listen "127.0.0.$((i+1)):0" --owner "$owner" > "$d/a$i.out" 2>"$d/a$i.log" &
    pids+=($!); apids+=($!)
  done
  for i in 1 2 3 4 5 6; do
    for _ in $(seq 200); do grep -q listening "$d/a$i.out" 2>/dev/null && break; sleep 0.05; done
    addrs="$addrs${addrs:+,}$(sed -n 's/^listening on //p' "$d/a$i.out")"
  done
  sync
  /usr/bin/time -f '%e %U %S' -o "$d/t_snap" "$bin/sa-image" snapshot "$work/img" --key "$d/key" \
    --agents "$addrs" --volume bench --json > "$d/snap.json"
  kill "${apids[1]}" "${apids[4]}"; wait "${apids[1]}" "${apids[4]}" 2>/dev/null || true
  /usr/bin/time -f '%e %U %S' -o "$d/t_rest" "$bin/sa-image" restore latest --to "$d/out.img" \
    --key "$d/key" --agents "$addrs" --json > /dev/null
  cmp -s "$work/img" "$d/out.img" || { echo "restore of $label differs" >&2; exit 1; }
  read -r sw su ss < "$d/t_snap"; read -r rw ru rs < "$d/t_rest"
  echo "$label $sw $(echo "$su + $ss" | bc) $rw $(echo "$ru + $rs" | bc)" >> "$work/results"
  for p in "${apids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$d"
}

for r in $(seq "$rounds"); do
  if (( r % 2 )); then run_one "$plain_bin" plain; run_one "$tls_bin" tls
  else run_one "$tls_bin" tls; run_one "$plain_bin" plain; fi
done
echo "round results (label snapshot_s snapshot_cpu_s restore_s restore_cpu_s):"
cat "$work/results"
best() { awk -v l="$1" -v c="$2" '$1==l { if (m=="" || $c<m) m=$c } END { print m }' "$work/results"; }
ps=$(best plain 2); ts=$(best tls 2); pr=$(best plain 4); tr=$(best tls 4)
psc=$(best plain 3); tsc=$(best tls 3); prc=$(best plain 5); trc=$(best tls 5)
mib=1024
echo "snapshot 1 GiB: plain ${ps}s ($(echo "scale=0; $mib / $ps" | bc) MiB/s), TLS ${ts}s ($(echo "scale=0; $mib / $ts" | bc) MiB/s); TLS/plain time $(echo "scale=3; $ts / $ps" | bc); CPU ${psc}s vs ${tsc}s"
echo "restore 1 GiB, 2 of 6 down: plain ${pr}s ($(echo "scale=0; $mib / $pr" | bc) MiB/s), TLS ${tr}s ($(echo "scale=0; $mib / $tr" | bc) MiB/s); TLS/plain time $(echo "scale=3; $tr / $pr" | bc); CPU ${prc}s vs ${trc}s"
