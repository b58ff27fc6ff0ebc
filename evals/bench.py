"""Speed benchmarks: pruned vs dense in one run, next to the ideal.

    python -m tokenprune.evals.bench llm [--lengths 1024 2048] [--layer 4] [--keep 0.5]
    python -m tokenprune.evals.bench vit [--batch 16] [--flops-cut 0.347]

llm: SmolLM2-135M prefill. vit: a DeiT-S-shaped ViT (random weights: speed only) with
Zero-TPrune (layers 3, 6, 9) and ToMe (merging inside every block: ToMe's constant r, and a
geometric keep share) at the Zero-TPrune paper's FLOPs cut, images/s dense vs pruned, plus
random drop at Zero-TPrune's token counts (the engine's own cost without a scoring method).

llm's ideal is the dense model's own time at the kept token counts: layers before the
pruning layer timed at the full length, layers after it at the kept length. vit's ideal gain
is what a time exactly proportional to the blocks' FLOPs would give, 1 / (1 - FLOPs cut) - 1.
Uses CUDA events on a GPU, ``perf_counter`` on the CPU. FLOPs are the adapters' exact counts
(``tokenprune.stats.decoder_layer_flops``, ``adapters.encoder.block_flops``; both checked
against ``torch.utils.flop_counter`` in the tests; the stock counter skips the CPU SDPA
kernel, so it is not used directly). Scoring work (recomputed attention, PageRank) is not in
the FLOPs: it shows as time above the ideal.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .. import FastV, prune, pruning, zoo
from .text import token_block


def pick_device(name: str | None = None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up run."""
    fn()
    return statistics.median(once(fn, device) for _ in range(repeats))


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each of ``fns``, timed in turns so load drift hits all alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(once(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


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

        handle = prune(model, FastV(layer=layer, keep_ratio=keep))
        prefill()
        stats = handle.stats
        handle.remove()
        kept = stats.tokens_per_layer[-1][0]

        def pruned():
            with pruning(model, FastV(layer=layer, keep_ratio=keep)):
                prefill()

        t = interleaved({"dense": prefill, "pruned": pruned, "short": lambda: prefill(ids[:, :kept])}, repeats, device)
        dense_t, pruned_t, short_t = t["dense"], t["pruned"], t["short"]
        dense_flops, pruned_flops = stats.dense_flops, stats.flops
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


def deit_small(device, dtype):
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    cfg = DeiTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                     image_size=224, patch_size=16, num_labels=1000)
    return DeiTForImageClassification(cfg).eval().to(device=device, dtype=dtype)


def flops_cut(model, pruner) -> float:
    """1 - counted FLOPs ratio of ``pruner`` on one image."""
    x = torch.zeros(1, 3, 224, 224, device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    handle = prune(model, pruner)
    model(x)
    ratio = handle.stats.flops_ratio
    handle.remove()
    return 1 - ratio


def keep_for_cut(model, make, cut: float) -> float:
    """The keep ratio whose counted FLOPs cut is closest to ``cut`` (bisection on one image)."""
    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops_cut(model, make(mid)) > cut else (lo, mid)
    return round((lo + hi) / 2, 4)


def r_for_cut(model, make, cut: float, top: int = 32) -> int:
    """The integer r whose counted FLOPs cut is closest to ``cut``."""
    return min(range(1, top + 1), key=lambda r: abs(flops_cut(model, make(r)) - cut))


@torch.no_grad()
def bench_vit(batch=16, cut=0.347, repeats=3, device=None) -> list[dict]:
    from .. import RandomDrop, ToMe, ZeroTPrune

    device = pick_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = deit_small(device, dtype)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    schedules = {
        "zero-tprune": lambda k: ZeroTPrune(layer=(3, 6, 9), keep_ratio=k),
        "tome-geometric": lambda k: ToMe(layer=tuple(range(12)), keep_ratio=k),
    }
    pruners = {name: make(keep_for_cut(model, make, cut)) for name, make in schedules.items()}
    constant_r = lambda r: ToMe(layer=tuple(range(12)), r=r)  # noqa: E731  ToMe's own schedule
    pruners["tome-r"] = constant_r(r_for_cut(model, constant_r, cut))
    # the same token counts as Zero-TPrune with (almost) free scoring: what the engine alone costs
    floor = pruners["zero-tprune"]
    pruners["random"] = RandomDrop(layer=floor.layer, keep_ratio=floor.keep_ratio, segment="visual",
                                   protect_first=0, protect_last=0)

    def run_with(pruner):
        def fn():
            with pruning(model, pruner):
                model(x)
        return fn

    times = interleaved({"dense": lambda: model(x), **{n: run_with(p) for n, p in pruners.items()}}, repeats, device)
    dense_t = times["dense"]
    rows = [{"device": device.type, "method": "dense", "batch": batch, "images_per_s": round(batch / dense_t, 2),
             "flops_cut": 0.0, "throughput_gain": 0.0, "ideal_gain": 0.0, "gain_minus_ideal": 0.0}]
    for name, pruner in pruners.items():
        t = times[name]
        setting = f"r={pruner.r}" if name == "tome-r" else f"keep={pruner.keep_ratio}"
        cut_here = flops_cut(model, pruner)
        ideal = 1 / (1 - cut_here) - 1
        gain = dense_t / t - 1
        rows.append({"device": device.type, "method": f"{name}({setting})", "batch": batch,
                     "images_per_s": round(batch / t, 2), "flops_cut": round(cut_here, 4),
                     "throughput_gain": round(gain, 4), "ideal_gain": round(ideal, 4),
                     "gain_minus_ideal": round(gain - ideal, 4)})
    rows.append({"device": "paper (DeiT-S, GPU, batch 256)", "method": "Zero-TPrune", "batch": 256,
                 "images_per_s": None, "flops_cut": 0.347, "throughput_gain": 0.453,
                 "ideal_gain": round(1 / (1 - 0.347) - 1, 4), "gain_minus_ideal": round(0.453 - (1 / 0.653 - 1), 4)})
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tokenprune.evals.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=["llm", "vit"], help="which benchmark")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--layer", type=int, default=4, help="first layer that runs on the pruned set")
    ap.add_argument("--keep", type=float, default=0.5, help="share of prompt tokens kept")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--batch", type=int, default=None, help="vit: images per batch (default 256 on GPU, 16 on CPU)")
    ap.add_argument("--flops-cut", type=float, default=0.347, help="vit: FLOPs cut to match (paper: 34.7%%)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.family == "vit":
        batch = args.batch or (256 if pick_device(args.device).type == "cuda" else 16)
        rows = bench_vit(batch, args.flops_cut, args.repeats, args.device)
    else:
        rows = bench_llm(args.lengths, args.layer, args.keep, args.repeats, args.device)
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
