"""Which visual tokens each method keeps, drawn on the images: ``python -m tokenprune.evals.lvlm_tokens``.

For a few easy-vqa test images and one question each, every method runs once on the bundled
``tiny-llava`` and the handle's stats tell which original tokens entered each reduced decoder
layer (``Stats.kept``) and which were merged into which (``Stats.merged``). Each panel shows
the image with the visual tokens alive after the method's last reduction at full brightness,
dropped ones dimmed, and merge targets (VisionZip's contextual tokens, VFlowOpt's recycled
ones) outlined with lines from the tokens folded into them.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from ..errors import TokenPruneError
from ..handle import pruning
from ..pruner import build_pruner
from ..zoo import load, vqa_data
from .runner import MethodSpec, budget_field

DEFAULT_METHODS = ["random:layer=1,segment=visual", "fastv:layer=1,segment=visual", "visionzip", "vflowopt", "atp"]


def kept_grid(stats, ids: torch.Tensor, image_token_id: int, grid: int):
    """Per row: (alive, targets, links) on the patch grid after the last reduced layer.

    ``alive``: (g, g) bool; ``targets``: (g, g) bool merge targets; ``links``: [((r, c), (r, c))] source -> target.
    """
    out = []
    for b in range(ids.shape[0]):
        positions = (ids[b] == image_token_id).nonzero().flatten().tolist()
        cell = {p: divmod(k, grid) for k, p in enumerate(positions[: grid * grid])}
        alive = np.ones((grid, grid), bool)
        if stats.kept:
            last = stats.kept[max(stats.kept)][b]
            alive[:] = False
            for p in last:
                if p in cell:
                    alive[cell[p]] = True
        targets, links = np.zeros((grid, grid), bool), []
        for layer in sorted(stats.merged):
            for s, d in stats.merged[layer][b]:
                if s in cell and d in cell:
                    targets[cell[d]] = True
                    links.append((cell[s], cell[d]))
        out.append((alive, targets, links))
    return out


def run(methods, budget: float, n_images: int, out: str, seed: int = 0, kinds=("easy-vqa",)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, processor = load("tiny-llava")
    items = vqa_data.easy_vqa_items("test", limit=n_images, seed=seed, kinds=kinds)
    enc = processor(images=[i[0] for i in items], text=[vqa_data.build_prompt(i[1]) for i in items],
                    return_tensors="pt", padding=True)
    vc = model.config.vision_config
    grid, patch = vc.image_size // vc.patch_size, vc.patch_size
    specs = [MethodSpec.parse(m) for m in methods]
    panels = {}
    for spec in specs:
        try:
            try:  # instance-adaptive methods (ATP) have no budget field: they run as configured
                config = {**spec.overrides, budget_field(spec.name): budget}
            except TokenPruneError:
                config = dict(spec.overrides)
            pruner = build_pruner(spec.name, **config)
        except TokenPruneError as e:  # e.g. a method not in this build: say so in the figure
            panels[spec.label] = str(e)
            continue
        with torch.no_grad(), pruning(model, pruner) as handle:
            model(**enc)
            panels[spec.label] = kept_grid(handle.stats, enc["input_ids"], model.config.image_token_id, grid)
    fig, axes = plt.subplots(n_images, len(specs), figsize=(2.2 * len(specs), 2.3 * n_images), squeeze=False)
    for c, spec in enumerate(specs):
        for r, (image, question, _) in enumerate(items):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
            panel = panels[spec.label]
            if isinstance(panel, str):
                ax.imshow(img * 0.3)
                ax.text(2, 32, panel[:60], fontsize=5, color="white", wrap=True)
            else:
                alive, targets, links = panel[r]
                shade = np.kron(alive, np.ones((patch, patch)))[..., None]
                ax.imshow(img * (0.25 + 0.75 * shade))
                for (sr, sc), (dr, dc) in links:
                    ax.plot([sc * patch + patch / 2, dc * patch + patch / 2],
                            [sr * patch + patch / 2, dr * patch + patch / 2], color="magenta", lw=0.5, alpha=0.6)
                for tr, tc in zip(*targets.nonzero()):
                    ax.add_patch(plt.Rectangle((tc * patch, tr * patch), patch, patch, fill=False, ec="magenta", lw=1))
                ax.set_xlim(-0.5, img.shape[1] - 0.5), ax.set_ylim(img.shape[0] - 0.5, -0.5)
            if r == 0:
                ax.set_title(spec.label, fontsize=7)
            if c == 0:
                ax.set_ylabel(question, fontsize=6)
    fig.suptitle(f"tiny-llava: visual tokens kept at keep share {budget} (dimmed: dropped; magenta: merge targets)",
                 fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=150)
    return panels


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tokenprune.evals.lvlm_tokens", description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method specs as in `tokenprune eval`")
    ap.add_argument("--budget", type=float, default=0.1, help="keep share of visual tokens (default 0.1)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/tiny-llava/kept_tokens.png")
    ap.add_argument("--kinds", nargs="+", default=["easy-vqa"], choices=vqa_data.KINDS,
                    help="question kinds the images are asked (default easy-vqa)")
    args = ap.parse_args(argv)
    run(args.methods, args.budget, args.images, args.out, args.seed, args.kinds)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
