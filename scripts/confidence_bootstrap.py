#!/usr/bin/env python3
"""Paired bootstrap of AUROC differences between confidence rules (docs/confidence.md).

For each set, resamples items with replacement (1,000 times, seed 1) and reports the AUROC
difference of each rule against sum_logprob with a 95% percentile interval. Scores are
recomputed from the saved runs as cascade computes them; ties count one half.

usage: scripts/confidence_bootstrap.py [RUNS_DIR]   (default out/smollm2)
"""
import os, random, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import confidence_runs as runs

R = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2"
sets = [s for s in ["capitals", "webquestions", "nq_open", "mawps"] if os.path.isdir(os.path.join(R, s))]
def load(s):
    return runs.load(R, s)
score = runs.score
def auroc(xs, ys):
    pos = [x for x, y in zip(xs, ys) if y]; neg = [x for x, y in zip(xs, ys) if not y]
    if not pos or not neg: return None
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs); i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]: j += 1
        for k in range(i, j + 1): ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rp = sum(r for r, y in zip(ranks, ys) if y)
    return (rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
rng = random.Random(1)
for s in sets:
    items = load(s)
    sc = {r: [score(r, l) for l, _ in items] for r in ("sum", "mean", "norm0.5")}
    ys = [c for _, c in items]
    for rule in ("norm0.5", "mean"):
        d0 = auroc(sc[rule], ys) - auroc(sc["sum"], ys)
        diffs = []
        for _ in range(1000):
            idx = [rng.randrange(len(items)) for _ in items]
            y = [ys[i] for i in idx]
            a = auroc([sc[rule][i] for i in idx], y); b = auroc([sc["sum"][i] for i in idx], y)
            if a is not None and b is not None: diffs.append(a - b)
        diffs.sort()
        lo, hi = diffs[int(0.025 * len(diffs))], diffs[int(0.975 * len(diffs)) - 1]
        print(f"{s:13s} {rule:8s} - sum: {d0:+.3f} (95% {lo:+.3f} to {hi:+.3f})")
