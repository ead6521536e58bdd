#!/usr/bin/env bash
# NBD over TLS vs plain NBD, measured in the same run:
#   `nbdcopy URI null:` of a 1 GiB export (a filled in-memory disk served by nbd-server's
#   `serve` example, so that neither shards nor disks are in the way), once against a plain
#   server and once against a TLS server (rustls, ring; NBD_OPT_STARTTLS), alternating, $RUNS
#   times each (default 5), with nbdcopy's default connections (4, the export allows
#   multi-conn) and with --connections=1. Prints every run, the medians and the ratio.
# The certificates (a CA and a server certificate for 127.0.0.1) are made with openssl.
# Usage: bench/nbd-tls.sh   (needs: cargo build --release -p nbd-server --example serve;
#                            libnbd-bin, openssl; EXAMPLE=path overrides the example binary)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$here/target}
example=${EXAMPLE:-$target/release/examples/serve}
runs=${RUNS:-5}
size=$((1024 << 20))
work=$(mktemp -d /var/tmp/sa-bench-nbd-tls.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
[ -x "$example" ] || { echo "missing $example: cargo build --release -p nbd-server --example serve" >&2; exit 1; }

now() { date +%s.%N; }
wait_for() { # FILE PATTERN: poll until FILE has a line matching PATTERN (20 ms steps, 60 s)
  for _ in $(seq 3000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.02; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

pki=$work/pki; mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$pki/ca-key.pem" -out "$pki/ca-cert.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$pki/server-key.pem" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$work/san.ext"
openssl x509 -req -in "$work/server.csr" -CA "$pki/ca-cert.pem" -CAkey "$pki/ca-key.pem" \
  -CAcreateserial -days 2 -extfile "$work/san.ext" -out "$pki/server-cert.pem" 2>/dev/null

"$example" --listen 127.0.0.1:0 --size "$size" --fill > "$work/plain.out" 2> "$work/plain.err" &
pids+=($!)
"$example" --listen 127.0.0.1:0 --size "$size" --fill \
  --tls-cert "$pki/server-cert.pem" --tls-key "$pki/server-key.pem" > "$work/tls.out" 2> "$work/tls.err" &
pids+=($!)
wait_for "$work/plain.out" '^listening on '
wait_for "$work/tls.out" '^listening on '
plain="nbd://$(sed -n 's/^listening on //p' "$work/plain.out")/disk"
tls="nbds://$(sed -n 's/^listening on //p' "$work/tls.out")/disk?tls-certificates=$pki"

copy() { # URI [nbdcopy flags] -> MiB/s
  local t0 t1
  t0=$(now)
  nbdcopy "${@:2}" "$1" null:
  t1=$(now)
  echo "scale=1; 1024 / ($t1 - $t0)" | bc
}

echo "nbdcopy of a 1 GiB export to null:, $runs alternating runs each (MiB/s)"
for conns in default 1; do
  flags=(); [ "$conns" = default ] || flags=(--connections="$conns")
  copy "$plain" "${flags[@]}" > /dev/null   # warm-up
  copy "$tls" "${flags[@]}" > /dev/null
  : > "$work/p"; : > "$work/t"
  for i in $(seq "$runs"); do
    p=$(copy "$plain" "${flags[@]}"); echo "$p" >> "$work/p"
    t=$(copy "$tls" "${flags[@]}"); echo "$t" >> "$work/t"
    echo "  connections=$conns run $i: plain $p  tls $t"
  done
  pm=$(median < "$work/p"); tm=$(median < "$work/t")
  echo "connections=$conns: median plain $pm MiB/s, tls $tm MiB/s, tls/plain $(echo "scale=2; $tm / $pm" | bc)"
done
