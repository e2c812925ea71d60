"""Parses a semcache /metrics page with the Prometheus client's text parser.

Usage: python check_metrics.py METRICS_FILE
Prints `name{labels} value` lines for the tests to read; exits non-zero if the page
does not parse or breaks the naming conventions (counters end in _total, units in names).
"""
import sys

from prometheus_client.parser import text_string_to_metric_families

text = open(sys.argv[1], encoding="utf-8").read()
for family in text_string_to_metric_families(text):
    assert family.name.startswith(("semcache_", "process_")), family.name
    if family.type == "counter":
        # The parser strips _total from counter family names; samples keep it.
        assert all(s.name.endswith("_total") or s.name.endswith("_created") for s in family.samples), family.name
    if family.type == "histogram":
        assert family.name.endswith(("_seconds", "_size")), family.name
    for sample in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
        print(f"{sample.name}{{{labels}}} {sample.value}")
