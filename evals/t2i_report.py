"""tiny-t2i results in one table: harness rows + the tomesd side by side, an image grid, APTP's codes.

    .venv/bin/python -m tokenprune.evals.t2i_report --out results/tiny-t2i \\
        --runs results/tiny-t2i/tome results/tiny-t2i/static-aptp \\
        --tomesd results/tiny-t2i/tomesd_compare.json \\
        --grid tome-sd:ratio=0.5 unet-static:keep=0.6 aptp --tomesd-ratio 0.5

Reads the ``results.json`` of ``tokenprune eval --model tiny-t2i`` runs (``--runs``) and the
JSON of ``tokenprune.evals.tomesd_compare`` (``--tomesd``; its tomesd rows are the package, not
tokenprune), all scored on the same prompts with the same initial noise, and writes to ``--out``:

* ``t2i_summary.{md,json,csv}`` -- one row per configuration: FLOPs of a whole pipeline call
  relative to dense, prompt faithfulness overall and per prompt kind, Frechet distance to real
  images (and to the dense images where the harness measured it);
* ``t2i_summary.png`` -- faithfulness and Frechet distance vs relative FLOPs;
* ``t2i_grid.png`` -- dense and each ``--grid`` method (tokenprune method specs as in
  ``tokenprune eval --methods``; plus the tomesd package at ``--tomesd-ratio``) on the same
  prompts and seed, one row each;
* ``aptp_codes.{md,json}`` (when ``aptp`` is in ``--grid``) -- the code APTP's router picks for
  every prompt, counted per prompt kind, with each code's share of the transformer MACs.
"""
from __future__ import annotations

import argparse
import csv
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from .runner import BUDGET_FREE

KEYS = ("faithfulness", "flops_rel", "fd_reference", "fd_dense", "agreement", "shape_acc", "color_acc",
        "size_acc", "position_acc")


def harness_rows(path: Path) -> list[dict]:
    """The ok rows of one ``tokenprune eval`` output folder, in summary form."""
    data = json.loads((Path(path) / "results.json").read_text())
    out = []
    for r in data["rows"]:
        if r.get("status") != "ok" or r.get("model") != "tiny-t2i":
            continue
        label = r["label"] if r.get("budget") is None or r["method"] in BUDGET_FREE else f"{r['label']} @ {r['budget']:g}"
        row = dict(source=f"tokenprune eval ({Path(path).name})", method=r["method"], label=label,
                   budget=r.get("budget"), config=r.get("config"), faithfulness=r["quality"], n=r.get("n_items"),
                   **{k: r.get(k) for k in KEYS if k != "faithfulness"})
        row["kinds"] = {k[len("faithfulness_"):]: v for k, v in r.items() if k.startswith("faithfulness_")}
        out.append(row)
    return out


def tomesd_rows(path: Path) -> list[dict]:
    """The rows of a ``tomesd_compare`` JSON (dense, tokenprune tome-sd, tomesd package)."""
    data = json.loads(Path(path).read_text())
    out = []
    for r in data["rows"]:
        out.append(dict(source="tomesd_compare", method="dense" if r["ratio"] is None else
                        ("tomesd (package)" if r["impl"] == "tomesd" else "tome-sd"),
                        label=r["config"], budget=None if r["ratio"] is None else 1 - r["ratio"],
                        config={"ratio": r["ratio"]}, faithfulness=r["faithfulness"], flops_rel=r["flops_rel"],
                        fd_reference=r["frechet"], fd_dense=None, agreement=r["agreement_with_dense"],
                        shape_acc=r["shape_acc"], color_acc=r["color_acc"], size_acc=r.get("size_acc"),
                        position_acc=r.get("position_acc"), kinds=r.get("kinds") or {}, n=r["n"],
                        pixel_diff=r["pixel_diff"]))
    return out


def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def write_summary(rows: list[dict], out: Path) -> None:
    kinds = list(dict.fromkeys(k for r in rows for k in r["kinds"]))
    head = ["source", "configuration", "FLOPs rel", "faithfulness", *kinds, "Frechet (real)", "Frechet (dense)",
            "judge agrees with dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["source"], r["label"], _f(r["flops_rel"]), _f(r["faithfulness"]),
                 *[_f(r["kinds"].get(k)) for k in kinds], _f(r["fd_reference"], ".2f"), _f(r["fd_dense"], ".2f"),
                 _f(r["agreement"])]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "t2i_summary.md").write_text("\n".join(lines) + "\n")
    (out / "t2i_summary.json").write_text(json.dumps(rows, indent=1))
    cols = ["source", "method", "label", "budget", "n", *KEYS, *[f"faithfulness_{k}" for k in kinds]]
    with open(out / "t2i_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{f"faithfulness_{k}": v for k, v in r["kinds"].items()}})
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict = {}
    for r in rows:
        name = "dense" if r["method"] == "dense" else r["method"]
        groups.setdefault(name, []).append(r)
    for ax, key, title in ((axes[0], "faithfulness", "prompt faithfulness (higher is better)"),
                           (axes[1], "fd_reference", "Frechet distance to real images (lower is better)")):
        for name, rs in groups.items():
            pts = sorted((r["flops_rel"], r[key]) for r in rs if r["flops_rel"] is not None and r[key] is not None)
            if not pts:
                continue
            style = dict(marker="*", ms=14, ls="none", color="black") if name == "dense" else dict(marker="o")
            ax.plot(*zip(*pts), label=name, **style)
        ax.set_xlabel("FLOPs of a pipeline call, relative to dense")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def grid_prompts(n_per_kind: int = 6) -> list[str]:
    from tokenprune.zoo import t2i

    return [p for k in t2i.KINDS for p in t2i.eval_prompts(n_per_kind * 4, (k,))[::4]]


def image_grid(specs: list[str], tomesd_ratio: float | None, out: Path, seed: int = 0) -> None:
    """Dense, each method spec and the tomesd package on the same prompts and initial noise."""
    import tokenprune as tp
    from tokenprune.zoo import t2i

    from .runner import MethodSpec
    from .tomesd_compare import image_grid as draw, tomesd_patch

    pipe, _ = tp.zoo.load("tiny-t2i")
    prompts = grid_prompts()
    ctxs = [("dense", lambda: nullcontext())]
    for s in specs:
        spec = MethodSpec.parse(s)
        ctxs.append((spec.label, lambda spec=spec: tp.pruning(pipe, tp.build_pruner(spec.name, **spec.overrides))))
    if tomesd_ratio is not None:
        ctxs.append((f"tomesd {tomesd_ratio:g}", lambda: tomesd_patch(pipe, tomesd_ratio, 2, seed)))
    images = {}
    for name, ctx in ctxs:
        with ctx(), torch.no_grad():
            images[name] = pipe(prompts, num_inference_steps=t2i.DEFAULT_STEPS, guidance_scale=t2i.DEFAULT_GUIDANCE,
                                generator=torch.Generator().manual_seed(seed), output_type="pt").images
    draw(images, out / "t2i_grid.png", cols=len(prompts))
    (out / "t2i_grid.json").write_text(json.dumps(dict(rows=list(images), prompts=prompts, seed=seed), indent=1))


def aptp_codes(out: Path, overrides: dict) -> None:
    """Which code APTP's router gives every prompt of every kind (router only, no sampling)."""
    import tokenprune as tp
    from tokenprune.zoo import t2i

    pipe, _ = tp.zoo.load("tiny-t2i")
    aptp = tp.build_pruner("aptp", **overrides)
    shares = aptp.code_shares()
    table = {}
    for kind in t2i.KINDS:
        prompts = t2i.all_prompts((kind,))
        ctx, mask = t2i.encode_text(pipe.text_encoder, pipe.tokenizer, prompts)
        codes = aptp.route(ctx, mask).tolist()
        table[kind] = dict(n=len(prompts), counts=[codes.count(c) for c in range(len(shares))],
                           mean_share=sum(shares[c] for c in codes) / len(codes),
                           prompts={p: c for p, c in zip(prompts, codes)})
    head = ["prompt kind", "prompts", *[f"code {c} (keeps {s:.2f})" for c, s in enumerate(shares)],
            "mean transformer MACs kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, t in table.items():
        lines.append(f"| {kind} | {t['n']} | " + " | ".join(str(n) for n in t["counts"]) + f" | {t['mean_share']:.3f} |")
    (out / "aptp_codes.md").write_text("\n".join(lines) + "\n")
    (out / "aptp_codes.json").write_text(json.dumps(dict(code_shares=shares, kinds=table), indent=1))
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=[], help="tokenprune eval output folders (tiny-t2i)")
    ap.add_argument("--tomesd", default=None, help="tomesd_compare.json")
    ap.add_argument("--grid", nargs="*", default=[], help="method specs for the image grid")
    ap.add_argument("--tomesd-ratio", type=float, default=None, help="add the tomesd package at this ratio to the grid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/tiny-t2i")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for run in args.runs for r in harness_rows(Path(run))]
    if args.tomesd:
        rows += tomesd_rows(Path(args.tomesd))
    if rows:
        write_summary(rows, out)
        plot(rows, out / "t2i_summary.png")
    if args.grid or args.tomesd_ratio is not None:
        image_grid(args.grid, args.tomesd_ratio, out)
    from .runner import MethodSpec

    for s in args.grid:
        spec = MethodSpec.parse(s)
        if spec.name == "aptp":
            aptp_codes(out, spec.overrides)


if __name__ == "__main__":
    main()
