"""The saved runs of `cascade eval` that the confidence scripts read, and the scores cascade
computes from them (docs/confidence.md): one loader and one scoring function for both
scripts/confidence_bootstrap.py and scripts/confidence_threshold_gain.py."""
import json
import os, math


def load(runs_dir, dataset):
    """Every item of a set, (token log-probs, correct): its two shards
    (`<set>/shard0/run.jsonl`, `<set>/shard1/run.jsonl`) or its one run (`<set>/run.jsonl`)."""
    out = []
    single = f"{runs_dir}/{dataset}/run.jsonl"
    paths = [single] if os.path.exists(single) else [
        f"{runs_dir}/{dataset}/shard{k}/run.jsonl" for k in (0, 1)]
    for path in paths:
        for l in open(path):
            r = json.loads(l)
            lps = [(-math.inf if t["logprob"] is None else t["logprob"]) for t in r["tokens"]]
            out.append((lps, bool(r["correct"])))
    return out


def score(rule, lps):
    """sum_logprob ("sum"), mean_logprob ("mean") or normalized_logprob_0.5 ("norm0.5")."""
    if not lps:
        return -math.inf
    s = sum(lps); n = len(lps)
    return {"sum": s, "mean": s / n, "norm0.5": s / n ** 0.5}[rule]
