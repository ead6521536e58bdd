#!/usr/bin/env bash
# Live-restore figure for issue 4, against a baseline measured in the same run:
#   hydration of a 1 GiB snapshot (768 MiB random, 256 MiB zero) from 6 local agents (k=4 m=2)
#   onto a fresh file by `sa-image serve --hydrate FILE --hydrate-rate unlimited` while no client
#   reads (time from the start of serve to its `hydration complete` line), vs
#   `sa-image restore` of the same snapshot to a fresh file.
# Both write a sparse file (zero stripes cost nothing) and both end with the data synced
# (serve: its final checkpoint fdatasyncs the target; restore is followed by `sync FILE`).
# Each timing is the best of $RUNS runs (default 3); the target file is removed between runs.
# Usage: bench/hydrate.sh [WORKDIR]   (needs: cargo build --release)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-hydrate.XXXXXX)}
runs=${RUNS:-3}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

now() { date +%s.%N; }
wait_for() { # FILE PATTERN [TRIES]: poll until FILE has a line matching PATTERN (20 ms steps)
  for _ in $(seq "${3:-1500}"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.02; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
best() { sort -n | head -1; }

"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
head -c $((768 << 20)) /dev/urandom > "$work/img"
truncate -s $((1024 << 20)) "$work/img"
addrs=""
for i in 1 2 3 4 5 6; do
  mkdir -p "$work/a$i"
  "$bin/shard-agent" --dir "$work/a$i" --listen "127.0.0.$((i+1)):0" --owner "$owner" > "$work/a$i.out" 2>"$work/a$i.log" &
  pids+=($!)
done
for i in 1 2 3 4 5 6; do
  wait_for "$work/a$i.out" listening
  addrs="$addrs${addrs:+,}$(sed -n 's/^listening on //p' "$work/a$i.out")"
done
"$bin/sa-image" snapshot "$work/img" --key "$work/key" --agents "$addrs" --volume bench --json > /dev/null
sum=$(sha256sum < "$work/img" | cut -d' ' -f1)

hydrate_run() { # -> seconds from start of serve to `hydration complete`
  local out="$work/serve.out" t0 t1 pid
  rm -f "$work/target" "$work/target.hydrate"
  t0=$(now)
  "$bin/sa-image" serve latest --key "$work/key" --agents "$addrs" --listen 127.0.0.1:0 --json \
    --hydrate "$work/target" --hydrate-rate unlimited > "$out" 2> "$work/serve.err" &
  pid=$!; pids+=($pid)
  wait_for "$out" '^hydration complete' 30000
  t1=$(now)
  kill -TERM "$pid"; wait "$pid" || true
  sed -n '/^{/,$p' "$out" > "$work/serve.json"
  [ "$(sha256sum < "$work/target" | cut -d' ' -f1)" = "$sum" ] || { echo "hydrated target differs" >&2; exit 1; }
  echo "$t1 - $t0" | bc
}
restore_run() { # -> seconds of restore + sync
  local t0 t1
  rm -f "$work/restored"
  t0=$(now)
  "$bin/sa-image" restore latest --to "$work/restored" --key "$work/key" --agents "$addrs" --json > /dev/null
  sync "$work/restored"
  t1=$(now)
  [ "$(sha256sum < "$work/restored" | cut -d' ' -f1)" = "$sum" ] || { echo "restored file differs" >&2; exit 1; }
  echo "$t1 - $t0" | bc
}

r=$(for _ in $(seq "$runs"); do restore_run; done | best)
h=$(for _ in $(seq "$runs"); do hydrate_run; done | best)
printf '%-44s %6.3fs = %5.0f MiB/s\n' "sa-image restore (1 GiB, 6 agents)" "$r" "$(echo "1024 / $r" | bc -l)"
printf '%-44s %6.3fs = %5.0f MiB/s  ratio restore/hydrate %.2f\n' "serve --hydrate, idle, unlimited rate" "$h" \
  "$(echo "1024 / $h" | bc -l)" "$(echo "$r / $h" | bc -l)"
grep -E '"(hydrated_stripes|hydrate_bytes|hydrate_seconds|stripes_fetched|stripes_from_cache)"' "$work/serve.json" | tr -d ' \n'; echo
