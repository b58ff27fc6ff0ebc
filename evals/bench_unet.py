"""ToMe-SD speed on a Stable-Diffusion-shaped U-Net with random weights (no weights are downloaded).

    flock /tmp/tp-heavy.lock .venv/bin/python -m tokenprune.evals.bench_unet --json results/bench_unet_cpu.json

Seconds per denoising step (one U-Net forward on the classifier-free-guidance batch of one
prompt: 2 rows) for dense, tokenprune's ``tome-sd`` and the ``tomesd`` package at each merge
ratio, timed in turns (median of ``--repeats``), next to the FLOP ideal (dense FLOPs / pruned
FLOPs of the whole U-Net, ``torch.utils.flop_counter`` with the CPU SDPA formula). Timing runs
at ``--latent`` (default 32x32, what this CPU can run in minutes); ``--flops-latent 64`` adds
exact FLOPs at the real 64x64 latent. Both implementations use tomesd's defaults
(``max_downsample=1``: only the highest-resolution blocks, self-attention only).

    /work/notes/heavy-all .venv/bin/python -m tokenprune.evals.bench_unet --widths \
        --json results/bench_unet_widths_cpu.json

``--widths``: width pruning. Seconds per denoising step (2 rows: one prompt with guidance) for
dense, ``tome-sd`` at ``--ratios`` and ``unet-static`` at each of ``--keeps``, whose slices are
also the experts of a codebook (one code per keep: what an APTP code is, a kept width per
block; no trained router fits this random U-Net). Then a mixed-prompt batch: one prompt per
code with guidance (rows ``[uncond; cond]`` as diffusers builds them, so a code's rows are not
adjacent), dense vs batching by code (the adapter's routing: one U-Net call, every sliced part
runs each code's rows through that code's copy) vs one U-Net call per code group. Everything is
timed in turns in one run (CUDA events on a GPU, ``perf_counter`` on the CPU), next to the FLOP
ideal (whole-U-Net FLOPs, ``torch.utils.flop_counter``: for the mixed batch, the experts' FLOPs
weighted by their rows); ``--flops-latent 64`` adds exact FLOPs at SD-2.1's 64x64 latent.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..pruner import Pruner

SHAPES = {
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    # the same layout at 1/10 of the widths: a smoke run of the script in seconds
    "tiny": dict(cross_attention_dim=64, attention_head_dim=8, block_out_channels=(32, 64, 128, 128), norm_num_groups=8),
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
    return UNet2DConditionModel(**{**COMMON, **SHAPES[shape]}).eval()


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


def inputs(unet, latent: int, context_dim: int, rows: int = 2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, 4, latent, latent, generator=g), torch.tensor(500),
            torch.randn(rows, 77, context_dim, generator=g))


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
    ap.add_argument("--widths", action="store_true", help="width pruning: unet-static, code experts, mixed batches")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5, 0.25], help="--widths: unet-static keeps = codes")
    ap.add_argument("--device", default=None, help="--widths: cuda or cpu (default: cuda when available)")
    args = ap.parse_args(argv)
    if args.widths:
        return bench_widths(args, argv)
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


# ---- width pruning: unet-static, code experts, mixed-prompt batches ------------------------------
@dataclass
class CodeBook(Pruner):
    """Bench-only width pruner: fixed experts (kept heads / channels per block) and a fixed code
    per row, attached through the U-Net adapter's routing exactly as APTP's experts are."""

    name = "bench-codebook"
    masks: list = field(default_factory=list)
    codes: tuple = ()

    def layers(self):
        return []

    def select(self, state):
        return None

    def experts(self, units):
        return self.masks

    def route(self, context, mask=None, sample=None):
        return torch.tensor(self.codes)


def bench_widths(args, argv):
    from tqdm import tqdm

    import tokenprune as tp
    from tokenprune.adapters.unet import transformer_blocks, width_units

    from .bench import once, pick_device

    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    unet = build_unet(args.shape).to(device)
    if dtype != torch.float32:
        unet.to(dtype)
    dim = SHAPES[args.shape]["cross_attention_dim"]
    keeps = list(args.keeps)
    statics = {k: tp.build_pruner("unet-static", keep=k) for k in keeps}
    masks = [statics[k].experts(width_units(transformer_blocks(unet)))[0] for k in keeps]
    K = len(keeps)
    codes = tuple(range(K)) * 2  # [uncond of prompts 0..K-1; cond of prompts 0..K-1]
    groups = [[r for r, c in enumerate(codes) if c == k] for k in range(K)]

    def batch(prompts, latent):
        """Guidance rows as diffusers builds them: [uncond x prompts; cond x prompts], same latents."""
        x, t, ctx = inputs(unet, latent, dim, prompts + 1)
        x, ctx = torch.cat([x[1:], x[1:]]), torch.cat([ctx[:1].expand(prompts, -1, -1), ctx[1:]])
        return x.to(device, dtype), t, ctx.to(device, dtype)

    one, mixed = batch(1, args.latent), batch(K, args.latent)

    def whole(x, t, ctx):
        return step(unet, x, t, ctx)

    def per_group(x, t, ctx):  # one U-Net call per code group (the codebook attached)
        out = torch.empty_like(x)
        for k, rows in enumerate(groups):
            book.codes = (k,) * len(rows)
            out[rows] = step(unet, x[rows], t, ctx[rows])
        book.codes = codes
        return out

    # name -> (pruner or None, input batch, call)
    cfgs = {"dense": (None, one, whole)}
    cfgs.update({f"tome-sd {r:g}": (tp.ToMeSD(ratio=r), one, whole) for r in args.ratios})
    cfgs.update({f"unet-static {k:g} = code {i}": (statics[k], one, whole) for i, k in enumerate(keeps)})
    book = CodeBook(masks=masks, codes=codes)
    cfgs["mixed: dense"] = (None, mixed, whole)
    cfgs["mixed: batched by code"] = (book, mixed, whole)
    cfgs["mixed: one call per code"] = (book, mixed, per_group)

    def run(name, measure):
        """``measure(fn)`` with the config attached (attaching, which slices once, is not timed)."""
        pruner, (x, t, ctx), call = cfgs[name]
        handle = tp.prune(unet, pruner) if pruner is not None else None
        try:
            return measure(lambda: call(x, t, ctx))
        finally:
            if handle is not None:
                handle.remove()
                if call is whole:  # the transformer blocks' matmuls of the call
                    block_ratio[name] = handle.stats.flops_ratio

    block_ratio = {}

    rows, outs = {}, {}
    for name in tqdm(cfgs, desc="flops + warm-up", unit="config"):
        outs[name] = run(name, lambda f: f())
        rows[name] = dict(config=name, flops=run(name, count), rows=cfgs[name][1][0].shape[0],
                          transformer_flops_ratio=block_ratio.get(name, 1.0 if cfgs[name][0] is None else None))
    times = {name: [] for name in cfgs}
    with tqdm(total=args.repeats * len(cfgs), desc="timing in turns", unit="call") as bar:
        for _ in range(args.repeats):
            for name in cfgs:
                times[name].append(run(name, lambda f: once(f, device)))
                bar.update()
    out = _width_rows(args, rows, outs, times, keeps, groups)
    if args.flops_latent:
        big = batch(1, args.flops_latent)
        for name in tqdm([n for n in cfgs if not n.startswith("mixed")], desc=f"flops at {args.flops_latent}"):
            cfgs[name] = (cfgs[name][0], big, whole)
            out[name][f"flops_at_{args.flops_latent}"] = run(name, count)
        dense_big = out["dense"][f"flops_at_{args.flops_latent}"]
        per_code = [out[f"unet-static {k:g} = code {i}"][f"flops_at_{args.flops_latent}"] for i, k in enumerate(keeps)]
        out["mixed: dense"][f"flops_at_{args.flops_latent}"] = K * dense_big
        for name in ("mixed: batched by code", "mixed: one call per code"):
            out[name][f"flops_at_{args.flops_latent}"] = sum(per_code)  # two rows per code: exact, FLOPs are per row
        for name, row in out.items():
            base = out["mixed: dense" if name.startswith("mixed") else "dense"][f"flops_at_{args.flops_latent}"]
            row[f"flops_rel_at_{args.flops_latent}"] = row[f"flops_at_{args.flops_latent}"] / base
    print_width_table(out, args.flops_latent)
    meta = dict(command="/work/notes/heavy-all .venv/bin/python -m tokenprune.evals.bench_unet "
                + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                shape=args.shape, unet_config={**COMMON, **SHAPES[args.shape]}, latent=args.latent,
                flops_latent=args.flops_latent or None, device=device.type, dtype=str(dtype), threads=args.threads,
                repeats=args.repeats, keeps=keeps, codes_per_row_of_mixed_batch=list(codes),
                weights="random (torch.manual_seed(0))", commit=git_commit(), torch=torch.__version__,
                experts="unet-static slices at --keeps (L1-norm heads / channels, uniform share per block), one code each; "
                        "no trained APTP router fits a random SD-2.1-shaped U-Net",
                note="wall-clock on a shared 2-core machine (held alone through /work/notes/heavy-all; other "
                     "developers' tests may still have run at the same time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=list(out.values())), f, indent=1)
    return out


def count(fn) -> int:
    from .metrics import flop_counter

    with flop_counter() as fc:
        fn()
    return int(fc.get_total_flops())


def _width_rows(args, rows, outs, times, keeps, groups):
    """Medians, speed-ups against the dense run of the same batch, FLOP ideals, fidelity checks."""
    for name, row in rows.items():
        base = "mixed: dense" if name.startswith("mixed") else "dense"
        row["s_per_call"] = statistics.median(times[name])
        row["times_s"] = times[name]
        row["speedup"] = statistics.median(times[base]) / row["s_per_call"]
        row["ideal_speedup"] = rows[base]["flops"] / row["flops"]
        row["speedup_share_of_ideal"] = row["speedup"] / row["ideal_speedup"]
        row["saving_share_of_ideal"] = ((1 - 1 / row["speedup"]) / (1 - 1 / row["ideal_speedup"])
                                        if row["ideal_speedup"] > 1 else None)
        row["max_abs_diff_to_dense"] = float((outs[name].float() - outs[base].float()).abs().max())
    # batching by code must give each row its code's expert output (the same rows run alone)
    mixed = outs["mixed: batched by code"].float()
    row = rows["mixed: batched by code"]
    row["max_abs_diff_to_one_call_per_code"] = float((mixed - outs["mixed: one call per code"].float()).abs().max())
    ideal_flops = sum(len(g) * rows[f"unet-static {k:g} = code {i}"]["flops"] / 2 for i, (k, g) in enumerate(zip(keeps, groups)))
    for name in ("mixed: batched by code", "mixed: one call per code"):
        rows[name]["flops_weighted_experts"] = ideal_flops
    return rows


def print_width_table(rows, flops_latent):
    rel = f"flops_rel_at_{flops_latent}" if flops_latent else None
    lines = ["| config | rows | s / call | speed-up | FLOP-ideal speed-up | share of ideal (speed-up / saving) |"
             + (f" FLOPs rel. at {flops_latent}x{flops_latent} |" if rel else ""),
             "|---|---|---|---|---|---|" + ("---|" if rel else "")]
    for r in rows.values():
        saving = "" if r["saving_share_of_ideal"] is None else f" / {r['saving_share_of_ideal']:.0%}"
        lines.append(f"| {r['config']} | {r['rows']} | {r['s_per_call']:.3f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x "
                     f"| {r['speedup_share_of_ideal']:.0%}{saving} |" + (f" {r[rel]:.3f} |" if rel else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
