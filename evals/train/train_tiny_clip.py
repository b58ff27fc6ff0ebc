"""Train ``tiny-clip``: a small open_clip ``CLIP`` (ViT image tower + text transformer),
contrastively, on captioned Fashion-MNIST and easy-vqa images.

Run from the repository root::

    .venv/bin/python evals/train/train_tiny_clip.py

Everything is offline: the model is ``open_clip.model.CLIP`` built from the config dict below
with random init; the tokenizer is open_clip's ``SimpleTokenizer``, whose BPE vocabulary ships
inside the ``open_clip_torch`` wheel; the images come from the Debian package
``dataset-fashion-mnist`` and the PyPI package ``easy-vqa`` through ``tokenprune/zoo/data.py``.

The result is written to ``tokenprune/zoo/weights/tiny-clip/`` in open_clip's own
``local-dir:`` layout, so plain open_clip loads it without any tokenprune code::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:<that folder>")
    tokenizer = open_clip.get_tokenizer("local-dir:<that folder>")

Files: ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``),
``open_clip_model.safetensors`` (weights stored as float16 to keep the file small; open_clip
copies them into its float32 model on load), ``metrics.json``, ``README.md``.

Captions: Fashion-MNIST images get "<template> {class}" (e.g. "a photo of a sneaker"),
easy-vqa images "<template> {color} {shape}" (e.g. "a photo of a red circle"), with the template
drawn at random from :data:`TEMPLATES`. Because many images in a batch share a class, the
contrastive loss uses soft targets: every caption of an image's class is a positive (the
symmetric CLIP loss with multi-positive targets). Evaluation is zero-shot classification on the
held-out test splits with the prompt "a photo of a {class}": the image embedding is matched
against the text embeddings of all class prompts of that dataset.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(REPO, "tokenprune", "zoo", "weights", "tiny-clip")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402


def _load_zoo_data():
    """``tokenprune/zoo/data.py`` loaded by path (no import of every zoo loader)."""
    spec = importlib.util.spec_from_file_location(
        "_tiny_clip_zoo_data", os.path.join(REPO, "tokenprune", "zoo", "data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


zoo_data = _load_zoo_data()

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {
        # 32x32 input, 4x4 patches -> 64 patch tokens + CLS; 6 layers, width 128, 4 heads
        "image_size": 32, "patch_size": 4, "width": 128, "layers": 6, "head_width": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3,
        "mlp_ratio": 4.0,
    },
}
PREPROCESS_CFG = {
    "size": 32, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0,
}
TEMPLATES = [
    "a photo of a {}", "a photo of the {}", "a picture of a {}", "an image of a {}",
    "a {}", "the {}", "a small {}", "a drawing of a {}",
]
EVAL_TEMPLATE = "a photo of a {}"


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE-style), ``[grid * grid, dim]``, row-major."""
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    oy, ox = y.flatten()[:, None] * omega[None], x.flatten()[:, None] * omega[None]
    return torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], 1)


def eval_transform():
    import open_clip

    c = PREPROCESS_CFG
    return open_clip.image_transform(
        c["size"], is_train=False, mean=tuple(c["mean"]), std=tuple(c["std"]),
        resize_mode=c["resize_mode"], interpolation=c["interpolation"], fill_color=c["fill_color"])


def preprocess(transform, images: np.ndarray, desc: str) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, 3] -> float [N, 3, 32, 32] through open_clip's eval transform
    (the same transform the loader returns)."""
    from PIL import Image

    out = torch.empty(len(images), 3, PREPROCESS_CFG["size"], PREPROCESS_CFG["size"])
    for i in tqdm(range(len(images)), desc=desc, mininterval=5, leave=False):
        out[i] = transform(Image.fromarray(images[i]))
    return out


def load_split(split: str, transform, limit: int = 0):
    """Returns dict with 'fm' and 'vqa' entries: (pixels, class index)."""
    fx, fy = zoo_data.fashion_mnist(split)
    vx, vc, vs = zoo_data.easy_vqa_shapes(split)
    vy = vc * len(zoo_data.EASY_VQA_SHAPES) + vs
    if limit:
        fx, fy, vx, vy = fx[:limit], fy[:limit], vx[:limit], vy[:limit]
    return {
        "fm": (preprocess(transform, fx, f"fashion-mnist {split}"), torch.from_numpy(fy.copy())),
        "vqa": (preprocess(transform, vx, f"easy-vqa {split}"), torch.from_numpy(np.asarray(vy).copy())),
    }


CLASSNAMES = {"fm": zoo_data.FASHION_MNIST_CLASSES, "vqa": zoo_data.EASY_VQA_CLASSES}


@torch.no_grad()
def zero_shot(model, tokenizer, data, template: str = EVAL_TEMPLATE, bs: int = 500) -> dict:
    """Zero-shot accuracy per dataset: argmax over that dataset's class prompts."""
    model.eval()
    res = {}
    for key, (x, y) in data.items():
        names = CLASSNAMES[key]
        txt = F.normalize(model.encode_text(tokenizer([template.format(n) for n in names])), dim=-1)
        preds = []
        for i in range(0, len(x), bs):
            img = F.normalize(model.encode_image(x[i: i + bs]), dim=-1)
            preds.append((img @ txt.T).argmax(-1))
        pred = torch.cat(preds)
        res[key] = (pred == y).float().mean().item()
        if key == "vqa":
            n_s = len(zoo_data.EASY_VQA_SHAPES)
            res["vqa_color"] = (pred // n_s == y // n_s).float().mean().item()
            res["vqa_shape"] = (pred % n_s == y % n_s).float().mean().item()
    return res


def main(argv=None):
    import open_clip

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--fmnist-frac", type=float, default=0.75,
                    help="fraction of each batch drawn from Fashion-MNIST (rest: easy-vqa)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--sincos-init", type=int, default=1,
                    help="1: initialise the vision position embedding to 2-D sin-cos (still learned)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is much faster than 2 when the 2 cores are shared with other work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=0, help="dev: first N train images per dataset")
    ap.add_argument("--eval-limit", type=int, default=0, help="dev: first N test images per dataset")
    ap.add_argument("--log-every", type=int, default=0, help="dev: zero-shot eval on a test subset every N steps")
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    transform = eval_transform()
    tokenizer = open_clip.get_tokenizer("", context_length=MODEL_CFG["text_cfg"]["context_length"])
    train = load_split("train", transform, args.train_limit)
    test = load_split("test", transform, args.eval_limit)
    n_fm, n_vqa = len(train["fm"][1]), len(train["vqa"][1])

    # every (dataset, class, template) caption, tokenized once
    captions, cap_class = [], []  # cap_class: global class id (fm classes first, then vqa)
    n_fm_cls = len(CLASSNAMES["fm"])
    for key, off in (("fm", 0), ("vqa", n_fm_cls)):
        for c, name in enumerate(CLASSNAMES[key]):
            for t in TEMPLATES:
                captions.append(t.format(name))
                cap_class.append(off + c)
    cap_tokens = tokenizer(captions)
    cap_class = torch.tensor(cap_class)
    n_tmpl = len(TEMPLATES)

    model = open_clip.model.CLIP(**MODEL_CFG)
    if args.sincos_init:  # learnable position embedding, initialised to 2-D sin-cos (faster start)
        with torch.no_grad():
            pe = model.visual.positional_embedding  # [1 + grid*grid, width], CLS first
            grid = MODEL_CFG["vision_cfg"]["image_size"] // MODEL_CFG["vision_cfg"]["patch_size"]
            pe[0] = 0
            pe[1:] = sincos_2d(pe.shape[1], grid)
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.visual.parameters())

    def no_wd(n, p):
        return p.ndim < 2 or "embedding" in n or "logit_scale" in n or "class_embedding" in n

    params = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params if not no_wd(n, p)], "weight_decay": args.weight_decay},
         {"params": [p for n, p in params if no_wd(n, p)], "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    total = args.steps

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, total - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    gen = torch.Generator().manual_seed(args.seed)
    n_fm_b = int(round(args.batch_size * args.fmnist_frac))
    n_vqa_b = args.batch_size - n_fm_b
    print(f"tiny-clip: {n_params:,} params ({n_vis:,} vision), train {n_fm} fashion-mnist + {n_vqa} easy-vqa, "
          f"{total} steps of {n_fm_b}+{n_vqa_b}, {args.threads} threads", flush=True)

    class Stream:  # shuffled passes over one dataset
        def __init__(self, n):
            self.n, self.perm, self.pos, self.epochs = n, torch.randperm(n, generator=gen), 0, 0

        def take(self, k):
            if self.pos + k > self.n:
                self.perm, self.pos, self.epochs = torch.randperm(self.n, generator=gen), 0, self.epochs + 1
            idx = self.perm[self.pos: self.pos + k]
            self.pos += k
            return idx

    s_fm, s_vqa = Stream(n_fm), Stream(n_vqa)
    t_train, cpu_train = time.time(), time.process_time()
    model.train()
    ema = None
    bar = tqdm(range(total), desc="train tiny-clip", mininterval=5)
    for step in bar:
        i_fm, i_vqa = s_fm.take(n_fm_b), s_vqa.take(n_vqa_b)
        x = torch.cat([train["fm"][0][i_fm], train["vqa"][0][i_vqa]])
        y = torch.cat([train["fm"][1][i_fm], train["vqa"][1][i_vqa] + n_fm_cls])
        flip = torch.rand(len(x), generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        # one random template per image; encode each distinct caption once
        tmpl = torch.randint(0, n_tmpl, (len(x),), generator=gen)
        cap_idx = y * n_tmpl + tmpl
        uniq, inv = torch.unique(cap_idx, return_inverse=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(cap_tokens[uniq]), dim=-1)
        scale = model.logit_scale.exp()
        logits = scale * img @ txt.T  # [B, U]
        pos = (y[:, None] == cap_class[uniq][None, :]).float()  # same class = positive
        loss_i = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(pos.T / pos.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", T=f"{scale.item():.1f}")
        if args.log_every and (step + 1) % args.log_every == 0 and step + 1 < total:
            sub = {k: (v[0][:1000], v[1][:1000]) for k, v in test.items()}
            acc = zero_shot(model, tokenizer, sub)
            model.train()
            tqdm.write(f"step {step + 1}/{total}: loss {ema:.3f}, zero-shot (first 1000) "
                       + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
                       + f", {(time.time() - t_train) / 60:.1f} min")
    train_s = time.time() - t_train
    train_cpu_s = time.process_time() - cpu_train
    model.eval()

    # save in open_clip's local-dir layout, then reload through open_clip and evaluate *that*
    os.makedirs(args.out, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()},
              os.path.join(args.out, "open_clip_model.safetensors"))
    with open(os.path.join(args.out, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, f, indent=2)

    t_eval = time.time()
    reloaded, _, pp = open_clip.create_model_and_transforms("local-dir:" + os.path.abspath(args.out))
    reloaded.eval()
    tok2 = open_clip.get_tokenizer("local-dir:" + os.path.abspath(args.out))
    acc = zero_shot(reloaded, tok2, test)
    acc_train_model = zero_shot(model, tokenizer, {k: (v[0][:1000], v[1][:1000]) for k, v in test.items()})
    eval_s = time.time() - t_eval
    total_s = time.time() - t_start
    print("zero-shot test accuracy (reloaded fp16 checkpoint): "
          + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
          + f"; train {train_s / 60:.1f} min, eval {eval_s:.0f} s, total {total_s / 60:.1f} min", flush=True)
    print("(in-memory fp32 model, first 1000: " + ", ".join(f"{k} {v:.4f}" for k, v in acc_train_model.items()) + ")")

    cmd = ".venv/bin/python evals/train/train_tiny_clip.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    metrics = {
        "zero_shot_accuracy": {
            "fashion_mnist_10way": acc["fm"], "easy_vqa_24way": acc["vqa"],
            "easy_vqa_color_from_24way": acc["vqa_color"], "easy_vqa_shape_from_24way": acc["vqa_shape"],
        },
        "eval_prompt": EVAL_TEMPLATE,
        "test_images": {"fashion_mnist": len(test["fm"][1]), "easy_vqa": len(test["vqa"][1])},
        "train_images": {"fashion_mnist": n_fm, "easy_vqa": n_vqa},
        "params": n_params, "vision_params": n_vis, "steps": total, "batch": [n_fm_b, n_vqa_b],
        "epochs_seen": {"fashion_mnist": round(total * n_fm_b / n_fm, 2), "easy_vqa": round(total * n_vqa_b / n_vqa, 2)},
        "train_minutes": round(train_s / 60, 2), "train_cpu_minutes": round(train_cpu_s / 60, 2), "total_minutes": round(total_s / 60, 2),
        "threads": args.threads, "torch": torch.__version__, "open_clip": open_clip.__version__,
        "machine": platform.machine(), "command": cmd,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    write_card(args, metrics)
    print("saved to", args.out)


def write_card(args, m):
    size_kb = os.path.getsize(os.path.join(args.out, "open_clip_model.safetensors")) / 1024
    z = m["zero_shot_accuracy"]
    v, t = MODEL_CFG["vision_cfg"], MODEL_CFG["text_cfg"]
    text = f"""# tiny-clip

A small CLIP (`open_clip.model.CLIP`, ViT image tower + causal text transformer) trained from
scratch, contrastively, on captioned Fashion-MNIST and easy-vqa images. It is a testbed for
token-pruning experiments on an open_clip `VisionTransformer` with real, non-random weights.

| | |
|---|---|
| image tower | ViT, {v['image_size']}x{v['image_size']}x3 input, {v['patch_size']}x{v['patch_size']} patches -> **64 patch tokens + CLS**, {v['layers']} layers, width {v['width']}, {v['width'] // v['head_width']} heads, MLP ratio {v['mlp_ratio']}, CLS pooling ({m['vision_params']:,} params) |
| text tower | {t['layers']} layers, width {t['width']}, {t['heads']} heads, context {t['context_length']}, open_clip `SimpleTokenizer` (BPE vocab {t['vocab_size']}, shipped inside `open_clip_torch`), EOT (argmax) pooling |
| joint embedding | {MODEL_CFG['embed_dim']}-d, learnable temperature |
| parameters | {m['params']:,} total (the token-embedding table of the full 49,408-entry BPE vocabulary is {MODEL_CFG['text_cfg']['vocab_size'] * MODEL_CFG['text_cfg']['width']:,} of them); weights stored as float16 ({size_kb:.0f} KiB), loaded into float32 |
| preprocessing | open_clip eval transform from `open_clip_config.json`: RGB, bilinear resize ("squash") to 32x32, normalise mean 0.5 / std 0.5 |
| data | Fashion-MNIST (Debian `dataset-fashion-mnist`, {m['train_images']['fashion_mnist']:,} train images) and easy-vqa (PyPI `easy-vqa`, {m['train_images']['easy_vqa']:,} train images; labels = color + shape recovered from its Q/A pairs, see `tokenprune/zoo/data.py`) |
| captions | "<template> {{class}}", e.g. "a photo of a sneaker", "a picture of a red circle"; template drawn at random per image from {len(TEMPLATES)}: {', '.join(repr(x) for x in TEMPLATES)} |
| training | {m['steps']} steps, batch {m['batch'][0]} Fashion-MNIST + {m['batch'][1]} easy-vqa images (~{m['epochs_seen']['fashion_mnist']} / {m['epochs_seen']['easy_vqa']} epochs), symmetric contrastive loss with multi-positive targets (all captions of the image's class are positives), AdamW (lr {args.lr}, wd {args.weight_decay}), {args.warmup} warmup steps + cosine, horizontal flips, vision position embedding initialised to 2-D sin-cos (learned), seed {args.seed} |
| training time | {m['train_cpu_minutes']:.1f} CPU-minutes of training on 1 thread (= wall time on an idle core); measured wall {m['train_minutes']:.1f} min training / {m['total_minutes']:.1f} min total on a 2-core machine shared with other jobs; torch {m['torch']}, open_clip {m['open_clip']} |

**Zero-shot classification on the held-out test splits** (prompt `"{m['eval_prompt']}"`, the image
is assigned the class whose prompt embedding is most similar; measured on the saved float16
checkpoint reloaded through `open_clip.create_model_and_transforms("local-dir:...")`):

| test set | classes | accuracy |
|---|---|---|
| Fashion-MNIST test ({m['test_images']['fashion_mnist']:,} images) | 10 | **{z['fashion_mnist_10way'] * 100:.2f}%** |
| easy-vqa test ({m['test_images']['easy_vqa']:,} images), color + shape | 24 ("red circle", ...) | **{z['easy_vqa_24way'] * 100:.2f}%** |
| easy-vqa, color part of the 24-way prediction | 8 | {z['easy_vqa_color_from_24way'] * 100:.2f}% |
| easy-vqa, shape part of the 24-way prediction | 3 | {z['easy_vqa_shape_from_24way'] * 100:.2f}% |

The test images were never trained on; the class names and the prompt template were (the
eval prompt is one of the training templates), so "zero-shot" here means classification
through the text tower, not generalisation to unseen classes.

Reproduce (from the repository root, after `apt-get install dataset-fashion-mnist`):

```
{m['command']}
```

(`--log-every N` only prints zero-shot accuracy on a 1,000-image test subset every N steps; it
does not change training. No checkpoint selection is done: the final weights are saved.)

Load:

```python
import tokenprune as tp
model, (preprocess, tokenizer) = tp.zoo.load("tiny-clip")
# or with open_clip alone:
# model, _, preprocess = open_clip.create_model_and_transforms("local-dir:tokenprune/zoo/weights/tiny-clip")
# tokenizer = open_clip.get_tokenizer("local-dir:tokenprune/zoo/weights/tiny-clip")
```
"""
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
