#!/usr/bin/env bash
# Offsite upload figures for issue 17, against a baseline measured in the same run:
#   `sa-image offsite push` of a snapshot of a random image (SIZE_MIB, default 1024; 6 local
#   agents, k=4 m=2: the push sends the k data shards, the image's bytes plus 0.4% of chunk tags
#   and headers) vs the AWS CLI (`aws s3 cp`, from PyPI: multipart, 10 threads) copying the
#   image itself, the same bytes, to the same bucket of a local three-node Garage cluster
#   (replication 3). Each run pushes to a fresh prefix, so every run uploads everything.
# Runs alternate (aws, push, aws, push, ...) $RUNS times (default 3); every run is printed, then
# the best of each, the ratio push/aws throughput (goal >= 1.0) and the push's peak RSS (memory
# stays bounded whatever the volume size: PARALLEL stripes in flight).
# Usage: bench/offsite.sh [WORKDIR]   (needs: cargo build --release; garage in ~/.cargo/bin, see
# test.sh; aws from `pip install awscli`)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SA_BIN_DIR:-$here/target/release}
work=${1:-$(mktemp -d /var/tmp/sa-bench-offsite.XXXXXX)}
runs=${RUNS:-3}
size=${SIZE_MIB:-1024}
garage=${GARAGE_BIN:-$HOME/.cargo/bin/garage}
mkdir -p "$work"
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
trap cleanup EXIT

# Three Garage nodes on 127.0.3.1-3, one zone each, replication 3.
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
for i in 1 2 3; do
  d="$work/garage/n$i"; mkdir -p "$d"
  cat > "$d/garage.toml" <<EOF
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "lmdb"
replication_factor = 3
rpc_bind_addr = "127.0.3.$i:3901"
rpc_public_addr = "127.0.3.$i:3901"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.3.$i:3900"
EOF
  RUST_LOG=garage=warn "$garage" -c "$d/garage.toml" server > "$d/log" 2>&1 &
  pids+=($!)
done
g() { "$garage" -c "$work/garage/n1/garage.toml" "$@"; }
for _ in $(seq 300); do g status > /dev/null 2>&1 && break; sleep 0.1; done
for i in 2 3; do
  g node connect "$("$garage" -c "$work/garage/n$i/garage.toml" node id -q)" > /dev/null
done
for i in 1 2 3; do
  id=$("$garage" -c "$work/garage/n$i/garage.toml" node id -q)
  g layout assign -z "dc$i" -c 10G "${id:0:16}" > /dev/null
done
g layout apply --version 1 > /dev/null
g bucket create sa-offsite > /dev/null
keyinfo=$(g key create bench)
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=garage
AWS_ACCESS_KEY_ID=$(sed -n 's/^Key ID: *//p' <<< "$keyinfo")
AWS_SECRET_ACCESS_KEY=$(sed -n 's/^Secret key: *//p' <<< "$keyinfo")
g bucket allow --read --write --owner sa-offsite --key bench > /dev/null
endpoint=http://127.0.3.1:3900

make_key
make_image "$work/img" "$size" 0
start_agents 6 "$work/agents"
"$bin/sa-image" snapshot "$work/img" --key "$work/key" --agents "$addrs" --volume bench --json > /dev/null
bytes=$(stat -c %s "$work/img")

aws_run() { # RUN
  local t0 t1
  t0=$(now)
  python3 -m awscli s3 cp --quiet "$work/img" "s3://sa-offsite/aws$1/img" --endpoint-url "$endpoint"
  t1=$(now)
  echo "$t1 - $t0" | bc
}
push_run() { # RUN
  local t0 t1
  t0=$(now)
  /usr/bin/time -f '%M %U %S' -o "$work/rss" "$bin/sa-image" offsite push --key "$work/key" \
    --agents "$addr_1" --offsite "s3://sa-offsite/push$1" --offsite-endpoint "$endpoint" \
    --offsite-region garage --json > "$work/push.json"
  t1=$(now)
  echo "$t1 - $t0" | bc
}

echo "offsite upload of a ${size} MiB random image to a local 3-node Garage (replication 3), $runs runs"
: > "$work/a"; : > "$work/p"; : > "$work/m"
for i in $(seq "$runs"); do
  a=$(aws_run "$i"); echo "$a" >> "$work/a"
  p=$(push_run "$i"); echo "$p" >> "$work/p"
  pushed=$(grep -o '"bytes_uploaded": *[0-9]*' "$work/push.json" | grep -o '[0-9]*$')
  read -r rss ucpu scpu < "$work/rss"; echo "  (push CPU: user $ucpu s, sys $scpu s)" >&2; echo "$rss" >> "$work/m"
  printf '  run %d: aws s3 cp %.3fs (%4.0f MiB/s)  offsite push %.3fs (%4.0f MiB/s, %d bytes, peak RSS %d MiB)\n' \
    "$i" "$a" "$(echo "$bytes / 1048576 / $a" | bc -l)" "$p" "$(echo "$pushed / 1048576 / $p" | bc -l)" \
    "$pushed" "$((rss / 1024))"
done
a=$(best < "$work/a"); p=$(best < "$work/p")
printf 'best aws s3 cp %.3fs (%4.0f MiB/s)  offsite push %.3fs (%4.0f MiB/s)  ratio push/aws %.2f  peak RSS %d MiB\n' \
  "$a" "$(echo "$bytes / 1048576 / $a" | bc -l)" "$p" "$(echo "$pushed / 1048576 / $p" | bc -l)" \
  "$(echo "($pushed / $p) / ($bytes / $a)" | bc -l)" "$(( $(sort -n "$work/m" | tail -1) / 1024 ))"
