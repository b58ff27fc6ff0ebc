"""easy-vqa evaluation items and greedy-generate VQA accuracy for the ``tiny-llava`` zoo model.

The PyPI package ``easy-vqa`` ships 64x64 RGB images of one colored shape each, with
questions such as "what color is the shape?" or "is there a red circle?" and one-word
answers (13 possible: 8 colors, 3 shapes, yes, no). Splits: train 38,575 questions on
4,000 images, test 9,673 questions on 1,000 images. Nothing is downloaded.

* :func:`easy_vqa_items` returns ``(PIL image, question, answer)`` triples; with ``kinds`` it adds
  questions derived from each image's object mask (position, size) that need the layout of the
  visual tokens, not only the few the object covers.
* :func:`build_prompt` is the exact prompt format ``tiny-llava`` was trained with.
* ``tiny-llava`` reasons in a few generated words before the answer word, :func:`format_answer`:
  "what color is the shape?" -> ``"red"``; "is there a blue shape?" -> ``"blue red . no"``
  (the asked-for value, the value it sees, the answer); "is there not a circle?" ->
  ``"not circle circle . no"``. :func:`parse_answer` takes the final word. A decoder of about a
  million parameters trained from scratch for minutes on CPU did not learn to compare a
  question word with what it read from 64 visual tokens in one step (it fell back to the yes/no
  prior of the question form); writing both values next to each other first makes the comparison a local lookup.
  Every answer still depends on the visual tokens (the seen value is read from them).

The module imports nothing from the package at import time, so training scripts can load it
by file path without running ``tokenprune/zoo/__init__.py`` (which imports every loader); that
is why it keeps its own copy of the color / shape lists that ``zoo/data.py`` also has.
"""
from __future__ import annotations

import random
from functools import lru_cache

#: LLaVA-1.5 style prompt; ``<image>`` is expanded by the processor into one token per patch.
PROMPT = "USER: <image>\n{question} ASSISTANT:"

EASY_VQA_COLORS = ["red", "green", "blue", "black", "gray", "teal", "yellow", "brown"]
EASY_VQA_SHAPES = ["circle", "rectangle", "triangle"]
EASY_VQA_ANSWERS = [
    "circle", "green", "red", "gray", "yes", "teal", "black",
    "rectangle", "yellow", "triangle", "brown", "blue", "no",
]


def format_answer(question: str, color: str, shape: str, answer: str) -> str:
    """The text ``tiny-llava`` is trained to generate for ``question`` about an image showing a
    ``color`` ``shape`` whose dataset answer is ``answer`` (see the module docstring)."""
    if answer not in ("yes", "no"):
        return answer
    words = question.lower().rstrip("?").split()
    asked_color = [w for w in words if w in EASY_VQA_COLORS]
    asked = asked_color[0] if asked_color else next(w for w in words if w in EASY_VQA_SHAPES)
    seen = color if asked_color else shape
    negated = "not " if ("not" in words or "no" in words) else ""
    return f"{negated}{asked} {seen} . {answer}"


def parse_answer(text: str) -> str:
    """The answer word of a generated text: its last word (``"blue red. no"`` -> ``"no"``)."""
    words = text.strip().lower().replace("?", " ").replace(".", " ").split()
    return words[-1] if words else ""


def build_prompt(question: str) -> str:
    """The prompt for one easy-vqa question, e.g. ``"USER: <image>\\nwhat color is the shape? ASSISTANT:"``."""
    return PROMPT.format(question=question)


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover
        from tokenprune.errors import TokenPruneError

        raise TokenPruneError("easy-vqa is not installed: pip install easy-vqa") from e
    return easy_vqa


@lru_cache(maxsize=2)
def _split(split: str):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ev = _easy_vqa()
    if split == "train":
        return ev.get_train_questions(), ev.get_train_image_paths()
    return ev.get_test_questions(), ev.get_test_image_paths()


@lru_cache(maxsize=8192)
def _image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def easy_vqa_items(split: str = "test", limit: int | None = None, seed: int = 0,
                   kinds=("easy-vqa",)) -> list[tuple]:
    """easy-vqa ``(image, question, answer)`` triples (image: 64x64 RGB ``PIL.Image``).

    With ``limit=None`` all questions of the split are returned in the package's order
    (test: 9,673). With ``limit=n`` a fixed subset is returned: the first ``n`` questions
    after a shuffle with ``random.Random(seed)`` (so a small subset still mixes images and
    question types; same ``(limit, seed)`` -> same items). Images are cached and shared.

    ``kinds`` picks question kinds from :data:`KINDS`: ``"easy-vqa"`` (the package's own
    questions; the default, and alone exactly the items above), ``"position"`` and ``"size"``
    (derived from each image's object mask, see :func:`derived_questions`). Several kinds: the
    package's questions in its order, then the derived ones image by image (sorted image ids),
    then the same seeded shuffle and cut. Test images are never in the train split.
    """
    kinds = _check_kinds(kinds)
    (questions, answers, image_ids), paths = _split(split)
    if kinds == ("easy-vqa",):
        order = list(range(len(questions)))
        if limit is not None:
            random.Random(seed).shuffle(order)
            order = order[:limit]
        return [(_image(paths[image_ids[i]]), questions[i], answers[i]) for i in order]
    triples = []  # (image path, question, answer)
    if "easy-vqa" in kinds:
        triples += [(paths[i], q, a) for q, a, i in zip(questions, answers, image_ids)]
    derived = [k for k in kinds if k != "easy-vqa"]
    if derived:
        for i in sorted(paths):
            for kind in derived:
                triples += [(paths[i], q, a) for q, a in derived_questions(_image(paths[i]), kind)]
    if limit is not None:
        random.Random(seed).shuffle(triples)
        triples = triples[:limit]
    return [(_image(path), q, a) for path, q, a in triples]


# ---- questions derived from the image itself ---------------------------------------------------
# The package's questions are answered by the few tokens the object covers. These need the
# layout: where the object's tokens sit in the grid, and how many there are.

#: Question kinds of :func:`easy_vqa_items`, in the order their items are listed.
KINDS = ("easy-vqa", "position", "size")
#: Derived questions per kind: (question, the two answers it chooses between).
DERIVED_QUESTIONS = {
    "position": [("is the shape on the left or on the right?", ("left", "right")),
                 ("is the shape at the top or at the bottom?", ("top", "bottom"))],
    "size": [("is the shape small or large?", ("small", "large"))],
}
#: Objects whose centroid is closer than this (pixels) to the image's middle line get no
#: left/right (or top/bottom) question: their side is ambiguous.
POSITION_MARGIN = 4.0


def _check_kinds(kinds) -> tuple:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown question kinds {bad or kinds!r}; choose from {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)  # canonical order, duplicates dropped


def object_mask(image, threshold: int = 40):
    """Boolean ``[H, W]`` object pixels: they differ from the flat background (the corner pixel)
    by more than ``threshold`` in some channel (as :func:`object_patches`)."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.abs(a - a[:1, :1]).max(-1) > threshold


@lru_cache(maxsize=1)
def size_thresholds() -> tuple[float, float]:
    """Object areas (pixels) below the first / above the second tercile of the *train* images:
    "small" / "large"; objects in between get no size question, so the two answers are balanced
    and never decided by a few pixels. The same thresholds serve both splits."""
    import numpy as np
    from PIL import Image

    paths = _split("train")[1]
    areas = []
    for i in sorted(paths):
        with Image.open(paths[i]) as im:
            areas.append(int(object_mask(im).sum()))
    lo, hi = np.quantile(np.asarray(areas, dtype=np.float64), [1 / 3, 2 / 3])
    return float(lo), float(hi)


def derived_questions(image, kind: str) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of one ``kind`` ("position" or "size") for one image, from
    its object mask: left/right and top/bottom of the mask centroid (none within
    :data:`POSITION_MARGIN` of the middle), small/large from the area (:func:`size_thresholds`)."""
    import numpy as np

    fg = object_mask(image)
    if not fg.any():
        return []
    if kind == "position":
        ys, xs = np.nonzero(fg)
        out = []
        for (q, (first, second)), c, mid in zip(DERIVED_QUESTIONS["position"], (xs.mean(), ys.mean()),
                                                (fg.shape[1] / 2, fg.shape[0] / 2)):
            if abs(c - mid) >= POSITION_MARGIN:
                out.append((q, first if c < mid else second))
        return out
    if kind == "size":
        lo, hi = size_thresholds()
        area = fg.sum()
        (q, (small, large)), = DERIVED_QUESTIONS["size"]
        return [(q, small)] if area < lo else [(q, large)] if area > hi else []
    raise ValueError(f"no derived questions of kind {kind!r}; choose from {', '.join(DERIVED_QUESTIONS)}")


def kind_of(question: str) -> str:
    """The kind of a question of :func:`easy_vqa_items` ("easy-vqa", "position" or "size")."""
    for kind, qs in DERIVED_QUESTIONS.items():
        if any(question == q for q, _ in qs):
            return kind
    return "easy-vqa"


def object_patches(image, patch_size: int = 8, threshold: int = 40):
    """Boolean ``[n_patches]`` array, row-major over the patch grid: True where the patch has
    at least one object pixel (an easy-vqa background is one flat color; object pixels differ
    from the corner pixel by more than ``threshold`` in some channel). For a 64x64 image and
    ``tiny-llava`` these are its 64 visual tokens in ``input_ids`` order."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    fg = np.abs(a - a[:1, :1]).max(-1) > threshold
    h, w = fg.shape[0] // patch_size, fg.shape[1] // patch_size
    return fg[: h * patch_size, : w * patch_size].reshape(h, patch_size, w, patch_size).any((1, 3)).reshape(-1)


def vqa_accuracy(model, processor, items, batch_size: int = 64, max_new_tokens: int | None = None,
                 return_predictions: bool = False, progress: bool = False, **tqdm_kwargs):
    """Exact-match accuracy of greedy ``model.generate`` answers on ``items``.

    ``items`` are ``(image, question, answer)`` triples (see :func:`easy_vqa_items`). Prompts are
    built with :func:`build_prompt`, batched with **left padding** (the tokenizer's side is
    forced to ``"left"`` for the call), and decoded from the newly generated tokens only;
    :func:`parse_answer` of the decoded text (its last word) must equal the answer.
    ``max_new_tokens=None`` uses the model's generation config (6 for ``tiny-llava``, whose
    longest answer is 5 words + ``</s>``; fewer tokens cut yes/no answers short). Returns the accuracy in ``[0, 1]``,
    or ``(accuracy, predictions)`` with ``return_predictions=True``.
    """
    import torch

    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    preds: list[str] = []
    correct = 0
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="vqa eval", unit="batch", **tqdm_kwargs)
    try:
        for s in starts:
            chunk = items[s: s + batch_size]
            inputs = processor(images=[c[0] for c in chunk], text=[build_prompt(c[1]) for c in chunk],
                               return_tensors="pt", padding=True)
            with torch.inference_mode():
                kw = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
                out = model.generate(**inputs, do_sample=False, **kw)
            new = out[:, inputs["input_ids"].shape[1]:]
            for text, (_, _, answer) in zip(tok.batch_decode(new, skip_special_tokens=True), chunk):
                pred = parse_answer(text)
                preds.append(pred)
                correct += int(pred == answer)
    finally:
        tok.padding_side = old_side
    acc = correct / max(len(items), 1)
    return (acc, preds) if return_predictions else acc
