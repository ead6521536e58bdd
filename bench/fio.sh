# Random reads with fio's nbd engine, for the bench scripts (sourced, not run).
# shellcheck shell=bash

# fio_randread URI SIZE_MIB SECS JSON_FILE -> "IOPS P50_MS P99_MS": 4 KiB random reads at queue
# depth 16 over SIZE_MIB of the export for SECS seconds (completion latency percentiles).
fio_randread() {
  fio --name=randread --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=16 \
    --size="$2m" --time_based --runtime="$3" --randrepeat=0 --norandommap \
    --output-format=json > "$4" 2> "$4.err" || { cat "$4.err" >&2; return 1; }
  python3 -c '
import json, sys
text = open(sys.argv[1]).read()  # fio prints "connected to NBD server" before its JSON
j = json.loads(text[text.index("{"):])["jobs"][0]["read"]
p = j["clat_ns"]["percentile"]
print("%.0f %.2f %.2f" % (j["iops"], p["50.000000"] / 1e6, p["99.000000"] / 1e6))
' "$4"
}
