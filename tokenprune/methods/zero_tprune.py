"""Zero-TPrune (Wang et al., CVPR 2024): importance from Weighted PageRank on the attention graph,
then similarity-based pruning guided by that importance. Zero-shot.

I-stage: s <- A^T s over the head-averaged attention graph (rows = queries), from a
uniform start with the CLS/prefix tokens emphasised; more iterations in early layers, one
in the last. Heads whose importance distribution has an outlying variance are left out of
the average (variance-based head filter). The lowest-importance tokens are dropped.
S-stage: the rest, sorted by importance, split into an important half A and a less
important half B; each B token is matched to its most similar A token (cosine of keys)
and the most similar B tokens are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pruner import SegmentDropPruner, TokenPruneError, check_ratio, register_pruner
from ..reductions import Drop, keep_count, top_k_mask
from ..state import Segment


def weighted_pagerank(attn: torch.Tensor, init: torch.Tensor, iterations: int, chunk: int | None = None) -> torch.Tensor:
    """Per-head importance (B, H, n): ``iterations`` steps of s <- A^T s (rows of A sum to 1).

    Each step is a memory-bound batched matvec; on the CPU, rows go in chunks of about
    ``chunk`` attention entries (default 1 MB of float32 per thread), so a chunk stays in
    cache for all its steps (1.5x faster at DeiT-S shapes than streaming the whole batch
    through memory every step).
    """
    chunk = chunk or (1 << 18) * torch.get_num_threads()
    rows = len(attn) if attn.is_cuda else max(1, chunk // attn[0].numel())
    out = []
    for a, s0 in zip(attn.split(rows), init.split(rows)):
        s = s0[:, None, None, :].expand(-1, a.shape[1], 1, -1)
        for _ in range(iterations):
            s = s @ a  # row-vector times matrix, no copy of the attention
        out.append(s[:, :, 0])
    return torch.cat(out)


def head_filter(importance: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """(B, H) heads whose log-variance of importance (over ``mask`` tokens) is within k std of the mean."""
    m = mask[:, None, :].float()
    count = m.sum(-1).clamp_min(1)
    mean = (importance * m).sum(-1) / count
    var = (((importance - mean[..., None]) ** 2) * m).sum(-1) / count
    lv = var.clamp_min(1e-12).log()
    z = (lv - lv.mean(1, keepdim=True)) / lv.std(1, keepdim=True).clamp_min(1e-6)
    keep = z.abs() <= k
    return torch.where(keep.any(1, keepdim=True), keep, torch.ones_like(keep))


@register_pruner("zero-tprune")
@dataclass
class ZeroTPrune(SegmentDropPruner):
    """``keep_ratio`` of the segment survives each listed layer.

    ``importance_share``: share of the removed tokens chosen by the I-stage (rest: S-stage).
    ``iterations``: PageRank steps; 0 = schedule from ``max_iterations`` at layer 1 down to 1.
    """

    segment: str = "visual"
    protect_first: int = 0
    protect_last: int = 0
    importance_share: float = 0.5
    iterations: int = 0
    max_iterations: int = 30
    prefix_weight: float = 4.0
    head_filter_k: float = 1.5

    def __post_init__(self):
        super().__post_init__()
        check_ratio(self.name, "importance_share", self.importance_share)
        if self.iterations < 0 or self.max_iterations < 1:
            raise TokenPruneError(f"{self.name}: iterations must be >= 0 and max_iterations >= 1")

    def steps(self, layer: int, num_layers: int) -> int:
        if self.iterations:
            return self.iterations
        frac = (num_layers - 1 - layer) / max(num_layers - 2, 1)  # 1 at layer 1, 0 at the last layer
        return max(1, round(1 + (self.max_iterations - 1) * frac))

    def select(self, state):
        candidates = self.candidates(state)
        remove = candidates.sum(1) - keep_count(candidates, self.keep_ratio)
        remove_i = (remove.double() * self.importance_share + 0.5).floor().long()
        attn = state.attention()  # (B, H, n, n)
        init = state.valid.float() * torch.where(state.segments == Segment.SYSTEM, self.prefix_weight, 1.0)
        init = init / init.sum(1, keepdim=True)
        per_head = weighted_pagerank(attn, init, self.steps(state.layer, state.num_layers))
        heads = head_filter(per_head, candidates, self.head_filter_k).float()
        importance = (per_head * heads[..., None]).sum(1) / heads.sum(1, keepdim=True)

        # I-stage: drop the least important
        survivors = top_k_mask(importance, candidates, count=candidates.sum(1) - remove_i)
        # S-stage: B (less important half) tokens most similar to an A token are dropped
        order = importance.masked_fill(~survivors, float("-inf")).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        half_a = survivors & (rank < (survivors.sum(1, keepdim=True) + 1) // 2)
        half_b = survivors & ~half_a
        k = torch.nn.functional.normalize(state.keys().mean(dim=1).float(), dim=-1)
        sim = (k @ k.transpose(-1, -2)).masked_fill(~half_a[:, None, :], float("-inf")).amax(dim=-1)
        similar = top_k_mask(sim, half_b, count=torch.minimum(remove - remove_i, half_b.sum(1)))
        dropped = (candidates & ~survivors) | similar
        return Drop(keep=state.valid & ~dropped)
