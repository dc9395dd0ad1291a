#!/usr/bin/env python3
"""One threshold for every kind of traffic (docs/confidence.md, "The default").

Per dataset, the quality gain over random escalation at the same rate (remote accuracy 1.0),
averaged over datasets so that a large set does not outvote a small one; the threshold with the
largest average gain, chosen on all sets and with each set left out. Scores are recomputed from
the saved runs (`run.jsonl` of `cascade eval`, two shards per set) as cascade computes them:
the sum of token log-probs, and the sum over sqrt(length) for normalized_logprob_0.5.

usage: scripts/confidence_threshold_gain.py [RUNS_DIR]   (default out/smollm2)
"""
import os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import confidence_runs as runs

R = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2"
sets = [s for s in ["capitals", "webquestions", "nq_open", "mawps", "arc", "mmlu"] if os.path.isdir(os.path.join(R, s))]
def load(s):
    return runs.load(R, s)
data = {s: load(s) for s in sets}
score = runs.score
def gain(rule, t, items):
    n = len(items); acc = sum(c for _, c in items) / n
    esc = [score(rule, l) < t for l, _ in items]
    rate = sum(esc) / n
    q = sum((1.0 if e else float(c)) for e, (_, c) in zip(esc, items)) / n
    return q - (acc + (1 - acc) * rate), rate, q
grid = [-x / 20 for x in range(1, 401)]
for rule in ["sum", "norm0.5"]:
    for pool in (sets, sets[:4]):
        best = max(grid, key=lambda t: sum(gain(rule, t, data[s])[0] for s in pool) / len(pool))
        print(rule, "pool", len(pool), "sets: threshold", best)
    for held in sets:
        others = [s for s in sets if s != held]
        t = max(grid, key=lambda t: sum(gain(rule, t, data[s])[0] for s in others) / len(others))
        g, rate, q = gain(rule, t, data[held])
        print(f"  {rule} LODO {held:13s} t={t:6.2f} held-out gain {g:+.3f} rate {rate:.3f} quality {q:.3f}")
for held in sets:
    g, rate, q = gain("sum", -3.4, data[held])
    print(f"  sum -3.4 on {held:13s} gain {g:+.3f} rate {rate:.3f} quality {q:.3f}")
for t in (-0.9, -1.0, -1.1):
    for held in sets:
        g, rate, q = gain("norm0.5", t, data[held])
        print(f"  norm0.5 {t} on {held:13s} gain {g:+.3f} rate {rate:.3f} quality {q:.3f}")
