"""ToMe-SD speed on a Stable-Diffusion-shaped U-Net with random weights (no weights are downloaded).

    .venv/bin/python -m tokenprune.evals.bench_unet --json results/bench_unet_cpu.json

Seconds per denoising step (one U-Net forward on the classifier-free-guidance batch of one
prompt: 2 rows) for dense, tokenprune's ``tome-sd`` and the ``tomesd`` package at each merge
ratio, timed in turns (median of ``--repeats``), next to the FLOP ideal (dense FLOPs / pruned
FLOPs of the whole U-Net, ``torch.utils.flop_counter`` with the CPU SDPA formula). Timing runs
at ``--latent`` (default 32x32, what this CPU can run in minutes); ``--flops-latent 64`` adds
exact FLOPs at the real 64x64 latent. Both implementations use tomesd's defaults
(``max_downsample=1``: only the highest-resolution blocks, self-attention only).

    .venv/bin/python -m tokenprune.evals.bench_unet --widths --shape sd21 --latent 32 \
        --flops-latent 64 --ratios 0.5 --shares 0.75 0.5 0.25 --repeats 3 --json results/bench_unet_widths_cpu.json

``--widths``: APTP's experts through the real code path. No trained router fits a random
SD-shaped U-Net, so the bench builds an UNTRAINED one (``APTPRouter.from_shares``: code k keeps
about ``--shares[k]`` of every transformer block's heads and feed-forward channels; its output
heads set so that prompt k routes to code k), saves it and loads it with
``tp.build_pruner("aptp", checkpoint=folder)``: timing only, never quality. Seconds per
denoising step (2 rows: one prompt with guidance) for dense, ``tome-sd`` at ``--ratios`` and
each expert (``code=k``: the adapter slices that code at attach). Then a mixed-prompt batch, one
prompt per code with guidance (rows ``[uncond; cond]`` as diffusers builds them, so a code's rows
are not adjacent): dense vs APTP routing and batching by code (one U-Net call; every sliced part
runs each code's rows through that code's copy) vs one U-Net call per code group. Everything is
timed in turns in one run (CUDA events on a GPU, ``perf_counter`` on the CPU), next to the FLOP
ideal (whole-U-Net FLOPs, ``torch.utils.flop_counter``: for the mixed batch, the experts' FLOPs
weighted by their rows); ``--flops-latent 64`` adds exact FLOPs at SD-2.1's 64x64 latent.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

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
    ap.add_argument("--widths", action="store_true", help="width pruning: APTP experts, mixed-prompt batches")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.75, 0.5, 0.25],
                    help="--widths: per APTP code, the share of every transformer block's heads / channels it keeps")
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
    meta = dict(command=".venv/bin/python -m tokenprune.evals.bench_unet "
                + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                shape=args.shape, unet_config={**COMMON, **SHAPES[args.shape]}, latent=args.latent, batch_rows=2,
                threads=args.threads, repeats=args.repeats, weights="random (torch.manual_seed(0))", commit=git_commit(),
                torch=torch.__version__,
                note="CPU wall-clock on a shared 2-core machine; other developers' tests may have run at the same time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=list(rows.values())), f, indent=1)


# ---- width pruning: APTP experts, mixed-prompt batches ---------------------------------------
def block_tokens(unet, latent: int) -> list[int]:
    """Tokens of each transformer block at a ``latent`` x ``latent`` input (read from a small forward)."""
    from tokenprune.adapters.unet import transformer_blocks

    small, seen = 8, []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append(int((a[0] if a else k["hidden_states"]).shape[1])),
                                         with_kwargs=True) for b in transformer_blocks(unet)]
    p = next(unet.parameters())
    try:
        step(unet, torch.zeros(1, 4, small, small, device=p.device, dtype=p.dtype), torch.tensor(500),
             torch.zeros(1, 77, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return [n * (latent // small) ** 2 for n in seen]


def untrained_router(unet, shares, prompts: torch.Tensor, uncond: torch.Tensor, latent: int, folder: str):
    """An UNTRAINED APTP router for this random U-Net, saved to ``folder`` (timing only, never quality).

    ``APTPRouter.from_shares``: code k keeps about ``shares[k]`` of every transformer block's heads
    and feed-forward channel groups. Its hypernetwork is random, so its output heads are then set
    (least squares on the pooled text features) so that ``prompts[k]`` (text states standing for
    K prompts) route to code k, and its null state is ``uncond``'s, so guidance rows follow their
    prompt: what a trained router does, by construction."""
    from tokenprune.adapters.unet import transformer_blocks, width_units
    from tokenprune.methods.aptp import layout_of
    from tokenprune.methods.aptp_router import APTPRouter

    router = APTPRouter.from_shares(layout_of(width_units(transformer_blocks(unet))), list(shares),
                                    text_dim=prompts.shape[-1], tokens=block_tokens(unet, latent),
                                    context=prompts.shape[1])
    feats = []
    hook = router.heads[0].register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        router(prompts.float().cpu())
        hook.remove()
        w = torch.linalg.pinv(feats[0].double()) @ router.codes.detach().double()  # (features, gates): exact for K <= features
        for head, cols in zip(router.heads, w.split(router.sizes, dim=1)):
            head.weight.copy_(cols.t())
        router.null.copy_(router.pooled(uncond.float().cpu(), None)[0])
    router.save(folder, trained_for="nothing: untrained, built by tokenprune.evals.bench_unet for timing")
    return router


def bench_widths(args, argv):
    import tempfile

    from tqdm import tqdm

    import tokenprune as tp
    from tokenprune.methods.aptp import load_router

    from .bench import once, pick_device

    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    unet = build_unet(args.shape).to(device)
    if dtype != torch.float32:
        unet.to(dtype)
    dim = SHAPES[args.shape]["cross_attention_dim"]
    shares = list(args.shares)
    K = len(shares)
    want = list(range(K)) * 2  # [uncond of prompts 0..K-1; cond of prompts 0..K-1], prompt k on code k
    groups = [[r for r, c in enumerate(want) if c == k] for k in range(K)]

    def batch(prompts, latent):
        """Guidance rows as diffusers builds them: [uncond x prompts; cond x prompts], same latents
        (text states: row 0 of ``inputs`` is the unconditional prompt, rows 1..K the prompts)."""
        x, t, ctx = inputs(unet, latent, dim, K + 1)
        x, ctx = torch.cat([x[1:prompts + 1]] * 2), torch.cat([ctx[:1].expand(prompts, -1, -1), ctx[1:prompts + 1]])
        return x.to(device, dtype), t, ctx.to(device, dtype)

    one, mixed = batch(1, args.latent), batch(K, args.latent)
    folder = tempfile.mkdtemp(prefix="bench-aptp-")
    _, _, text = inputs(unet, args.latent, dim, K + 1)
    untrained_router(unet, shares, text[1:], text[:1], args.latent, folder)
    load_router.cache_clear()
    aptp = tp.build_pruner("aptp", checkpoint=folder)
    codes = aptp.route(mixed[2], sample=mixed[0]).tolist()
    if codes != want:
        raise SystemExit(f"the untrained router routes the mixed batch to {codes}, not {want}")
    code_shares = aptp.code_shares()

    def whole(x, t, ctx):
        return step(unet, x, t, ctx)

    def per_code(x, t, ctx):  # one U-Net call per code group (aptp attached: each call is one group)
        out = torch.empty_like(x)
        for rows in groups:
            out[rows] = step(unet, x[rows], t, ctx[rows])
        return out

    # name -> (pruner or None, input batch, call)
    cfgs = {"dense": (None, one, whole)}
    cfgs.update({f"tome-sd {r:g}": (tp.ToMeSD(ratio=r), one, whole) for r in args.ratios})
    cfgs.update({f"aptp code {k} ({s:.2f})": (tp.build_pruner("aptp", checkpoint=folder, code=k), one, whole)
                 for k, s in enumerate(code_shares)})
    cfgs["mixed: dense"] = (None, mixed, whole)
    cfgs["mixed: aptp, batched by code"] = (aptp, mixed, whole)
    cfgs["mixed: aptp, one call per code"] = (aptp, mixed, per_code)
    expert_names = [n for n in cfgs if n.startswith("aptp code")]

    def run(name, measure):
        """``measure(fn)`` with the config attached (attaching, which slices once, is not timed; in
        the timed turns one untimed call runs first, so no config's timed call is its first)."""
        pruner, (x, t, ctx), call = cfgs[name]
        handle = tp.prune(unet, pruner) if pruner is not None else None
        try:
            return measure(lambda: call(x, t, ctx))
        finally:
            if handle is not None:
                handle.remove()
                if call is whole:  # the transformer blocks' matmuls of the call
                    block_ratio[name], block_codes[name] = handle.stats.flops_ratio, handle.stats.codes
                    block_flops[name] = handle.stats.dense_flops
                handle = None
                gc.collect()  # the sliced copies are freed here, not inside the next timed call

    block_ratio, block_codes, block_flops = {}, {}, {}
    rows, outs = {}, {}
    for name in tqdm(cfgs, desc="flops + warm-up", unit="config"):
        outs[name] = run(name, lambda f: f())
        rows[name] = dict(config=name, flops=run(name, count), rows=cfgs[name][1][0].shape[0],
                          transformer_flops_ratio=block_ratio.get(name, 1.0 if cfgs[name][0] is None else None),
                          codes=block_codes.get(name))
    times = {name: [] for name in cfgs}
    names = list(cfgs)
    with tqdm(total=args.repeats * len(cfgs), desc="timing in turns", unit="call") as bar:
        for turn in range(args.repeats):
            for name in names[turn % len(names):] + names[:turn % len(names)]:  # each turn starts one later
                times[name].append(run(name, lambda f: (f(), once(f, device))[1]))  # the 2nd call after attach
                bar.update()
    out = _width_rows(rows, outs, times, expert_names, groups, K)
    transformer_share = {args.latent: block_flops[expert_names[0]] / rows["dense"]["flops"]}
    if args.flops_latent:
        big = batch(1, args.flops_latent)
        for name in tqdm([n for n in cfgs if not n.startswith("mixed")], desc=f"flops at {args.flops_latent}"):
            cfgs[name] = (cfgs[name][0], big, whole)
            out[name][f"flops_at_{args.flops_latent}"] = run(name, count)
        dense_big = out["dense"][f"flops_at_{args.flops_latent}"]
        transformer_share[args.flops_latent] = block_flops[expert_names[0]] / dense_big
        per_expert = [out[n][f"flops_at_{args.flops_latent}"] for n in expert_names]
        out["mixed: dense"][f"flops_at_{args.flops_latent}"] = K * dense_big
        for name in ("mixed: aptp, batched by code", "mixed: aptp, one call per code"):
            out[name][f"flops_at_{args.flops_latent}"] = sum(per_expert)  # two rows per code: exact, FLOPs are per row
        for name, row in out.items():
            base = out["mixed: dense" if name.startswith("mixed") else "dense"][f"flops_at_{args.flops_latent}"]
            row[f"flops_rel_at_{args.flops_latent}"] = row[f"flops_at_{args.flops_latent}"] / base
    print("APTP router: UNTRAINED (APTPRouter.from_shares + least-squares heads so prompt k routes to code k): "
          "timing only, its experts say nothing about image quality")
    print_width_table(out, args.flops_latent)
    meta = dict(command=".venv/bin/python -m tokenprune.evals.bench_unet "
                + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                shape=args.shape, unet_config={**COMMON, **SHAPES[args.shape]}, latent=args.latent,
                flops_latent=args.flops_latent or None, device=device.type, dtype=str(dtype), threads=args.threads,
                repeats=args.repeats, shares=shares, code_shares=code_shares, codes_per_row_of_mixed_batch=codes,
                transformer_blocks_share_of_unet_flops={str(k): v for k, v in transformer_share.items()},
                weights="random (torch.manual_seed(0))", commit=git_commit(), torch=torch.__version__,
                experts="APTP experts through the real code path: tp.build_pruner('aptp', checkpoint=<router folder>) "
                        "(code=k for one expert), sliced by the U-Net adapter at attach, mixed batch routed by "
                        "aptp.route and batched by code",
                router="UNTRAINED: APTPRouter.from_shares (code k keeps the first ~shares[k] of every block's heads "
                       "and feed-forward channel groups), output heads set by least squares so that prompt k's "
                       "random text states route to code k, null state = the unconditional rows'; timing only",
                note="wall-clock on a shared 2-core machine (run with nothing else scheduled; other "
                     "developers' tests may still have run at the same time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=list(out.values())), f, indent=1)
        plot_widths(out, args.json.rsplit(".", 1)[0] + ".png", f"{args.shape}, {args.latent}x{args.latent} latent, "
                    f"{device.type}, median of {args.repeats}; APTP router untrained (timing only)")
    return out


def plot_widths(rows, path, title):
    """Measured speed-up (median and fastest) next to the FLOP ideal, per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if n not in ("dense", "mixed: dense")]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar([i - 0.27 for i in x], [rows[n]["ideal_speedup"] for n in names], 0.27, label="FLOP ideal", color="lightgray")
    ax.bar(list(x), [rows[n]["speedup"] for n in names], 0.27, label="measured (median)")
    ax.bar([i + 0.27 for i in x], [rows[n]["speedup_fastest"] for n in names], 0.27, label="measured (fastest)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(x), [n.replace(": ", ":\n").replace(", ", ",\n") for n in names], fontsize=7)
    ax.set_ylabel("speed-up vs dense (same batch)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def count(fn) -> int:
    from .metrics import flop_counter

    with flop_counter() as fc:
        fn()
    return int(fc.get_total_flops())


def _width_rows(rows, outs, times, expert_names, groups, K):
    """Medians, speed-ups against the dense run of the same batch, FLOP ideals, fidelity checks."""
    for name, row in rows.items():
        base = "mixed: dense" if name.startswith("mixed") else "dense"
        row["s_per_call"] = statistics.median(times[name])
        row["fastest_s"] = min(times[name])
        row["times_s"] = times[name]
        if name.startswith("mixed"):
            row["prompts_per_s"] = K / row["s_per_call"]
        row["speedup"] = statistics.median(times[base]) / row["s_per_call"]
        row["speedup_fastest"] = min(times[base]) / row["fastest_s"]
        row["ideal_speedup"] = rows[base]["flops"] / row["flops"]
        row["speedup_share_of_ideal"] = row["speedup"] / row["ideal_speedup"]
        ideal_gain = row["ideal_speedup"] > 1
        row["gain_share_of_ideal"] = (row["speedup"] - 1) / (row["ideal_speedup"] - 1) if ideal_gain else None
        row["gain_share_of_ideal_fastest"] = ((row["speedup_fastest"] - 1) / (row["ideal_speedup"] - 1)
                                              if ideal_gain else None)
        row["saving_share_of_ideal"] = ((1 - 1 / row["speedup"]) / (1 - 1 / row["ideal_speedup"])
                                        if row["ideal_speedup"] > 1 else None)
        row["max_abs_diff_to_dense"] = float((outs[name].float() - outs[base].float()).abs().max())
    # batching by code must give each row its code's expert output (the same rows in calls of one code)
    mixed = outs["mixed: aptp, batched by code"].float()
    row = rows["mixed: aptp, batched by code"]
    row["max_abs_diff_to_one_call_per_code"] = float((mixed - outs["mixed: aptp, one call per code"].float()).abs().max())
    # the ideal: each row at its expert's FLOPs (an expert's config runs 2 rows)
    ideal_flops = sum(len(g) * rows[n]["flops"] / 2 for n, g in zip(expert_names, groups))
    for name in ("mixed: aptp, batched by code", "mixed: aptp, one call per code"):
        rows[name]["flops_weighted_experts"] = ideal_flops
        rows[name]["ideal_speedup_weighted_experts"] = rows["mixed: dense"]["flops"] / ideal_flops
    return rows


def print_width_table(rows, flops_latent):
    rel = f"flops_rel_at_{flops_latent}" if flops_latent else None
    lines = ["| config | rows | s / call (median) | speed-up | FLOP-ideal speed-up | share of the ideal gain "
             "| fastest s | speed-up of fastest (share of ideal gain) |"
             + (f" FLOPs rel. at {flops_latent}x{flops_latent} |" if rel else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if rel else "")]

    def share(v):
        return "" if v is None else f"{v:.0%}"

    for r in rows.values():
        lines.append(f"| {r['config']} | {r['rows']} | {r['s_per_call']:.3f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x "
                     f"| {share(r['gain_share_of_ideal'])} | {r['fastest_s']:.3f} | {r['speedup_fastest']:.2f}x "
                     f"({share(r['gain_share_of_ideal_fastest'])}) |" + (f" {r[rel]:.3f} |" if rel else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
