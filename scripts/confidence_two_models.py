#!/usr/bin/env python3
"""One default rule and threshold for two models (docs/confidence.md, "The default").

For `sum_logprob` and `normalized_logprob_0.5`, the quality gain over random escalation at the
same rate (remote accuracy 1.0) per set, averaged over sets; the threshold chosen on one model's
sets and judged on the other's (leave one model out), and on every set of both.

usage: scripts/confidence_two_models.py SMOLLM2_RUNS GEMMA_RUNS
  each a directory with <set>/shard0/run.jsonl and <set>/shard1/run.jsonl (shard1 may be empty)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import confidence_runs as runs

SETS = ["capitals", "webquestions", "nq_open", "mawps", "arc", "mmlu"]


def load(root):
    return {s: runs.load(root, s) for s in SETS if os.path.isdir(os.path.join(root, s))}


def gain(rule, t, items):
    n = len(items)
    acc = sum(c for _, c in items) / n
    esc = [runs.score(rule, lps) < t for lps, _ in items]
    rate = sum(esc) / n
    quality = sum((1.0 if e else float(c)) for e, (_, c) in zip(esc, items)) / n
    return quality - (acc + (1 - acc) * rate), rate, quality


def mean_gain(rule, t, sets):
    return sum(gain(rule, t, items)[0] for items in sets.values()) / len(sets)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    models = {"smollm2": load(sys.argv[1]), "gemma3": load(sys.argv[2])}
    both = {f"{m}/{s}": items for m, sets in models.items() for s, items in sets.items()}
    grid = [-x / 20 for x in range(1, 401)]
    for rule, default in (("sum", -3.4), ("norm0.5", -0.9)):
        print(f"== {rule}")
        for name, sets in list(models.items()) + [("both", both)]:
            best = max(grid, key=lambda t: mean_gain(rule, t, sets))
            print(f"  best on {name:8s}: t={best:6.2f} mean gain there {mean_gain(rule, best, sets):+.4f}")
        for chosen_on, judged_on in (("smollm2", "gemma3"), ("gemma3", "smollm2")):
            t = max(grid, key=lambda t: mean_gain(rule, t, models[chosen_on]))
            print(f"  chosen on {chosen_on}, judged on {judged_on}: t={t:6.2f} "
                  f"mean gain {mean_gain(rule, t, models[judged_on]):+.4f}")
        print(f"  at {default}: mean gain smollm2 {mean_gain(rule, default, models['smollm2']):+.4f}, "
              f"gemma3 {mean_gain(rule, default, models['gemma3']):+.4f}, both {mean_gain(rule, default, both):+.4f}")
        for name, items in both.items():
            g, rate, q = gain(rule, default, items)
            print(f"    {name:22s} at {default}: gain {g:+.3f} escalates {rate:.3f} quality {q:.3f}")


if __name__ == "__main__":
    main()
