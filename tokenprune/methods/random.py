"""Random drop: the floor every method must beat at the same budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..pruner import SegmentDropPruner, register_pruner
from ..reductions import Drop


@register_pruner("random")
@dataclass
class RandomDrop(SegmentDropPruner):
    """Keeps a random share of candidates; ``seed`` makes it repeatable.

    Each row draws from its own generator seeded with ``seed``, so a row keeps the same
    tokens alone or in a batch. Reads no layer, so on a decoder it may start at layer 0
    (the language model then runs on the kept tokens only).
    """

    reads_previous_layer: ClassVar[bool] = False

    seed: int = 0

    def select(self, state):
        candidates = self.candidates(state)
        scores = torch.zeros(candidates.shape, dtype=torch.float32)
        for row, mask in enumerate(candidates.cpu()):
            g = torch.Generator().manual_seed(self.seed)
            scores[row, mask] = torch.rand(int(mask.sum()), generator=g)
        return Drop.from_scores(state, scores.to(candidates.device), candidates, self.keep_ratio)
