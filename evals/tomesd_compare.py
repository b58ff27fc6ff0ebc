"""ToMe-SD side by side: tokenprune's ``tome-sd`` and the ``tomesd`` package (0.1.3) on one U-Net.

    .venv/bin/python -m tokenprune.evals.tomesd_compare --out results/tiny-t2i --limit 96 --kinds color-shape size position size-position --threads 1

On ``tiny-t2i`` (``tp.zoo.load("tiny-t2i")``), dense and both implementations at each merge
ratio, in one run: prompt faithfulness and Fréchet distance (``t2i_scores``: same prompts,
same initial noise for every configuration), pixel difference to the dense images, the
judge's agreement with its labels of the dense images, FLOPs of a whole pipeline call
(``torch.utils.flop_counter`` with the CPU SDPA formula of ``evals/metrics.py``) and wall-clock (pipeline calls timed in turns, median).
Both merge in self-attention only (tomesd's defaults) with ``max_downsample=2``: tiny-t2i's
32x32 level has no attention, so its highest-resolution attention maps (16x16) are at
downsample 2, and tomesd's default of 1 would merge nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch


@contextmanager
def tomesd_patch(pipe, ratio: float, max_downsample: int, seed: int):
    import tomesd

    torch.manual_seed(seed)  # tomesd forks its generator from the global RNG on first use
    tomesd.apply_patch(pipe, ratio=ratio, max_downsample=max_downsample)
    try:
        yield None
    finally:
        tomesd.remove_patch(pipe)


def git_commit() -> str | None:
    """The repo commit the numbers come from (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return out.stdout.strip() or None


def configs(pipe, ratios, max_downsample, seed):
    import tokenprune as tp

    out = [("dense", None, lambda: nullcontext())]
    for r in ratios:
        out.append((f"tokenprune tome-sd {r:g}", r,
                    lambda r=r: tp.pruning(pipe, tp.ToMeSD(ratio=r, max_downsample=max_downsample, seed=seed))))
        out.append((f"tomesd {r:g}", r, lambda r=r: tomesd_patch(pipe, r, max_downsample, seed)))
    return out


def pipeline_flops(pipe, prompts, steps, guidance) -> int:
    from .metrics import flop_counter  # counts the CPU SDPA kernel too

    with flop_counter() as fc:
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
             output_type="pt")
    return fc.get_total_flops()


def image_grid(images: dict, path: Path, cols: int, scale: int = 2):
    """One row per configuration (label on the left), the first ``cols`` images of each."""
    from PIL import Image, ImageDraw

    size, label_w = 32 * scale, 150
    rows = list(images)
    grid = Image.new("RGB", (label_w + cols * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    for i, name in enumerate(rows):
        draw.text((4, i * size + size // 2 - 6), name, fill="black")
        for j, img in enumerate(images[name][:cols]):
            arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            grid.paste(Image.fromarray(arr).resize((size, size), Image.NEAREST), (label_w + j * size, i * size))
    grid.save(path)


def plot(rows, dense, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("faithfulness", "prompt faithfulness (judge)"), ("pixel_diff", "mean |image - dense| (0..1)"),
              ("speedup", "wall-clock speed-up vs dense")]
    for ax, (key, title) in zip(axes, panels):
        for impl, marker in (("tokenprune", "o"), ("tomesd", "s")):
            pts = [(r["ratio"], r[key]) for r in rows if r["impl"] == impl]
            ax.plot(*zip(*pts), marker=marker, label=impl)
        ax.axhline(dense[key], color="gray", ls="--", lw=1, label="dense")
        ax.set_xlabel("merge ratio")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--limit", type=int, default=240, help="prompts scored per configuration")
    ap.add_argument("--kinds", nargs="+", default=["color-shape"],
                    help="prompt kinds (tokenprune.zoo.t2i.KINDS), taken in turn")
    ap.add_argument("--timing-prompts", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=24,
                    help="prompts per pipeline call (24 = the eval harness's, so both draw the same noise)")
    ap.add_argument("--repeats", type=int, default=3, help="timed pipeline calls per configuration, in turns")
    ap.add_argument("--max-downsample", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/tiny-t2i")
    args = ap.parse_args(argv)

    import tomesd
    from tqdm import tqdm

    import tokenprune as tp
    from tokenprune.zoo import t2i

    torch.set_num_threads(args.threads)
    pipe, judge = tp.zoo.load("tiny-t2i")
    steps, guidance = t2i.DEFAULT_STEPS, t2i.DEFAULT_GUIDANCE
    prompts = t2i.eval_prompts(args.limit, args.kinds)
    cfgs = configs(pipe, args.ratios, args.max_downsample, args.seed)
    started = time.time()

    results, images = {}, {}
    for name, ratio, ctx in tqdm(cfgs, desc="quality", unit="config"):
        with ctx():
            t0 = time.perf_counter()
            res = t2i.t2i_scores(pipe, prompts, judge=judge, seed=args.seed, batch_size=args.batch_size,
                                 return_images=True)
            res["sample_s"] = time.perf_counter() - t0
            res["flops"] = pipeline_flops(pipe, prompts[:2], steps, guidance)
        images[name] = res.pop("images")
        results[name] = res

    times = {name: [] for name, _, _ in cfgs}
    timing = prompts[: args.timing_prompts]
    with tqdm(total=args.repeats * len(cfgs), desc="timing", unit="call") as bar:
        for _ in range(args.repeats):
            for name, _, ctx in cfgs:
                with ctx():
                    t0 = time.perf_counter()
                    pipe(timing, num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(args.seed), output_type="pt")
                    times[name].append(time.perf_counter() - t0)
                bar.update()

    dense_img = images["dense"]
    labels = {name: judge.predict(img * 2 - 1) for name, img in images.items()}
    rows = []
    for name, ratio, _ in cfgs:
        r, img = results[name], images[name]
        agree = (labels[name][0] == labels["dense"][0]) & (labels[name][1] == labels["dense"][1])
        rows.append(dict(
            config=name, impl="dense" if ratio is None else name.split()[0], ratio=ratio,
            faithfulness=r["faithfulness"], shape_acc=r["shape_acc"], color_acc=r["color_acc"], frechet=r["frechet"],
            size_acc=r.get("size_acc"), position_acc=r.get("position_acc"), kinds=r.get("kinds"),
            pixel_diff=float((img - dense_img).abs().mean()), pixel_diff_max=float((img - dense_img).abs().amax()),
            agreement_with_dense=float(agree.float().mean()), flops=r["flops"],
            flops_rel=r["flops"] / results["dense"]["flops"], time_s=statistics.median(times[name]),
            times_s=times[name], n=r["n"]))
    dense = rows[0]
    for row in rows:
        row["speedup"] = dense["time_s"] / row["time_s"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command=".venv/bin/python -m tokenprune.evals.tomesd_compare " + " ".join(sys.argv[1:]),
                model="tiny-t2i", steps=steps, guidance=guidance, limit=args.limit, kinds=args.kinds,
                batch_size=args.batch_size,
                timing_prompts=args.timing_prompts,
                repeats=args.repeats, max_downsample=args.max_downsample, seed=args.seed, threads=args.threads,
                commit=git_commit(), torch=torch.__version__, tomesd=getattr(tomesd, "__version__", "0.1.3"),
                elapsed_s=round(time.time() - started, 1),
                note="wall-clock on a shared 2-core CPU; other developers' tests may have run at the same time")
    (out / "tomesd_compare.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = ["| configuration | faithfulness | shape acc | color acc | Fréchet | pixel diff to dense (mean / max) "
             "| judge agrees with dense | FLOPs rel | s per call | speed-up |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['config']} | {r['faithfulness']:.3f} | {r['shape_acc']:.3f} | {r['color_acc']:.3f} "
                     f"| {r['frechet']:.2f} | {r['pixel_diff']:.4f} / {r['pixel_diff_max']:.3f} "
                     f"| {r['agreement_with_dense']:.3f} | {r['flops_rel']:.3f} | {r['time_s']:.2f} | {r['speedup']:.2f}x |")
    if len(args.kinds) > 1:  # faithfulness per prompt kind
        lines += ["", "| configuration | " + " | ".join(args.kinds) + " | size acc | position acc |",
                  "|" + "---|" * (len(args.kinds) + 3)]
        for r in rows:
            lines.append(f"| {r['config']} | " + " | ".join(f"{r['kinds'][k]:.3f}" for k in args.kinds)
                         + f" | {r['size_acc'] or float('nan'):.3f} | {r['position_acc'] or float('nan'):.3f} |")
    (out / "tomesd_compare.md").write_text("\n".join(lines) + "\n")
    image_grid(images, out / "tomesd_compare_grid.png", cols=24)
    plot(rows[1:], dense, out / "tomesd_compare.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
