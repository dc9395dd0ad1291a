#!/usr/bin/env python3
"""The hidden-state probe's table in docs/confidence.md, from `cascade calibrate --probe` reports.

Usage: confidence_probe_table.py LABEL=DIR1,DIR2,... [LABEL=...]
Each DIR holds the calibration.json of one seed; cells are the mean AUROC over the seeds with
the range, then the mean share of the random-to-oracle APGR headroom.
"""
import json
import sys


def load(d):
    with open(f"{d}/calibration.json") as f:
        p = json.load(f)["probe"]
    return {s["dataset"]: s for s in p["sets"] + [p["pooled"]]}


def cell(figures):
    figures = [f for f in figures if f and f.get("auroc") is not None]
    if not figures:
        return "-"
    a = [f["auroc"] for f in figures]
    h = [f["headroom"] for f in figures if f.get("headroom") is not None]
    spread = f" ({min(a):.2f}-{max(a):.2f})" if len(a) > 1 else ""
    share = f" / {100 * sum(h) / len(h):.0f}%" if h else ""
    return f"{sum(a) / len(a):.3f}{spread}{share}"


variants = [(a.split("=", 1)[0], [load(d) for d in a.split("=", 1)[1].split(",")]) for a in sys.argv[1:]]
first = variants[0][1][0]
sets = [k for k in first if k != "pooled"] + ["pooled"]
print("| rule | " + " | ".join(sets) + " |")
print("|---|" + "---|" * len(sets))
print("| items / local accuracy | " + " | ".join(f"{first[s]['items']} / {100 * first[s]['local_accuracy']:.1f}%" for s in sets) + " |")
print("| sum_logprob (default) | " + " | ".join(cell([first[s]["sum_logprob"]]) for s in sets) + " |")
print("| mean_logprob | " + " | ".join(cell([first[s]["mean_logprob"]]) for s in sets) + " |")
for label, runs in variants:
    print(f"| probe {label}, in-set | " + " | ".join(cell([r[s]["probe_in_set"] for r in runs]) for s in sets) + " |")
    print(f"| probe {label}, cross-set | " + " | ".join(cell([r[s]["probe_cross_set"] for r in runs]) for s in sets) + " |")
