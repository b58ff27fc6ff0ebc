"""Evaluation tasks: one quality metric per testbed model, on a fixed, seeded, small subset.

====================  ==========================  ===========================================  =================
model                 task                        quality (direction)                          FLOPs source
====================  ==========================  ===========================================  =================
smollm2-135m          :class:`PerplexityTask`     perplexity of held text (lower)              analytic-decoder
tiny-vit              :class:`ClassificationTask` Fashion-MNIST top-1 (higher)                 flop_counter
tiny-clip             :class:`ZeroShotTask`       zero-shot Fashion-MNIST top-1 (higher)       flop_counter
tiny-llava            :class:`VQATask`            easy-vqa exact match (higher)                analytic-decoder
tiny-t2i              :class:`T2ITask`            prompt faithfulness (higher); Fréchet dists  flop_counter
====================  ==========================  ===========================================  =================

A task owns its model and data. The runner calls :meth:`Task.setup` once, then
:meth:`Task.evaluate` once dense (``handle=None``) and once per pruned configuration, with
the pruners attached to one of :meth:`Task.prune_targets`. ``evaluate`` wraps every top-level
model call in ``with meter.call():`` (see :class:`tokenprune.evals.metrics.Meter`) and returns an
:class:`EvalOutput`: the quality number plus the discrete predictions and output vectors the
runner compares with the dense run (fidelity). :meth:`Task.probe` gives one representative call
for latency and memory.

Any model object can be evaluated directly, e.g. a tokenizer-free tiny decoder::

    PerplexityTask(model=my_llama, token_ids=ids, context=24, name="tiny-llama")

``tp.zoo`` models missing from this installation (weights not trained yet, optional packages
absent) make :meth:`Task.setup` raise :class:`TaskUnavailable`; the runner records the reason.
"""
from __future__ import annotations

import importlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import TokenPruneError
from ..state import Segment
from .metrics import Meter, frechet_distance


class TaskUnavailable(RuntimeError):
    """The task's model or data is not available here (the message says why)."""


@dataclass
class EvalOutput:
    """What one evaluation (dense or pruned) produced.

    ``predictions``: discrete outputs compared with the dense run's by top-1 agreement
    (a tensor / list, one entry per scored item). ``features``: ``(N, D)`` output vectors
    compared by mean cosine similarity (``None`` when the task has none).
    ``extra``: further task-specific numbers, copied into the result row.
    """

    quality: float
    predictions: Any = None
    features: torch.Tensor | None = None
    n_items: int = 0
    extra: dict = field(default_factory=dict)


def _bar(it, progress: bool, desc: str, total: int | None = None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, position=1, dynamic_ncols=True)


# Modules that register zoo models as a side effect, for zoo builds whose __init__ does not
# import them yet.
_ZOO_MODULES = ("vision", "llava", "t2i")


def zoo_names() -> list[str]:
    from .. import zoo

    for mod in _ZOO_MODULES:
        try:
            importlib.import_module(f"tokenprune.zoo.{mod}")
        except ImportError:
            pass
    return zoo.names()


def zoo_load(name: str, **kwargs):
    """``tp.zoo.load`` that turns "not available here" into :class:`TaskUnavailable`."""
    from .. import zoo

    if name not in zoo_names():
        raise TaskUnavailable(f"{name!r} is not in tp.zoo.names() ({', '.join(zoo.names())}): "
                              "its loader does not exist yet")
    try:
        return zoo.load(name, **kwargs)
    except (TokenPruneError, ImportError, FileNotFoundError, OSError) as e:
        raise TaskUnavailable(f"{name}: {e}") from e


class Task:
    """Base class; see the module docstring for the protocol."""

    task: str = "task"  # kind of task, e.g. "perplexity"
    metric: str = "quality"
    higher_is_better: bool = True
    flops_source: str = "flop_counter"  # or "analytic-decoder" (decoder stats; see metrics.py)
    default_limit: int = 64

    def __init__(self, name: str, limit: int | None = None, seed: int = 0, device=None, progress: bool = True):
        self.name = name  # the model's name in results
        self.limit = self.default_limit if limit is None else int(limit)
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.seed = seed
        self.device = torch.device(device or "cpu")
        self.progress = progress
        self.model = None

    # -- to implement -----------------------------------------------------------------------
    def setup(self) -> None:
        """Load the model and the fixed subset (idempotent); raise TaskUnavailable if impossible."""
        raise NotImplementedError

    def evaluate(self, meter: Meter, handle=None) -> EvalOutput:
        raise NotImplementedError

    def skip_sparsity(self, sparsity: float, spares_generated: bool) -> float:
        """The ``sparsity`` a skip method runs at for a budget's ``sparsity`` (default: as is)."""
        return sparsity

    def probe(self, handle=None) -> Callable[[], object]:
        """One representative model call (the first batch), for latency and memory."""
        raise NotImplementedError

    # -- defaults ---------------------------------------------------------------------------
    def prune_targets(self) -> list:
        """Modules to attach pruners to, in order of preference (the first one that is supported)."""
        return [self.model]

    def method_defaults(self, method: str) -> dict:
        """Default config of a method on this model (the budget and CLI overrides go on top)."""
        return {}

    def describe(self) -> dict:
        return {"model": self.name, "task": self.task, "metric": self.metric,
                "higher_is_better": self.higher_is_better, "limit": self.limit, "seed": self.seed,
                "flops_source": self.flops_source}


def config_fields(method: str) -> set[str]:
    """Config field names of a registered method (empty if unknown)."""
    import dataclasses

    from ..pruner import _REGISTRY

    cls = _REGISTRY.get(method)
    return {f.name for f in dataclasses.fields(cls)} if cls is not None else set()


def defaults_for(method: str, **candidates) -> dict:
    """The ``candidates`` that are config fields of ``method`` (so one default fits every method)."""
    fields = config_fields(method)
    return {k: v for k, v in candidates.items() if k in fields}


def seeded_subset(n: int, limit: int, seed: int) -> list[int]:
    """The first ``limit`` of ``range(n)`` shuffled by ``random.Random(seed)``: a fixed subset."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[: min(limit, n)]


def decoder_layer_default(model, share: float = 1 / 8) -> int:
    """A default pruning layer: ~1/8 of the depth (SmolLM2's 30 layers -> 4), at least 1."""
    from ..adapters.decoder import find_decoder

    base = find_decoder(model)
    n = len(base.layers) if base is not None else getattr(getattr(model, "config", None), "num_hidden_layers", 8)
    return max(1, min(n - 1, round(n * share)))


# ---- language modelling -------------------------------------------------------------------
@torch.no_grad()
def continuation_logits(model, ids: torch.Tensor, context: int, handle=None) -> torch.Tensor:
    """Logits ``(B, S + 1, V)`` at the last ``S + 1`` positions (``S = len - context`` scored tokens).

    One forward without a cache; with a ``handle``, the scored tokens are marked GENERATED so
    only the context may be reduced (as in ``generate``).
    """
    scored = ids.shape[1] - context
    if scored < 1 or context < 1:
        raise ValueError(f"need context >= 1 and at least one scored token, got {context} of {ids.shape[1]}")
    kwargs = dict(use_cache=False, logits_to_keep=scored + 1)
    if handle is None:
        return model(ids, **kwargs).logits[:, -(scored + 1):]
    seg = torch.full(ids.shape, int(Segment.TEXT), device=ids.device)
    seg[:, context:] = int(Segment.GENERATED)
    with handle.segments(seg):
        return model(ids, **kwargs).logits[:, -(scored + 1):]


@torch.no_grad()
def score_continuation(model, ids: torch.Tensor, context: int, handle=None):
    """Score ``ids[:, context:]`` given ``ids[:, :context]`` (only the context is prunable).

    Same protocol as :func:`tokenprune.evals.text.continuation_perplexity` (scored tokens are
    marked GENERATED), but asks the model for the needed logits only and returns
    ``(nll_sum, n_tokens, argmax_predictions (B, S+1), last_logits (B, V))``: the argmax of
    every scored position plus the position after the block, and that last position's logits.
    """
    logits = continuation_logits(model, ids, context, handle).float()
    pred = logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, context:].reshape(-1),
                                            reduction="sum")
    return float(nll), ids[:, context:].numel(), logits.argmax(-1), logits[:, -1]


def scored_skips(stats, start: int, end: int) -> tuple[int, int]:
    """(skipped, total) token-block computations of the tokens at positions ``start .. end - 1``
    (the scored ones), from a prefill's ``handle.stats``: a token skipped block ``l`` when the record
    of what entered ``l`` (``stats.kept``, kept where the token set changed) does not hold it."""
    rows = len(stats.dense_tokens)
    skipped = sum(sum(end - start - sum(1 for p in row if start <= p < end) for row in kept)
                  for kept in stats.kept.values())
    return skipped, rows * (end - start) * len(stats.tokens_per_layer)


class PerplexityTask(Task):
    """Perplexity of ``scored`` held tokens after a ``context``-token context, which the pruner may reduce.

    Text: Python's own documentation (``evals/text.py``), cut into non-overlapping blocks of
    ``context + scored`` tokens; the subset is ``limit`` blocks picked with ``seed`` from the first
    64. Or pass ``token_ids`` (``(n, L)`` blocks, or one stream) for a tokenizer-free model.
    Fidelity: top-1 agreement of the next-token argmax at every scored position (and the one
    after the block), cosine similarity of the last position's logits.
    """

    task = "perplexity"
    metric = "perplexity"
    higher_is_better = False
    flops_source = "analytic-decoder"
    default_limit = 16
    POOL = 64

    def __init__(self, name: str = "smollm2-135m", model=None, tokenizer=None, token_ids: torch.Tensor | None = None,
                 context: int = 512, scored: int = 128, batch_size: int = 1, pruning_layer: int | None = None,
                 **kw):
        super().__init__(name, **kw)
        self.model, self.tokenizer, self.token_ids = model, tokenizer, token_ids
        self.context, self.scored, self.batch_size = int(context), int(scored), int(batch_size)
        self.pruning_layer = pruning_layer
        self.blocks = None

    def setup(self):
        if self.blocks is not None:
            return
        if self.model is None:
            self.model, self.tokenizer = zoo_load(self.name)
        self.model.to(self.device).eval()
        if self.token_ids is not None:
            ids = torch.as_tensor(self.token_ids).long()
            if ids.dim() == 2 and ids.shape[1] > self.context:
                blocks = ids
                self.scored = ids.shape[1] - self.context
            else:
                blocks = self._cut(ids.reshape(-1))
            pool = blocks
        else:
            if self.tokenizer is None:
                raise ValueError("PerplexityTask needs a tokenizer or token_ids")
            from .text import held_text

            length = self.context + self.scored
            need = self.POOL * length
            chars = 4 * need
            stream = self.tokenizer(held_text(chars), return_tensors="pt").input_ids[0]
            while stream.numel() < need and chars < 8_000_000:
                chars *= 2
                stream = self.tokenizer(held_text(chars), return_tensors="pt").input_ids[0]
            pool = self._cut(stream)
        pick = sorted(seeded_subset(len(pool), self.limit, self.seed))
        self.blocks = pool[pick].to(self.device)

    def _cut(self, stream: torch.Tensor) -> torch.Tensor:
        length = self.context + self.scored
        n = min(stream.numel() // length, self.POOL)
        if n < 1:
            raise ValueError(f"{stream.numel()} tokens cannot make one block of {length}")
        return stream[: n * length].view(n, length)

    def method_defaults(self, method):
        layer = decoder_layer_default(self.model) if self.pruning_layer is None else self.pruning_layer
        return defaults_for(method, layer=layer)

    def skip_sparsity(self, sparsity: float, spares_generated: bool) -> float:
        """Equal compute: a method that spares the scored tokens (``Pruner.spares_generated``) spends
        the budget's share of the whole pass on the context, so it runs at ``sparsity x (context +
        scored) / context`` of the prompt (at most 1)."""
        if not spares_generated:
            return sparsity
        return round(min(1.0, sparsity * (self.context + self.scored) / self.context), 6)

    def _batches(self):
        return [self.blocks[i: i + self.batch_size] for i in range(0, len(self.blocks), self.batch_size)]

    def evaluate(self, meter, handle=None):
        nll, count, preds, last = 0.0, 0, [], []
        skipped, computations = 0, 0
        batches = self._batches()
        for ids in _bar(batches, self.progress, f"{self.name} ppl", len(batches)):
            with meter.call():
                s, n, p, lg = score_continuation(self.model, ids, self.context, handle)
            nll, count = nll + s, count + n
            preds.append(p.cpu())
            last.append(lg.cpu())
            if handle is not None and handle.stats is not None:
                a, b = scored_skips(handle.stats, self.context, ids.shape[1])
                skipped, computations = skipped + a, computations + b
        # the realised share of the scored tokens' token-block computations skipped (a routed
        # method routes them as generated tokens): with the FLOPs, what makes rows comparable
        return EvalOutput(quality=math.exp(nll / count), predictions=torch.cat(preds).reshape(-1),
                          features=torch.cat(last), n_items=len(self.blocks),
                          extra={"nll_per_token": nll / count, "scored_tokens": count,
                                 "scored_skipped": skipped / computations if computations else 0.0})

    def probe(self, handle=None):
        ids = self._batches()[0]
        return lambda: continuation_logits(self.model, ids, self.context, handle)  # the model call only

    def describe(self):
        return {**super().describe(), "context": self.context, "scored": self.scored,
                "batch_size": self.batch_size, "text": "pydoc_data.topics" if self.token_ids is None else "given ids"}


# ---- image classification ----------------------------------------------------------------
def _pil(images):
    from PIL import Image

    return [Image.fromarray(np.asarray(a)).convert("RGB") for a in images]  # grayscale -> 3 channels


class ClassificationTask(Task):
    """Top-1 accuracy of ``tiny-vit`` (``ViTForImageClassification``) on a seeded subset of the
    Fashion-MNIST test split. Fidelity: agreement of predicted classes, cosine of the class logits.
    Pixels are preprocessed once in ``setup`` (outside the measured calls)."""

    task = "image-classification"
    metric = "top1_accuracy"
    flops_source = "flop_counter"
    default_limit = 1000

    def __init__(self, name: str = "tiny-vit", model=None, processor=None, batch_size: int = 250,
                 images=None, labels=None, **kw):
        super().__init__(name, **kw)
        self.model, self.processor, self.batch_size = model, processor, int(batch_size)
        self._images, self._labels = images, labels
        self.pixels = None

    def setup(self):
        if self.pixels is not None:
            return
        if self.model is None:
            self.model, self.processor = zoo_load(self.name)
        self.model.to(self.device).eval()
        if self._images is None:
            try:
                from ..zoo.data import fashion_mnist

                self._images, self._labels = fashion_mnist("test")
            except (TokenPruneError, RuntimeError, OSError) as e:
                raise TaskUnavailable(f"{self.name}: {e}") from e
        pick = seeded_subset(len(self._images), self.limit, self.seed)
        images = [self._images[i] for i in pick]
        self.labels = torch.as_tensor(np.asarray([self._labels[i] for i in pick]))
        self.pixels = [self.processor(images=_pil(images[i: i + self.batch_size]), return_tensors="pt")["pixel_values"]
                       .to(self.device) for i in range(0, len(images), self.batch_size)]

    def _forward(self, px):
        with torch.no_grad():
            return self.model(pixel_values=px).logits

    def evaluate(self, meter, handle=None):
        logits = []
        for px in _bar(self.pixels, self.progress, f"{self.name} cls", len(self.pixels)):
            with meter.call():
                logits.append(self._forward(px).float().cpu())
        logits = torch.cat(logits)
        pred = logits.argmax(-1)
        return EvalOutput(quality=float((pred == self.labels).float().mean()), predictions=pred, features=logits,
                          n_items=len(pred))

    def probe(self, handle=None):
        return lambda: self._forward(self.pixels[0])

    def method_defaults(self, method):
        return defaults_for(method, segment="visual")  # patches; the CLS token is SYSTEM, never pruned


class ZeroShotTask(Task):
    """Zero-shot top-1 accuracy of ``tiny-clip`` (open_clip ``CLIP``): each image goes to the class
    whose ``template.format(name)`` text embedding is closest. ``dataset``: ``fashion-mnist`` (10
    classes) or ``easy-vqa`` (24 colour+shape classes). Class-text embeddings are computed once,
    dense, in ``setup``; the measured calls are ``encode_image``. Fidelity: agreement of predicted
    classes, cosine of the image embeddings."""

    task = "zero-shot-classification"
    metric = "top1_accuracy"
    flops_source = "flop_counter"
    default_limit = 1000

    def __init__(self, name: str = "tiny-clip", model=None, transforms=None, dataset: str = "fashion-mnist",
                 template: str = "a photo of a {}", batch_size: int = 250, **kw):
        super().__init__(name, **kw)
        self.model, self.transforms = model, transforms
        self.dataset, self.template, self.batch_size = dataset, template, int(batch_size)
        self.pixels = None

    def setup(self):
        if self.pixels is not None:
            return
        if self.model is None:
            self.model, self.transforms = zoo_load(self.name)
        preprocess, tokenizer = self.transforms
        self.model.to(self.device).eval()
        try:
            from ..zoo import data

            if self.dataset == "fashion-mnist":
                images, labels = data.fashion_mnist("test")
                names = data.FASHION_MNIST_CLASSES
            elif self.dataset == "easy-vqa":
                images, colors, shapes = data.easy_vqa_shapes("test")
                labels = colors * len(data.EASY_VQA_SHAPES) + shapes
                names = data.EASY_VQA_CLASSES
            else:
                raise ValueError(f"dataset must be 'fashion-mnist' or 'easy-vqa', got {self.dataset!r}")
        except (TokenPruneError, RuntimeError, OSError) as e:
            raise TaskUnavailable(f"{self.name}: {e}") from e
        pick = seeded_subset(len(images), self.limit, self.seed)
        self.labels = torch.as_tensor(np.asarray([labels[i] for i in pick]))
        pil = _pil([images[i] for i in pick])
        with torch.no_grad():
            txt = self.model.encode_text(tokenizer([self.template.format(n) for n in names]).to(self.device))
        self.text = torch.nn.functional.normalize(txt.float(), dim=-1)
        self.pixels = [torch.stack([preprocess(im) for im in pil[i: i + self.batch_size]]).to(self.device)
                       for i in range(0, len(pil), self.batch_size)]

    def method_defaults(self, method):
        return defaults_for(method, segment="visual")

    def prune_targets(self):
        visual = getattr(self.model, "visual", None)
        return [visual, self.model] if visual is not None else [self.model]

    def _encode(self, x):
        with torch.no_grad():
            return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    def evaluate(self, meter, handle=None):
        embs = []
        for x in _bar(self.pixels, self.progress, f"{self.name} zero-shot", len(self.pixels)):
            with meter.call():
                embs.append(self._encode(x).cpu())
        emb = torch.cat(embs)
        pred = (emb @ self.text.cpu().T).argmax(-1)
        return EvalOutput(quality=float((pred == self.labels).float().mean()), predictions=pred, features=emb,
                          n_items=len(pred))

    def probe(self, handle=None):
        return lambda: self._encode(self.pixels[0])

    def describe(self):
        return {**super().describe(), "dataset": self.dataset, "template": self.template}


# ---- visual question answering -----------------------------------------------------------
class VQATask(Task):
    """Exact-match accuracy of ``tiny-llava`` greedy answers on a seeded subset of easy-vqa test
    questions (``tokenprune.zoo.vqa_data.vqa_accuracy``: left-padded batches, ``max_new_tokens``
    from the model's generation config unless given; the answer is the last generated word).
    Pruners default to the visual segment (e.g. FastV's original setting). Fidelity: agreement
    of the answers with the dense model's (no vectors). FLOPs: the language model's decoder layers
    (analytic); ``flops_counted`` includes the vision tower and projector.

    ``kinds``: question kinds of ``vqa_data.easy_vqa_items`` (default: the package's easy-vqa
    questions only); ``weights``: a tiny-llava folder to load instead of the shipped one (e.g. a
    model retrained with ``train_tiny_llava.py --kinds ...``)."""

    task = "vqa"
    metric = "vqa_accuracy"
    flops_source = "analytic-decoder"
    default_limit = 128

    def __init__(self, name: str = "tiny-llava", model=None, processor=None, items=None, batch_size: int = 32,
                 max_new_tokens: int | None = None, pruning_layer: int | None = None, kinds=None,
                 weights: str | None = None, **kw):
        super().__init__(name, **kw)
        self.model, self.processor, self.items = model, processor, items
        self.kinds, self.weights = (tuple(kinds) if kinds else None), weights
        self.batch_size, self.max_new_tokens = int(batch_size), max_new_tokens
        self.pruning_layer = pruning_layer
        self._ready = False

    def setup(self):
        if self._ready:
            return
        if self.model is None:
            self.model, self.processor = zoo_load(self.name, **({"path": self.weights} if self.weights else {}))
        self.model.to(self.device).eval()
        try:
            from ..zoo import vqa_data
        except ImportError as e:
            raise TaskUnavailable(f"{self.name}: tokenprune.zoo.vqa_data is missing ({e})") from e
        self._vqa = vqa_data
        if self.items is None:
            try:
                kinds = {"kinds": self.kinds} if self.kinds else {}
                self.items = vqa_data.easy_vqa_items("test", limit=self.limit, seed=self.seed, **kinds)
            except (TokenPruneError, ImportError, OSError) as e:
                raise TaskUnavailable(f"{self.name}: {e}") from e
        self.items = list(self.items)[: self.limit]
        self._ready = True

    def method_defaults(self, method):
        # each method's own default layer (visionzip 0, before the LLM; fastv / random 2) unless one is given
        layer = {} if self.pruning_layer is None else {"layer": self.pruning_layer}
        return defaults_for(method, segment="visual", **layer)

    def _chunks(self):
        return [self.items[i: i + self.batch_size] for i in range(0, len(self.items), self.batch_size)]

    def _answer(self, chunk):
        return self._vqa.vqa_accuracy(self.model, self.processor, chunk, batch_size=len(chunk),
                                      max_new_tokens=self.max_new_tokens, return_predictions=True)

    def evaluate(self, meter, handle=None):
        preds = []
        chunks = self._chunks()
        for chunk in _bar(chunks, self.progress, f"{self.name} vqa", len(chunks)):
            with meter.call():  # one generate = one request
                acc, p = self._answer(chunk)
            preds += p
        correct = sum(p == item[2] for p, item in zip(preds, self.items))
        return EvalOutput(quality=correct / len(self.items), predictions=preds, n_items=len(self.items),
                          extra=self._by_kind(preds))

    def _by_kind(self, preds) -> dict:
        """``accuracy_<kind>`` and ``n_<kind>`` per question kind, when the items mix kinds."""
        counts = {}
        for p, (_, q, a) in zip(preds, self.items):
            c, n = counts.get(self._vqa.kind_of(q), (0, 0))
            counts[self._vqa.kind_of(q)] = (c + (p == a), n + 1)
        if len(counts) < 2:
            return {}
        return {k: v for kind, (c, n) in counts.items() for k, v in ((f"accuracy_{kind}", c / n), (f"n_{kind}", n))}

    def probe(self, handle=None):
        chunk = self._chunks()[0]
        return lambda: self._answer(chunk)

    def describe(self):
        extra = {k: v for k, v in (("kinds", self.kinds), ("weights", self.weights)) if v}
        return {**super().describe(), "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens, **extra}


# ---- text to image -----------------------------------------------------------------------
class T2ITask(Task):
    """Prompt faithfulness and Fréchet distance of ``tiny-t2i`` images (``tokenprune.zoo.t2i``).

    Prompts: ``t2i.eval_prompts(limit, kinds)`` (default the 24 color x shape prompts, cycled;
    ``kinds`` adds size / position prompts, see ``t2i.KINDS``). Each batch ``k``
    is one ``pipe(batch, num_inference_steps, guidance_scale, generator=manual_seed(seed + k))``
    call, exactly as ``t2i.t2i_scores`` samples, so the dense and the pruned U-Net start from the
    same noise. Scores come from the helper's ``judge_images`` (its ShapeColorJudge):
    quality = faithfulness (judged shape and color both match the prompt); extra columns
    ``shape_acc``, ``color_acc``, ``size_acc`` / ``position_acc`` and ``faithfulness_<kind>``
    (when the prompts ask for them), ``fd_reference`` (Fréchet distance in the judge's feature space
    to real held-out images) and ``fd_dense`` (to the dense model's images). Fidelity: agreement
    of the judge's (shape, color) predictions with the dense images', cosine of the judge features.
    Pruners attach to ``pipe.unet``. FLOPs: flop_counter over whole pipeline calls.
    """

    task = "text-to-image"
    metric = "prompt_faithfulness"
    flops_source = "flop_counter"
    default_limit = 24

    def __init__(self, name: str = "tiny-t2i", pipe=None, judge=None, batch_size: int = 24,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, kinds=None, **kw):
        super().__init__(name, **kw)
        self.model, self.judge, self.batch_size = pipe, judge, int(batch_size)
        self.kinds = tuple(kinds) if kinds else None
        self.steps, self.guidance = num_inference_steps, guidance_scale
        self._dense_features = None
        self.prompts = None

    def setup(self):
        if self.prompts is not None:
            return
        if self.model is None:
            self.model, self.judge = zoo_load(self.name)
        try:
            from ..zoo import t2i
        except ImportError as e:
            raise TaskUnavailable(f"{self.name}: tokenprune.zoo.t2i is missing ({e})") from e
        missing = [f for f in ("judge_images", "eval_prompts", "DEFAULT_STEPS", "DEFAULT_GUIDANCE")
                   if not hasattr(t2i, f)]
        if missing:
            raise TaskUnavailable(f"{self.name}: tokenprune.zoo.t2i lacks {missing}")
        self._t2i = t2i
        self.steps = self.steps or t2i.DEFAULT_STEPS
        self.guidance = self.guidance if self.guidance is not None else t2i.DEFAULT_GUIDANCE
        self.prompts = list(t2i.eval_prompts(self.limit, **({"kinds": self.kinds} if self.kinds else {})))

    def prune_targets(self):
        unet = getattr(self.model, "unet", None)
        return [unet] if unet is not None else [self.model]

    def _chunks(self):
        return [self.prompts[i: i + self.batch_size] for i in range(0, len(self.prompts), self.batch_size)]

    def _sample(self, k: int, chunk):
        g = torch.Generator().manual_seed(self.seed + k)
        with torch.no_grad():
            return self.model(chunk, num_inference_steps=self.steps, guidance_scale=self.guidance, generator=g,
                              output_type="pt").images

    def evaluate(self, meter, handle=None):
        images = []
        chunks = self._chunks()
        for k, chunk in enumerate(_bar(chunks, self.progress, f"{self.name} t2i", len(chunks))):
            with meter.call():
                images.append(self._sample(k, chunk))
        images = torch.cat(images)
        t2i = self._t2i
        scores = t2i.judge_images(images, self.prompts, self.judge)
        with torch.no_grad():
            x = images.float() * 2 - 1
            feats = self.judge.features(x).double()
            shape, color = self.judge.predict(x)
        extra = {"shape_acc": scores["shape_acc"], "color_acc": scores["color_acc"],
                 "fd_reference": scores["frechet"]}
        extra.update({k: scores[k] for k in ("size_acc", "position_acc") if scores.get(k) is not None})
        if len(scores.get("kinds", {})) > 1:
            extra.update({f"faithfulness_{k}": v for k, v in scores["kinds"].items()})
        if handle is None:
            self._dense_features = feats
        elif self._dense_features is not None:
            extra["fd_dense"] = frechet_distance(feats.numpy(), self._dense_features.numpy())
        return EvalOutput(quality=scores["faithfulness"], predictions=shape * len(self.judge.colors) + color,
                          features=feats, n_items=len(images), extra=extra)

    def probe(self, handle=None):
        chunk = self._chunks()[0]
        return lambda: self._sample(0, chunk)

    def describe(self):
        return {**super().describe(), "num_inference_steps": self.steps, "guidance_scale": self.guidance,
                "batch_size": self.batch_size, **({"kinds": self.kinds} if self.kinds else {})}


# ---- registry ----------------------------------------------------------------------------
TASKS: dict[str, Callable[..., Task]] = {
    "smollm2-135m": lambda **kw: PerplexityTask("smollm2-135m", **kw),
    "tiny-vit": lambda **kw: ClassificationTask("tiny-vit", **kw),
    "tiny-clip": lambda **kw: ZeroShotTask("tiny-clip", **kw),
    "tiny-llava": lambda **kw: VQATask("tiny-llava", **kw),
    "tiny-t2i": lambda **kw: T2ITask("tiny-t2i", **kw),
}


def make_task(model: str, **kw) -> Task:
    """The task for a zoo model name (see :data:`TASKS`)."""
    if model not in TASKS:
        raise ValueError(f"no evaluation task for model {model!r}; known: {', '.join(TASKS)}")
    return TASKS[model](**kw)
