"""FastV (Chen et al., 2024): after layer K, keep the tokens the last prompt token attends to most.

Scores are the head-averaged attention of layer K-1 from the last prompt token, as in the
paper. With ``segment="visual"`` this is the original visual-token variant.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..pruner import SegmentDropPruner, register_pruner
from ..reductions import Drop


@register_pruner("fastv")
@dataclass
class FastV(SegmentDropPruner):
    def select(self, state):
        candidates = self.candidates(state)
        query = state.last_content_slot()[:, None]
        scores = state.attention(query).mean(dim=1)[:, 0]  # (B, n)
        return Drop.from_scores(state, scores, candidates, self.keep_ratio)
