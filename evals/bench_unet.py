"""ToMe-SD speed on a Stable-Diffusion-shaped U-Net with random weights (no weights are downloaded).

    flock /tmp/tp-heavy.lock .venv/bin/python -m tokenprune.evals.bench_unet --json results/bench_unet_cpu.json

Seconds per denoising step (one U-Net forward on the classifier-free-guidance batch of one
prompt: 2 rows) for dense, tokenprune's ``tome-sd`` and the ``tomesd`` package at each merge
ratio, timed in turns (median of ``--repeats``), next to the FLOP ideal (dense FLOPs / pruned
FLOPs of the whole U-Net, ``torch.utils.flop_counter`` with the CPU SDPA formula). Timing runs
at ``--latent`` (default 32x32, what this CPU can run in minutes); ``--flops-latent 64`` adds
exact FLOPs at the real 64x64 latent. Both implementations use tomesd's defaults
(``max_downsample=1``: only the highest-resolution blocks, self-attention only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

SHAPES = {
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
}
COMMON = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              norm_num_groups=32, sample_size=64)


def git_commit():
    from .tomesd_compare import git_commit

    return git_commit()


def build_unet(shape: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**COMMON, **SHAPES[shape]).eval()


@contextmanager
def tomesd_patch(unet, ratio: float):
    import tomesd

    torch.manual_seed(0)  # tomesd forks its generator from the global RNG on first use
    tomesd.apply_patch(unet, ratio=ratio)
    try:
        yield
    finally:
        tomesd.remove_patch(unet)


def configs(unet, ratios):
    import tokenprune as tp

    out = [("dense", None, nullcontext)]
    for r in ratios:
        out.append((f"tokenprune {r:g}", r, lambda r=r: tp.pruning(unet, tp.ToMeSD(ratio=r))))
        out.append((f"tomesd {r:g}", r, lambda r=r: tomesd_patch(unet, r)))
    return out


def inputs(unet, latent: int, context_dim: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, latent, latent, generator=g), torch.tensor(500),
            torch.randn(2, 77, context_dim, generator=g))


def step(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def flops(unet, x, t, ctx) -> int:
    from .metrics import flop_counter

    with flop_counter() as fc:
        step(unet, x, t, ctx)
    return fc.get_total_flops()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="sd21")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--flops-latent", type=int, default=0, help="also count FLOPs at this latent size (e.g. 64)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    unet = build_unet(args.shape)
    cfgs = configs(unet, args.ratios)
    x, t, ctx = inputs(unet, args.latent, SHAPES[args.shape]["cross_attention_dim"])
    dense_out = step(unet, x, t, ctx)
    rows = {}
    for name, ratio, cm in tqdm(cfgs, desc="flops + warm-up", unit="config"):
        with cm():
            out = step(unet, x, t, ctx)
            rows[name] = dict(config=name, ratio=ratio, flops=flops(unet, x, t, ctx),
                              max_abs_diff_to_dense=float((out - dense_out).abs().max()))
    times = {name: [] for name, _, _ in cfgs}
    with tqdm(total=args.repeats * len(cfgs), desc="timing in turns", unit="step") as bar:
        for _ in range(args.repeats):
            for name, _, cm in cfgs:
                with cm():
                    t0 = time.perf_counter()
                    step(unet, x, t, ctx)
                    times[name].append(time.perf_counter() - t0)
                bar.update()
    dense = rows["dense"]
    dense_s = statistics.median(times["dense"])
    for name, row in rows.items():
        row["s_per_step"] = statistics.median(times[name])
        row["times_s"] = times[name]
        row["speedup"] = dense_s / row["s_per_step"]
        row["ideal_speedup"] = dense["flops"] / row["flops"]
        row["fraction_of_ideal"] = (row["speedup"] - 1) / (row["ideal_speedup"] - 1) if row["ideal_speedup"] > 1 else None
    if args.flops_latent:
        big = inputs(unet, args.flops_latent, SHAPES[args.shape]["cross_attention_dim"])
        for name, ratio, cm in tqdm([c for c in cfgs if not c[0].startswith("tomesd")], desc=f"flops at {args.flops_latent}"):
            with cm():
                rows[name][f"flops_at_{args.flops_latent}"] = flops(unet, *big)
        base = rows["dense"][f"flops_at_{args.flops_latent}"]
        for row in rows.values():
            if f"flops_at_{args.flops_latent}" in row:
                row[f"flops_rel_at_{args.flops_latent}"] = row[f"flops_at_{args.flops_latent}"] / base
    lines = ["| config | s / step | speed-up | FLOP-ideal speed-up | FLOPs rel | max abs diff to dense |", "|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['config']} | {r['s_per_step']:.3f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x "
                     f"| {r['flops'] / dense['flops']:.3f} | {r['max_abs_diff_to_dense']:.3g} |")
    print("\n".join(lines))
    meta = dict(command="flock /tmp/tp-heavy.lock .venv/bin/python -m tokenprune.evals.bench_unet "
                + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                shape=args.shape, unet_config={**COMMON, **SHAPES[args.shape]}, latent=args.latent, batch_rows=2,
                threads=args.threads, repeats=args.repeats, weights="random (torch.manual_seed(0))", commit=git_commit(),
                torch=torch.__version__,
                note="CPU wall-clock on a shared 2-core machine; other developers' tests may have run at the same time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=list(rows.values())), f, indent=1)


if __name__ == "__main__":
    main()
