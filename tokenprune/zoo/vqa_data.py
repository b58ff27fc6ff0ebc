"""easy-vqa evaluation items and greedy-generate VQA accuracy for the ``tiny-llava`` zoo model.

The PyPI package ``easy-vqa`` ships 64x64 RGB images of one colored shape each, with
questions such as "what color is the shape?" or "is there a red circle?" and one-word
answers (13 possible: 8 colors, 3 shapes, yes, no). Splits: train 38,575 questions on
4,000 images, test 9,673 questions on 1,000 images. Nothing is downloaded.

* :func:`easy_vqa_items` returns ``(PIL image, question, answer)`` triples.
* :func:`build_prompt` is the exact prompt format ``tiny-llava`` was trained with.
* :func:`vqa_accuracy` runs batched greedy ``model.generate`` (left padding) and scores
  exact-match answers.

The module imports nothing from the package at import time, so training scripts can load it
by file path without running ``tokenprune/zoo/__init__.py`` (which imports every loader).
"""
from __future__ import annotations

import random
from functools import lru_cache

#: LLaVA-1.5 style prompt; ``<image>`` is expanded by the processor into one token per patch.
PROMPT = "USER: <image>\n{question} ASSISTANT:"

EASY_VQA_ANSWERS = [
    "circle", "green", "red", "gray", "yes", "teal", "black",
    "rectangle", "yellow", "triangle", "brown", "blue", "no",
]


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


def easy_vqa_items(split: str = "test", limit: int | None = None, seed: int = 0) -> list[tuple]:
    """easy-vqa ``(image, question, answer)`` triples (image: 64x64 RGB ``PIL.Image``).

    With ``limit=None`` all questions of the split are returned in the package's order
    (test: 9,673). With ``limit=n`` a fixed subset is returned: the first ``n`` questions
    after a shuffle with ``random.Random(seed)`` (so a small subset still mixes images and
    question types; same ``(limit, seed)`` -> same items). Images are cached and shared.
    """
    (questions, answers, image_ids), paths = _split(split)
    order = list(range(len(questions)))
    if limit is not None:
        random.Random(seed).shuffle(order)
        order = order[:limit]
    return [(_image(paths[image_ids[i]]), questions[i], answers[i]) for i in order]


def _normalize(text: str) -> str:
    words = text.strip().lower().replace("?", " ").replace(".", " ").split()
    return words[0] if words else ""


def vqa_accuracy(model, processor, items, batch_size: int = 64, max_new_tokens: int = 3,
                 return_predictions: bool = False, progress: bool = False, **tqdm_kwargs):
    """Exact-match accuracy of greedy ``model.generate`` answers on ``items``.

    ``items`` are ``(image, question, answer)`` triples (see :func:`easy_vqa_items`). Prompts are
    built with :func:`build_prompt`, batched with **left padding** (the tokenizer's side is
    forced to ``"left"`` for the call), and decoded from the newly generated tokens only; the
    first word of the decoded text must equal the answer. Returns the accuracy in ``[0, 1]``,
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
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            for text, (_, _, answer) in zip(tok.batch_decode(new, skip_special_tokens=True), chunk):
                pred = _normalize(text)
                preds.append(pred)
                correct += int(pred == answer)
    finally:
        tok.padding_side = old_side
    acc = correct / max(len(items), 1)
    return (acc, preds) if return_predictions else acc
