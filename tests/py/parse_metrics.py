"""Parses Prometheus text (stdin) with prometheus_client's own parser and prints its samples as
JSON: [{"family", "type", "name", "labels", "value"}, ...]."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append(
            {"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels, "value": s.value}
        )
print(json.dumps(out))
