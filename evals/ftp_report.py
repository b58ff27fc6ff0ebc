"""The FTP side-by-side table (``results/smollm2-ftp/table.md``) from ``tokenprune eval``'s results.json,
and (``--time``) the routing overhead of ``ftp`` on a 512-token SmolLM2-135M prefill.

One row per (sparsity, method): sparsity is the share of the pass's token-block computations
skipped (512 context + 128 scored tokens), "run at" the method's own ``sparsity``: a method that
spares the scored tokens (``ftp`` by default, ``skip-rank``) spends the whole share on the context,
so it runs at 1.25 x. ``scored_skipped``: the realised share of the scored tokens' token-block
computations skipped; compare rows at equal FLOPs.

    .venv/bin/python -m evals.ftp_report results/smollm2-ftp
    .venv/bin/python -m evals.ftp_report --time   # alone on the machine, 2 threads
    .venv/bin/python -m evals.ftp_report --time 1     # one core of a shared machine
"""
from __future__ import annotations

import json
import os
import sys


def table(rows: list[dict]) -> str:
    lines = ["| sparsity | method | run at | perplexity | next-token agreement | FLOPs rel. | scored tokens' blocks skipped "
             "| KV rel. | prefill time rel. |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [r for r in rows if r["status"] == "ok"]
    # the share of the pass skipped (1 - budget); a method that spares the scored tokens runs at a
    # higher sparsity on the context (its config), the same compute
    sparsity = [round(1 - r["budget"], 6) if r.get("budget") is not None else 0.0 for r in rows]
    for s, r in sorted(zip(sparsity, rows), key=lambda t: t[0]):  # by sparsity, methods in run order
        run_at = (r.get("config") or {}).get("sparsity", 0.0)
        lines.append(f"| {s:g} | {r['label']} | {run_at:g} | {r['quality']:.2f} | {r['agreement']:.3f} | {r['flops_rel']:.3f} | "
                     f"{r.get('scored_skipped', 0.0):.3f} | {r['kv_rel']:.3f} | {r['latency_rel']:.2f} |")
    return "\n".join(lines)


def time_routing(threads: int = 2, repeats: int = 7) -> None:
    """Prefill time (the next token's logits after 512 tokens) relative to dense (median of ``repeats``,
    dense timed before and after each config): ``ftp`` routing only (sparsity 1e-4: every select
    runs, nothing skips), the sink share on the router's head vs all heads, skip-random routing only
    (the engine's hooks with a trivial select), and at sparsity 0.3 next to skip-random (no features)."""
    import time

    import torch

    import tokenprune as tp
    from tokenprune.evals.bench import routing_only

    torch.set_num_threads(threads)
    model, _ = tp.zoo.load("smollm2-135m")
    ids = torch.randint(100, 20000, (1, 512), generator=torch.Generator().manual_seed(0))

    def median(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    configs = [("ftp, routing only", dict(sparsity=1e-4), False), ("ftp static rule, routing only",
               dict(sparsity=1e-4, static=True), False), ("ftp, routing only, all heads", dict(sparsity=1e-4), True),
               ("skip-random, routing only", "routing", False),
               ("ftp 0.3", dict(sparsity=0.3), False), ("ftp 0.3, all heads", dict(sparsity=0.3), True),
               ("skip-random 0.3", None, False)]
    with torch.no_grad():
        for label, config, all_heads in configs:
            if isinstance(config, dict):
                pruner = tp.build_pruner("ftp", **config)
            else:
                pruner = tp.build_pruner("skip-random", sparsity=0.3)
                pruner = routing_only(pruner) if config == "routing" else pruner
            heads = pruner.router.heads if isinstance(config, dict) else None
            if all_heads:
                pruner.router.heads = None
            try:
                before = median(lambda: model(ids, logits_to_keep=1))
                with tp.pruning(model, pruner) as handle:
                    routed = median(lambda: model(ids, logits_to_keep=1))
                    flops = handle.stats.flops_ratio
                after = median(lambda: model(ids, logits_to_keep=1))
            finally:
                if isinstance(config, dict):
                    pruner.router.heads = heads
            dense = (before + after) / 2
            print(f"{label}: prefill time rel. dense {routed / dense:.4f} (dense {dense * 1000:.0f} ms), "
                  f"FLOPs rel. {flops:.3f}", flush=True)


def main(folder: str = "results/smollm2-ftp", threads: str = "2") -> None:
    if folder == "--time":  # --time [threads]
        return time_routing(int(threads))
    data = json.load(open(os.path.join(folder, "results.json")))
    text = f"`{data['meta']['command']}`\n\n" + table(data["rows"]) + "\n"
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
