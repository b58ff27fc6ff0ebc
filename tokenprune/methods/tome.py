"""ToMe (Bolya et al., 2023): bipartite soft matching merges the most similar token pairs.

Candidates alternate into sets A and B; each A token finds its most similar B token
(cosine of the previous layer's attention keys, averaged over heads) and the most similar
pairs are merged by a size-weighted average. The adapter tracks sizes and applies ToMe's
proportional attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pruner import SegmentDropPruner, register_pruner
from ..reductions import Merge, keep_count, top_k_mask


def bipartite_merge(keys: torch.Tensor, candidates: torch.Tensor, remove: torch.Tensor, valid: torch.Tensor,
                    sizes: torch.Tensor | None) -> Merge:
    """Merge ``remove[b]`` tokens of row b: pure function of keys (B, n, d) and masks (B, n)."""
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    rank = candidates.long().cumsum(dim=1) - 1
    a = candidates & (rank % 2 == 0)
    b = candidates & (rank % 2 == 1)
    sim = (k @ k.transpose(-1, -2)).masked_fill_(~b[:, None, :], float("-inf"))  # rows outside A are never read
    best, target = sim.max(dim=-1)
    merged = top_k_mask(best, a, count=torch.minimum(remove, a.sum(1)))
    return Merge(keep=valid & ~merged, dst=torch.where(merged, target, -1), weight=sizes)


@register_pruner("tome")
@dataclass
class ToMe(SegmentDropPruner):
    """``keep_ratio`` of the segment's tokens survive each listed layer; the rest are merged."""

    segment: str = "visual"
    protect_first: int = 0
    protect_last: int = 0

    def select(self, state):
        candidates = self.candidates(state)
        remove = candidates.sum(1) - keep_count(candidates, self.keep_ratio)
        keys = state.keys().mean(dim=1)  # (B, n, head_dim)
        return bipartite_merge(keys, candidates, remove, state.valid, state.token_sizes())
