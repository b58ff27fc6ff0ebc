"""Speed benchmarks: pruned vs dense in one run, next to the ideal.

    python -m tokenprune.evals.bench llm [--lengths 1024 2048] [--layer 4] [--keep 0.5]

The ideal is the dense model's own time at the kept token counts: layers before the
pruning layer timed at the full length, layers after it at the kept length. Uses CUDA
events on a GPU, ``perf_counter`` on the CPU. FLOPs are the decoder layers' exact counts
from ``tokenprune.stats.decoder_layer_flops`` (checked against ``torch.utils.flop_counter``
in the tests; the counter itself skips the CPU SDPA kernel, so it cannot be used directly).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .. import FastV, pruning, zoo
from .text import token_block


def pick_device(name: str | None = None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def bench_llm(lengths=(1024, 2048), layer=4, keep=0.5, repeats=3, device=None) -> list[dict]:
    device = pick_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tok = zoo.load("smollm2-135m", dtype=dtype)
    model.to(device)
    num_layers = model.config.num_hidden_layers
    rows = []
    for n in lengths:
        ids = token_block(tok, n).to(device)

        def prefill(x=ids):
            return model(x, logits_to_keep=1)  # what generate's prefill computes

        dense_t = timed(prefill, repeats, device)
        with pruning(model, FastV(layer=layer, keep_ratio=keep)) as handle:
            pruned_t = timed(prefill, repeats, device)
            stats = handle.stats
        kept = stats.tokens_per_layer[-1][0]
        dense_flops, pruned_flops = stats.dense_flops, stats.flops
        short_t = timed(lambda: prefill(ids[:, :kept]), repeats, device)
        ideal_t = (layer * dense_t + (num_layers - layer) * short_t) / num_layers
        rows.append(
            {
                "device": device.type, "tokens": n, "kept_after_layer": kept, "layer": layer,
                "dense_s": round(dense_t, 4), "pruned_s": round(pruned_t, 4), "ideal_s": round(ideal_t, 4),
                "speedup": round(dense_t / pruned_t, 3), "ideal_speedup": round(dense_t / ideal_t, 3),
                "fraction_of_ideal": round(ideal_t / pruned_t, 3),
                "savings_fraction_of_ideal": round((dense_t - pruned_t) / (dense_t - ideal_t), 3),
                "flops_ratio": round(pruned_flops / dense_flops, 4),
                "dense_gflops": round(dense_flops / 1e9, 2), "pruned_gflops": round(pruned_flops / 1e9, 2),
            }
        )
        print_table(rows[-1:], header=len(rows) == 1)
    return rows


COLUMNS = ["device", "tokens", "kept_after_layer", "dense_s", "pruned_s", "ideal_s", "speedup", "ideal_speedup",
           "fraction_of_ideal", "savings_fraction_of_ideal", "flops_ratio"]


def print_table(rows, header=True):
    if header:
        print(" | ".join(COLUMNS))
    for r in rows:
        print(" | ".join(str(r[c]) for c in COLUMNS), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tokenprune.evals.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=["llm"], help="which benchmark")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--layer", type=int, default=4, help="first layer that runs on the pruned set")
    ap.add_argument("--keep", type=float, default=0.5, help="share of prompt tokens kept")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    rows = bench_llm(args.lengths, args.layer, args.keep, args.repeats, args.device)
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
