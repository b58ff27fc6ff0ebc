"""VisionZip-style baseline (Yang et al., 2024): choose visual tokens from the vision tower's view.

*Dominant* tokens are the patches the tower's CLS token attends to most at LLaVA's feature
layer; the rest are folded into a few *contextual* tokens: evenly spaced ones among the rest
are kept as targets, every other leftover merges into the target whose tower key it is most
similar to (plain mean). The choice uses only the tower, as VisionZip's does before the
projector; here it is applied to the visual segment before decoder layer ``layer``: 0 by
default, so the language model runs on (and caches) only the kept tokens, as in VisionZip.
One difference: contextual tokens are means of the projected features, not the projection
of the mean tower features (the projector is a nonlinear MLP). ``layer=1`` lets decoder
layer 0 see every token first. Needs an LVLM adapter, which provides
``vision_cls_attention`` and ``vision_keys`` per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..pruner import SegmentDropPruner, check_ratio, register_pruner
from ..reductions import Merge, keep_count, top_k_mask


def contextual_merge(keys: torch.Tensor, rest: torch.Tensor, targets_per_row: torch.Tensor):
    """Evenly spaced ``targets_per_row`` of the ``rest`` slots stay; each other one joins its most similar target.

    Returns ``(targets, dst)``: (B, n) bool and (B, n) target slot per merged slot (-1 elsewhere).
    """
    count = rest.sum(1)
    rank = rest.long().cumsum(1) - 1
    step = (count // targets_per_row.clamp_min(1)).clamp_min(1)[:, None]
    targets = rest & (rank % step == 0) & (rank // step < targets_per_row[:, None])
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = (k @ k.transpose(-1, -2)).masked_fill_(~targets[:, None, :], float("-inf"))
    leftover = rest & ~targets & targets.any(1, keepdim=True)
    return targets, torch.where(leftover, sim.argmax(-1), -1)


@register_pruner("visionzip")
@dataclass
class VisionZip(SegmentDropPruner):
    """``keep_ratio`` of the visual tokens stay (dominant + contextual); ``contextual_share`` of
    those are contextual (VisionZip's LLaVA-1.5 setting: 54 dominant + 10 contextual of 576)."""

    reads_previous_layer: ClassVar[bool] = False  # chooses from the vision tower's view only

    layer: int | tuple[int, ...] = 0
    keep_ratio: float = 0.25
    segment: str = "visual"
    protect_first: int = 0
    protect_last: int = 0
    contextual_share: float = 0.15

    def __post_init__(self):
        super().__post_init__()
        check_ratio(self.name, "contextual_share", self.contextual_share)

    def select(self, state):
        candidates = self.candidates(state)
        saliency = state.info("vision_cls_attention")
        total = keep_count(candidates, self.keep_ratio)
        contextual = (total.double() * self.contextual_share + 0.5).floor().long()
        dominant = top_k_mask(saliency, candidates, count=total - contextual)
        rest = candidates & ~dominant
        targets, dst = contextual_merge(state.info("vision_keys"), rest, contextual)
        keep = state.valid & ~(rest & ~targets)
        return Merge(keep=keep, dst=dst)
