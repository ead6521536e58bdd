#!/usr/bin/env bash
# Restore figures for issue 18, each against a baseline measured in the same run:
#   `sa-image restore` of a snapshot of a 1 GiB image (768 MiB random, 256 MiB zero; 6 local
#   agents, k=4 m=2) vs `cp IMG DST && sync`, to a file and to a loop device, with all 6 agents
#   up and with 2 of 6 killed. Restore ends with an fsync of its target, so cp is followed by sync.
# Runs alternate (cp, restore, cp, restore, ...) $RUNS times (default 3) per case; every run is
# printed, then the best of each and the ratio restore/cp throughput (= cp time / restore time).
# The goal of issue 18 is a ratio >= 0.8 in all four cases.
# Usage: bench/restore.sh [WORKDIR]   (needs: cargo build --release; root for the loop device)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-restore.XXXXXX)}
runs=${RUNS:-3}
mkdir -p "$work"
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
loop=""
trap 'if [ -n "$loop" ]; then losetup -d "$loop" 2>/dev/null || true; fi; cleanup' EXIT

make_key
make_image "$work/img" 768 256
start_agents 6 "$work/agents"
"$bin/sa-image" snapshot "$work/img" --key "$work/key" --agents "$addrs" --volume bench --json > /dev/null
cat "$work/img" > /dev/null   # cp reads from page cache, as the agents do

# A loop device over a preallocated file, as large as the image.
if fallocate -l $((1 << 30)) "$work/loop.img" && loop=$(losetup -f --show "$work/loop.img" 2>/dev/null); then
  :
else
  loop=""; echo "no loop device (not root?): the device cases are skipped" >&2
fi

cp_run() { # TARGET
  local t0 t1
  [ -b "$1" ] || rm -f "$1"
  sync; t0=$(now)
  cp "$work/img" "$1" && sync
  t1=$(now)
  [ -b "$1" ] || rm -f "$1"
  echo "$t1 - $t0" | bc
}
restore_run() { # TARGET AGENTS
  local t0 t1
  [ -b "$1" ] || rm -f "$1"
  sync; t0=$(now)
  "$bin/sa-image" restore latest --to "$1" --key "$work/key" --agents "$2" --json > "$work/restore.json"
  t1=$(now)
  cmp -n $((1 << 30)) "$work/img" "$1" || { echo "restored $1 differs" >&2; exit 1; }
  [ -b "$1" ] || rm -f "$1"
  echo "$t1 - $t0" | bc
}

case_run() { # LABEL TARGET
  local c r i
  : > "$work/c"; : > "$work/r"
  for i in $(seq "$runs"); do
    c=$(cp_run "$2"); echo "$c" >> "$work/c"
    r=$(restore_run "$2" "$addr_1"); echo "$r" >> "$work/r"
    printf '  %-28s run %d: cp+sync %.3fs  restore %.3fs\n' "$1" "$i" "$c" "$r"
  done
  c=$(best < "$work/c"); r=$(best < "$work/r")
  printf '%-30s best cp+sync %.3fs (%4.0f MiB/s)  restore %.3fs (%4.0f MiB/s)  ratio restore/cp %.2f\n' \
    "$1" "$c" "$(echo "1024 / $c" | bc -l)" "$r" "$(echo "1024 / $r" | bc -l)" "$(echo "$c / $r" | bc -l)"
}

echo "restore of 1 GiB (768 MiB random, 256 MiB zero), 6 agents k=4 m=2, $runs runs each"
case_run "file, 6 of 6 agents" "$work/out"
[ -n "$loop" ] && case_run "loop device, 6 of 6 agents" "$loop"
stop_agents 2 5
case_run "file, 4 of 6 agents" "$work/out"
[ -n "$loop" ] && case_run "loop device, 4 of 6 agents" "$loop"
grep -o '"reconstructed_stripes": *[0-9]*' "$work/restore.json" || true
