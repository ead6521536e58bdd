#!/usr/bin/env bash
# Drill figure for issue 19, against a baseline measured in the same run:
#   `sa-image drill` of a snapshot of the vm-tests boot image (writer guest) on 6 local agents
#   (k=4 m=2) with 2 agents withheld: the whole command's wall time (catalog, plan, serve with an
#   overlay, qemu, the wait for the first `SA-VM-FILE` console line, screenshot, clean-up, record)
# vs a plain boot of the same image from `qemu-nbd`: qemu with the same machine (TCG, 512 MiB,
#   no display, serial on stdout, no network, virtio disk, `snapshot=on`) from its start to the
#   same console line.
# TCG on both sides: KVM on these nested hosts cannot boot a kernel (shared/test-stack.md);
# ACCEL=kvm measures both with KVM where it works.
# Prints every run and the best of $RUNS (default 3) of each, and the ratio drill/plain.
# Usage: bench/drill.sh [WORKDIR]
#   needs root (the image builder loop-mounts), qemu-system-x86, qemu-utils, and
#   cargo build --release -p sa-imager -p shard-agent && cargo build --release -p sa-vm-tests --example bench_image
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-drill.XXXXXX)}
runs=${RUNS:-3}
accel=${ACCEL:-tcg}
marker='^SA-VM-FILE '
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

now() { date +%s.%N; }
wait_for() { # FILE PATTERN [TRIES]: poll until FILE has a line matching PATTERN (20 ms steps)
  for _ in $(seq "${3:-1500}"); do grep -aq "$2" "$1" 2>/dev/null && return 0; sleep 0.02; done
  echo "timed out waiting for '$2' in $1" >&2; tail -5 "$1" >&2; return 1
}
best() { sort -n | head -1; }

img=$("$bin/examples/bench_image" "$work/image" writer)
"$bin/sa-image" keygen --out "$work/key" > /dev/null
owner=$("$bin/sa-image" owner-id --key "$work/key" | tail -1)
addrs=""
for i in 1 2 3 4 5 6; do
  mkdir -p "$work/a$i"
  "$bin/shard-agent" --dir "$work/a$i" --listen "127.0.0.$((i+1)):0" --owner "$owner" --min-free 0 \
    > "$work/a$i.out" 2>"$work/a$i.log" &
  pids+=($!)
done
for i in 1 2 3 4 5 6; do
  wait_for "$work/a$i.out" listening
  addrs="$addrs${addrs:+,}$(sed -n 's/^listening on //p' "$work/a$i.out")"
done
common=(--key "$work/key" --agents "$addrs" --cache-dir "$work/cache")
"$bin/sa-image" snapshot "$img" "${common[@]}" --volume bench --json > /dev/null

plain_run() { # -> seconds from qemu's start to the marker, booting from qemu-nbd
  local port=$((20000 + RANDOM % 20000)) out="$work/plain.out" t0 t1 nbd vm
  qemu-nbd --read-only --persistent --format=raw --bind=127.0.0.1 --port="$port" "$img" 2>"$work/nbd.err" &
  nbd=$!; pids+=($nbd)
  for _ in $(seq 500); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.02; done
  rm -f "$out"   # never match the previous run's line
  t0=$(now)
  qemu-system-x86_64 -accel "$accel" -m 512 -smp 1 -no-reboot -display none -serial stdio -monitor none \
    -nic none -drive "file=nbd://127.0.0.1:$port,format=raw,if=virtio,snapshot=on" < /dev/null > "$out" 2>&1 &
  vm=$!; pids+=($vm)
  wait_for "$out" "$marker" 6000
  t1=$(now)
  kill "$vm" "$nbd"; wait "$vm" "$nbd" 2>/dev/null || true
  echo "$t1 - $t0" | bc
}
drill_run() { # -> seconds of the whole `sa-image drill`
  local t0 t1
  t0=$(now)
  "$bin/sa-image" drill latest --volume bench "${common[@]}" --accel "$accel" --memory 512MiB \
    --console "$marker" --deadline 120s --work-dir "$work/drill" --json > "$work/drill.json"
  t1=$(now)
  grep -q '"passed": true' "$work/drill.json" || { cat "$work/drill.json" >&2; exit 1; }
  echo "$t1 - $t0" | bc
}

plain=(); drill=()
for _ in $(seq "$runs"); do plain+=("$(plain_run)"); drill+=("$(drill_run)"); done
p=$(printf '%s\n' "${plain[@]}" | best)
d=$(printf '%s\n' "${drill[@]}" | best)
echo "plain boot from qemu-nbd to '$marker' ($accel), runs: ${plain[*]}"
echo "sa-image drill, 2 of 6 agents withheld ($accel), runs: ${drill[*]}"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("last drill: withheld", len(r["withheld"]), "agents, stripes rebuilt", r["stripes_rebuilt"], ", boot", r["boot_seconds"], "s")' "$work/drill.json"
printf 'best of %d: plain %.3fs, drill %.3fs, ratio drill/plain %.2f\n' "$runs" "$p" "$d" "$(echo "$d / $p" | bc -l)"
