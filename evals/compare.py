"""Dense vs pruned on one input: the engine behind ``tokenprune run`` and the Gradio app.

Each ``compare_*`` function runs the model dense, then with the pruner attached, on the same
input, and returns a plain dict: both outputs, the pruned call's stats, times, and which
tokens the pruner kept before each of its layers (read by :class:`KeptTokens`).

Models are shared between callers (the app serves every session from one copy), so each
model has one lock, held from the dense call to ``remove()``: two requests never see each
other's pruner.
"""
from __future__ import annotations

import statistics
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import TokenPruneError
from ..handle import pruning
from ..pruner import Pruner, build_pruner

_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.Lock:
    """The lock that serialises dense and pruned calls on one shared model."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


@dataclass
class KeptTokens(Pruner):
    """Reduces nothing: records which original tokens are alive after each listed layer's reductions.

    Listed after the real pruners (``[pruner, KeptTokens(pruner.layers())]``), its ``select``
    runs once the reductions at that layer are applied, so ``kept[layer]`` holds the original
    token positions (row 0) that take part from that layer on. Not registered: it is a probe,
    not a method.
    """

    name: ClassVar[str] = "kept-tokens"
    at: tuple = ()
    kept: dict = field(default_factory=dict, repr=False, compare=False)

    def layers(self) -> list[int]:
        return list(self.at)

    def select(self, state):
        self.kept[state.layer] = state.index[0][state.valid[0]].tolist()
        return None

    def to_dict(self) -> dict:
        return {"name": "kept-tokens", "at": list(self.at)}


def make_pruner(method: str | Pruner, **config) -> Pruner:
    """A pruner from a name + config (``TokenPruneError`` names the bad field), or as given."""
    if isinstance(method, Pruner):
        return method
    return build_pruner(method, **config)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _paired_times(model, pruner, fn, repeats: int) -> tuple[float, float]:
    """Dense and pruned calls of ``fn`` timed in turns (one warm-up each), medians in seconds."""
    fn()
    with pruning(model, pruner):
        fn()
    dense, pruned = [], []
    for _ in range(max(1, repeats)):
        dense.append(_median_time(fn, 1))
        with pruning(model, pruner):
            pruned.append(_median_time(fn, 1))
    return statistics.median(dense), statistics.median(pruned)


def _stats_dict(stats) -> dict:
    if stats is None:
        return {}
    return {**stats.to_dict(), "pruned_anything": stats.pruned_anything, "summary": stats.summary()}


# ---- LLM ---------------------------------------------------------------------------------
def chat_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids of ``prompt``, wrapped in the tokenizer's chat template when it has one."""
    if not prompt or not prompt.strip():
        raise TokenPruneError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def compare_llm(model, tokenizer, pruner: Pruner, prompt: str, max_new_tokens: int = 32, chat: bool = True,
                repeats: int = 3) -> dict:
    """Greedy answers dense and pruned, the pruned request's stats, prefill times, kept tokens."""
    ids = chat_ids(tokenizer, prompt, chat)
    gen = dict(max_new_tokens=int(max_new_tokens), do_sample=False,
               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    probe = KeptTokens(target=pruner.target, at=tuple(pruner.layers()))  # goes where the pruner goes
    with model_lock(model):
        t0 = time.perf_counter()
        dense = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        dense_gen_s = time.perf_counter() - t0
        with pruning(model, [pruner, probe]) as handle:
            t0 = time.perf_counter()
            pruned = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
            pruned_gen_s = time.perf_counter() - t0
            stats = handle.stats
        dense_s, pruned_s = _paired_times(model, pruner, lambda: model(ids, logits_to_keep=1), repeats)
    n = ids.shape[1]
    decode = lambda out: tokenizer.decode(out[0, n:], skip_special_tokens=True).strip()  # noqa: E731
    return {
        "kind": "llm",
        "pruner": pruner.to_dict(),
        "prompt_tokens": n,
        "tokens": [tokenizer.decode([t]) for t in ids[0].tolist()],
        "dense_answer": decode(dense),
        "pruned_answer": decode(pruned),
        "kept": {int(k): v for k, v in probe.kept.items()},
        "stats": _stats_dict(stats),
        "time": {"what": "prefill, median of paired calls", "dense_s": dense_s, "pruned_s": pruned_s,
                 "speedup": dense_s / pruned_s if pruned_s else None,
                 "generate_dense_s": dense_gen_s, "generate_pruned_s": pruned_gen_s},
    }


# ---- ViT / CLIP --------------------------------------------------------------------------
def _softmax_top(logits: torch.Tensor, labels: list[str], k: int) -> list[tuple[str, float]]:
    probs = logits.float().softmax(-1)
    top = probs.topk(min(k, probs.numel()))
    return [(labels[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]


@torch.no_grad()
def compare_classifier(model, forward, pixels: torch.Tensor, labels: list[str], pruner: Pruner, k: int = 5,
                       repeats: int = 5) -> dict:
    """Top-``k`` classes dense and pruned for one image; ``forward(pixels) -> logits (1, C)``."""
    probe = KeptTokens(target=pruner.target, at=tuple(pruner.layers()))  # goes where the pruner goes
    with model_lock(model):
        dense = forward(pixels)[0]
        with pruning(model, [pruner, probe]) as handle:
            pruned = forward(pixels)[0]
            stats = handle.stats
        dense_s, pruned_s = _paired_times(model, pruner, lambda: forward(pixels), repeats)
    return {
        "kind": "classifier",
        "pruner": pruner.to_dict(),
        "dense_top": _softmax_top(dense, labels, k),
        "pruned_top": _softmax_top(pruned, labels, k),
        "kept": {int(k_): v for k_, v in probe.kept.items()},
        "stats": _stats_dict(stats),
        "time": {"what": "forward, median of paired calls", "dense_s": dense_s, "pruned_s": pruned_s,
                 "speedup": dense_s / pruned_s if pruned_s else None},
    }


def vit_forward(model):
    return lambda px: model(pixel_values=px).logits


def clip_forward(model, tokenizer, labels: list[str], template: str = "a photo of a {}"):
    """Zero-shot logits of an open_clip model over ``labels`` (text embedded once, outside the timing)."""
    import torch.nn.functional as F

    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer([template.format(x) for x in labels])), dim=-1)
    return lambda px: 100.0 * F.normalize(model.encode_image(px), dim=-1) @ text.T


# ---- LVLM --------------------------------------------------------------------------------
@torch.no_grad()
def compare_lvlm(model, processor, pruner: Pruner, image, question: str, max_new_tokens: int | None = None,
                 repeats: int = 3) -> dict:
    """Greedy answers of a LLaVA-style model dense and pruned for one image + question."""
    from ..zoo.vqa_data import build_prompt

    if not question or not question.strip():
        raise TokenPruneError("the question is empty")
    inputs = processor(images=[image], text=[build_prompt(question.strip())], return_tensors="pt")
    gen = {"do_sample": False}
    if max_new_tokens:
        gen["max_new_tokens"] = int(max_new_tokens)
    image_token = model.config.image_token_id
    visual = (inputs["input_ids"][0] == image_token).nonzero().flatten().tolist()
    space = pruner.resolved_target()  # "vision": positions in the tower (CLS first), else in the prompt
    probe = KeptTokens(target=space, at=tuple(pruner.layers()))
    with model_lock(model):
        t0 = time.perf_counter()
        dense = model.generate(**inputs, **gen)
        dense_gen_s = time.perf_counter() - t0
        with pruning(model, [pruner, probe]) as handle:
            t0 = time.perf_counter()
            pruned = model.generate(**inputs, **gen)
            pruned_gen_s = time.perf_counter() - t0
            stats = handle.stats
        dense_s, pruned_s = _paired_times(model, pruner, lambda: model(**inputs, logits_to_keep=1), repeats)
    n = inputs["input_ids"].shape[1]
    decode = lambda out: processor.tokenizer.decode(out[0, n:], skip_special_tokens=True).strip()  # noqa: E731
    return {
        "kind": "lvlm",
        "pruner": pruner.to_dict(),
        "prompt_tokens": n,
        "visual_positions": visual,
        "dense_answer": decode(dense),
        "pruned_answer": decode(pruned),
        "kept_space": space,
        "kept": {int(k): v for k, v in probe.kept.items()},
        "merged": {int(k): [tuple(x) for x in rows[0]] for k, rows in getattr(stats, "merged", {}).items()},
        "stats": _stats_dict(stats),
        "time": {"what": "prefill, median of paired calls", "dense_s": dense_s, "pruned_s": pruned_s,
                 "speedup": dense_s / pruned_s if pruned_s else None,
                 "generate_dense_s": dense_gen_s, "generate_pruned_s": pruned_gen_s},
    }


# ---- text to image -----------------------------------------------------------------------
@torch.no_grad()
def compare_t2i(pipe, judge, pruner: Pruner, prompt: str, steps: int = 25, seed: int = 0) -> dict:
    """One image per prompt dense and pruned from the same seed; the judge's reading of each.

    ``stats`` are the last U-Net call's (one denoising step is one request).
    """
    from ..zoo.t2i import parse_prompt

    if not prompt or not prompt.strip():
        raise TokenPruneError("the prompt is empty")
    try:
        parse_prompt(prompt)
    except ValueError as e:
        raise TokenPruneError(str(e)) from None

    def sample():
        g = torch.Generator().manual_seed(int(seed))
        return pipe([prompt], num_inference_steps=int(steps), generator=g, output_type="pt").images

    def read(images):
        shape, color = judge.predict(images.float() * 2 - 1)
        return f"{judge.colors[int(color[0])]} {judge.shapes[int(shape[0])]}"

    with model_lock(pipe.unet):
        t0 = time.perf_counter()
        dense = sample()
        dense_s = time.perf_counter() - t0
        with pruning(pipe, pruner) as handle:
            t0 = time.perf_counter()
            pruned = sample()
            pruned_s = time.perf_counter() - t0
            stats = handle.stats
    from PIL import Image

    def to_pil(x):
        return Image.fromarray((x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())

    return {
        "kind": "t2i",
        "pruner": pruner.to_dict(),
        "prompt": prompt,
        "dense_reads": read(dense),
        "pruned_reads": read(pruned),
        "dense_image": to_pil(dense),
        "pruned_image": to_pil(pruned),
        "stats": _stats_dict(stats),
        "time": {"what": "whole pipeline call, dense then pruned, one each", "dense_s": dense_s,
                 "pruned_s": pruned_s, "speedup": dense_s / pruned_s if pruned_s else None},
    }


# ---- models and inputs -------------------------------------------------------------------
#: what each bundled model is, for the callers that pick inputs and defaults
ZOO_KINDS = {"smollm2-135m": "llm", "tiny-vit": "vit", "tiny-clip": "clip", "tiny-llava": "lvlm", "tiny-t2i": "t2i"}


@dataclass
class Loaded:
    """A model ready for ``compare_*``: its kind (llm, vit, clip, lvlm, t2i), model and processor
    (for t2i: the diffusers pipeline and the judge that reads shape and color)."""

    name: str
    kind: str
    model: object
    processor: object


_LOADED: dict[str, Loaded] = {}
_LOAD_GUARD = threading.Lock()


def load_model(spec: str) -> Loaded:
    """A bundled model by name (``tp.zoo.names()``) or a local model directory; nothing is downloaded.

    Loaded once per process and shared: callers attach pruners only inside ``model_lock``.
    """
    with _LOAD_GUARD:
        if spec not in _LOADED:
            _LOADED[spec] = _load(spec)
        return _LOADED[spec]


def _load(spec: str) -> Loaded:
    import json
    import os

    from .. import zoo

    if spec in ZOO_KINDS and spec in zoo.names():
        kind = ZOO_KINDS[spec]
        model, proc = zoo.load(spec)  # t2i: (pipeline, judge)
        return Loaded(spec, kind, model, proc)
    if not os.path.isdir(spec):
        raise TokenPruneError(f"unknown model {spec!r}: neither a bundled model ({', '.join(zoo.names())}) "
                              "nor a local model directory")
    if os.path.exists(os.path.join(spec, "open_clip_config.json")):
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + spec)
        return Loaded(spec, "clip", model.eval(), (preprocess, open_clip.get_tokenizer("local-dir:" + spec)))
    cfg_path = os.path.join(spec, "config.json")
    if not os.path.exists(cfg_path):
        raise TokenPruneError(f"{spec} has no config.json (or open_clip_config.json): not a model directory")
    with open(cfg_path) as f:
        cfg = json.load(f)
    archs = " ".join(cfg.get("architectures") or [])
    if cfg.get("model_type") == "llava":
        model, proc = zoo.load("tiny-llava", path=spec)
        return Loaded(spec, "lvlm", model, proc)
    if "ForImageClassification" in archs:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(spec, local_files_only=True)
        return Loaded(spec, "vit", model.eval(), AutoImageProcessor.from_pretrained(spec, local_files_only=True))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return Loaded(spec, "llm", model.eval(), tok)


def config_fields(method: str) -> set[str]:
    from .tasks import config_fields as fields

    return fields(method)


def method_defaults(loaded: Loaded, method: str) -> dict:
    """Defaults that fit the model (the same as ``tokenprune eval``'s): the segment to prune and a layer."""
    from .tasks import decoder_layer_default, defaults_for

    if loaded.kind == "llm":
        return defaults_for(method, layer=decoder_layer_default(loaded.model), segment="text")
    if loaded.kind == "t2i":  # tiny-t2i's first attention level is at downsample 2 (SD's at 1)
        return defaults_for(method, max_downsample=2, segment="visual")
    return defaults_for(method, segment="visual")  # ViT patches, LVLM visual tokens; each method's own layers


def sample_image(kind: str, index: int = 0):
    """A bundled test image: Fashion-MNIST for ViT / CLIP, easy-vqa for LVLMs (PIL, RGB)."""
    from PIL import Image

    from ..zoo import data

    if kind == "lvlm":  # by image id, the order of data.easy_vqa_shapes, without labelling them all
        import easy_vqa

        paths = easy_vqa.get_test_image_paths()
        ids = sorted(paths)
        if not 0 <= index < len(ids):
            raise TokenPruneError(f"test image index {index} is out of range 0..{len(ids) - 1}")
        with Image.open(paths[ids[index]]) as im:
            return im.convert("RGB")
    images = data.fashion_mnist("test")[0]
    if not 0 <= index < len(images):
        raise TokenPruneError(f"test image index {index} is out of range 0..{len(images) - 1}")
    return Image.fromarray(images[index]).convert("RGB")


def classifier_inputs(loaded: Loaded, image, labels: list[str] | None = None):
    """``(pixels, forward, labels)`` for one PIL image on a ViT classifier or an open_clip model."""
    from ..zoo.data import FASHION_MNIST_CLASSES

    if loaded.kind == "vit":
        pixels = loaded.processor(images=[image], return_tensors="pt")["pixel_values"]
        id2label = loaded.model.config.id2label
        return pixels, vit_forward(loaded.model), [id2label[i] for i in range(len(id2label))]
    preprocess, tokenizer = loaded.processor
    labels = [x.strip() for x in (labels or FASHION_MNIST_CLASSES) if x.strip()]
    if len(labels) < 2:
        raise TokenPruneError("give at least two class labels for zero-shot classification")
    return preprocess(image)[None], clip_forward(loaded.model, tokenizer, labels), labels
