#!/usr/bin/env python3
"""Writes few-shot completion versions of the factoid development sets, for a base model.

A base model (Gemma 3 270M from PyPI has no chat template) does not answer an instruction; it
continues text. Each item becomes two fixed worked examples, then the question, in the
`Q: ... / A:` form, with `stop: ["\\n"]` so that generation ends with the answer line instead
of going on to invent the next question (whose words grading by containment would read).
The examples are fixed and none is an item of the sets, so nothing of a set leaks into its
own prompts.

    python3 scripts/fewshot_sets.py ../shared/data out/fewshot
    cascade eval --model models/gemma-3-270m-Q4_K_M.gguf --template plain \
        --dataset out/fewshot/capitals.jsonl --out out/gemma/capitals

Writes capitals.jsonl, webquestions.jsonl and nq_open.jsonl (the whole sets, in the order of
the built-in readers, so `--limit N --seed S` picks the same items as for the built-in set).
"""

import json
import os
import sys

CAPITAL_SHOTS = (
    "Q: What is the capital of France?\nA: Paris\n\n"
    "Q: What is the capital of Japan?\nA: Tokyo\n\n"
)
FACTOID_SHOTS = (
    "Q: Who wrote the play Romeo and Juliet?\nA: William Shakespeare\n\n"
    "Q: What is the largest planet in the solar system?\nA: Jupiter\n\n"
)


def is_web_address(answer: str) -> bool:
    a = answer.strip().lower()
    return a.startswith(("http://", "https://", "www."))


def item(id_, prompt, answers, max_tokens):
    return {"id": id_, "prompt": prompt, "answers": answers, "max_tokens": max_tokens,
            "stop": ["\n"]}


def capitals(data):
    for line in open(os.path.join(data, "capitals", "capitals-dev.jsonl")):
        r = json.loads(line)
        answers = r["capital"] if isinstance(r["capital"], list) else [r["capital"]]
        yield item(r["cca3"], f"{CAPITAL_SHOTS}Q: What is the capital of {r['country']}?\nA:",
                   answers, 8)


def webquestions(data):
    for r in json.load(open(os.path.join(data, "webquestions", "val.json"))):
        answers = [a for a in r["answers"] if not is_web_address(a)]
        if not answers:
            continue
        q = r["qText"].strip()
        yield item(f"webquestions/{r['qId']}", f"{FACTOID_SHOTS}Q: {q}\nA:", answers, 16)


def nq_open(data):
    path = os.path.join(data, "nq_open", "NQ-open.efficientqa.dev.1.1.jsonl")
    for n, line in enumerate(open(path), start=1):
        r = json.loads(line)
        q = r["question"].strip()
        if not q.endswith("?"):
            q += "?"
        q = q[0].upper() + q[1:]
        yield item(f"nq_open/{n}", f"{FACTOID_SHOTS}Q: {q}\nA:", r["answer"], 16)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    data, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for name, rows in (("capitals", capitals), ("webquestions", webquestions),
                       ("nq_open", nq_open)):
        path = os.path.join(out, f"{name}.jsonl")
        with open(path, "w") as f:
            count = 0
            for row in rows(data):
                f.write(json.dumps(row) + "\n")
                count += 1
        print(f"{path}: {count} items")


if __name__ == "__main__":
    main()
