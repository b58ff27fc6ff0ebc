"""English text the repo can always get offline, and perplexity under context pruning."""
from __future__ import annotations

import math

import torch

from ..state import Segment


def held_text(min_chars: int = 20_000) -> str:
    """Python's own documentation topics (``pydoc_data.topics``): real English, shipped with CPython."""
    from pydoc_data.topics import topics

    parts, size = [], 0
    for key in sorted(topics):
        parts.append(topics[key])
        size += len(topics[key])
        if size >= min_chars:
            break
    return "\n".join(parts)


def calibration_text(min_chars: int = 60_000) -> str:
    """Calibration text (e.g. ShortGPT's block influence): ``pydoc_data.topics`` taken from the *end*
    of the sorted topics, so it never overlaps ``held_text`` (which evaluations read from the start)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in calibration_topics(min_chars))


def calibration_topics(min_chars: int = 60_000) -> list[str]:
    """The topic keys ``calibration_text(min_chars)`` reads (to check it against the held-out ones)."""
    from pydoc_data.topics import topics

    keys, size = [], 0
    for key in sorted(topics, reverse=True):
        keys.append(key)
        size += len(topics[key])
        if size >= min_chars:
            break
    return keys


def token_block(tokenizer, length: int, offset: int = 0) -> torch.Tensor:
    """(1, length) token ids of held text, starting ``offset`` tokens in."""
    ids = tokenizer(held_text(8 * (length + offset)), return_tensors="pt").input_ids[:, offset : offset + length]
    if ids.shape[1] < length:
        raise ValueError(f"held text gave only {ids.shape[1]} tokens, {length} asked")
    return ids


@torch.no_grad()
def continuation_perplexity(model, ids: torch.Tensor, context: int, handle=None) -> float:
    """Perplexity of ``ids[:, context:]`` given ``ids[:, :context]``.

    Only the context may be reduced: the scored tokens are marked GENERATED, as they would
    be in ``generate``, so a pruned model is scored the way it is used.
    """
    if handle is not None:
        seg = torch.full(ids.shape, int(Segment.TEXT))
        seg[:, context:] = int(Segment.GENERATED)
        with handle.segments(seg):
            logits = model(ids, use_cache=False).logits
    else:
        logits = model(ids, use_cache=False).logits
    pred = logits[:, context - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, context:].reshape(-1))
    return math.exp(nll.item())
