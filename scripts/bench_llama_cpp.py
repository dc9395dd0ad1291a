"""Times llama.cpp (through llama-cpp-python) on a GGUF file the way
`cascade bench` times Cascade: one prompt of N tokens (prefill), then D
greedy tokens one at a time (decode), several runs, medians.

Prints one JSON object. Used by scripts/bench-vs-llama-cpp.sh.
"""

import argparse
import json
import statistics
import time

import numpy as np
from llama_cpp import Llama

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    ctx = args.prompt_tokens + args.decode_tokens + 8
    llm = Llama(
        model_path=args.model,
        n_ctx=ctx,
        n_batch=max(512, args.prompt_tokens),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    # The same text as `cascade bench`, cut to exactly the token count.
    text = SENTENCE * (args.prompt_tokens // 8 + 2)
    prompt = llm.tokenize(text.encode(), add_bos=True)[: args.prompt_tokens]

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        return int(np.argmax(logits))

    def one_run(decode_tokens: int) -> tuple[float, float]:
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - started
        token = next_token()
        started = time.perf_counter()
        for _ in range(decode_tokens - 1):
            llm.eval([token])
            token = next_token()
        decode_s = time.perf_counter() - started
        return (
            len(prompt) / prefill_s,
            (decode_tokens - 1) / decode_s if decode_tokens > 1 else 0.0,
        )

    one_run(min(8, args.decode_tokens))  # warm-up, untimed
    runs = [one_run(args.decode_tokens) for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "model": args.model,
                "threads": args.threads,
                "prompt_tokens": len(prompt),
                "decode_tokens": args.decode_tokens,
                "median_prefill_tokens_per_second": statistics.median(r[0] for r in runs),
                "median_decode_tokens_per_second": statistics.median(r[1] for r in runs),
                "runs": [{"prefill": p, "decode": d} for p, d in runs],
            }
        )
    )


if __name__ == "__main__":
    main()
