"""Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024): importance from Weighted PageRank on the attention
graph, and similarity pruning guided by it. Zero-shot.

Importance (WPR): s <- A^T s on each head's attention graph (rows = queries, each sums to 1),
from a start that emphasises the prefix (CLS) tokens by sqrt(N) (the paper's choice for the
initial distribution), for many steps in early layers and few late: ``iterations`` gives the
steps for the first, middle and last third of the depth (paper: 30-50, 5-10, 1; we take the
low ends, since the early scores converge well within 30 steps and every step costs time).
Heads whose importance is nearly flat or collapsed onto a few tokens are left out
(variance-based head filter, VHF): a head is kept when the variance of its importance over
the candidates, measured relative to the uniform score (the variance of N * s, so the bounds
do not move with N), lies within ``head_variance`` (default 0.5 .. 32: flatter than
about +-0.7 around uniform, or spread over fewer than about N/33 tokens, is out). Fixed bounds
work with any number of heads, unlike a z-score over heads, which cannot single out any head
of four or fewer. If no head is within the bounds all are kept. Kept heads combine by the
root mean square (the paper's emphasis on tokens that matter much to a few heads); "mean" is
the option.

Stages, in the paper's order I' -> S -> I:
  I': rank the candidates by importance (nothing is pruned);
  S:  split them by that rank into the more important half A and the rest B; each B token
      finds its most similar A token (cosine of keys averaged over heads; only |B| x |A|
      similarities are computed) and the most similar B tokens are removed;
  I:  importance is recomputed on the survivors alone (the attention graph restricted to them,
      rows renormalised: what softmax over the survivors gives; ``recompute=False`` reuses I'),
      and the least important are removed.
Background tokens that resemble each other vote for each other in PageRank; S removes those
duplicates first, so I no longer sees them inflate each other's score.

Counts: ``keep_ratio`` of the candidates survive. ``importance_share`` of the removed tokens
go to I, the rest to S; S can remove at most |B| (half the candidates), and I takes whatever S
cannot, so the asked count is always reached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..pruner import SegmentDropPruner, TokenPruneError, check_ratio, register_pruner
from ..reductions import Drop, keep_count, rectangular, top_k_mask
from ..state import Segment


def weighted_pagerank(attn: torch.Tensor, init: torch.Tensor, iterations: int, chunk: int | None = None,
                      alive: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head importance (B, H, n): ``iterations`` steps of s <- A^T s (rows of A sum to 1).

    ``init`` is (B, n), the same start for every head. With ``alive`` (B, n) bool, the graph is
    the one among the alive tokens, rows renormalised over them (what softmax over those keys
    gives), without building that matrix: s <- ((s / row mass) A) * alive. Each step is a
    memory-bound batched matvec; on the CPU, rows go in chunks of about ``chunk`` attention
    entries (default 1 MB of float32 per thread), so a chunk stays in cache for all its steps
    (1.5x faster at DeiT-S shapes than streaming the whole batch through memory every step).
    """
    chunk = chunk or (1 << 18) * torch.get_num_threads()
    rows = len(attn) if attn.is_cuda else max(1, chunk // attn[0].numel())
    alive = torch.ones_like(init, dtype=torch.bool) if alive is None else alive
    out = []
    for a, s0, keep in zip(attn.split(rows), init.split(rows), alive.split(rows)):
        s = s0[:, None, None, :].expand(-1, a.shape[1], 1, -1)
        if bool(keep.all()):
            for _ in range(iterations):
                s = s @ a  # row-vector times matrix, no copy of the attention
        else:
            col = keep[:, None, None, :].to(a.dtype)
            inv_mass = 1 / (col @ a.transpose(-1, -2)).clamp_min(torch.finfo(a.dtype).tiny)  # (b, H, 1, n)
            for _ in range(iterations):
                s = ((s * inv_mass) @ a) * col
        out.append(s[:, :, 0])
    return torch.cat(out)


def head_filter(importance: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(B, H) bool: heads whose variance of N * importance over ``mask`` tokens is in [low, high].

    N * s is 1 everywhere for a uniform score, so the variance measures how far a head is
    from uniform whatever N is. Rows where no head qualifies keep all heads.
    """
    m = mask[:, None, :].float()
    count = m.sum(-1).clamp_min(1)
    mean = (importance * m).sum(-1) / count
    rel = importance / mean.clamp_min(torch.finfo(importance.dtype).tiny)[..., None]  # 1 = uniform
    var = (((rel - 1) ** 2) * m).sum(-1) / count
    keep = (var >= low) & (var <= high)
    return keep | ~keep.any(1, keepdim=True)


def combine_heads(per_head: torch.Tensor, heads: torch.Tensor, how: str) -> torch.Tensor:
    """(B, n) importance from (B, H, n) per-head scores over the kept ``heads`` (B, H)."""
    w = heads.to(per_head.dtype)[..., None]
    count = w.sum(1)
    if how == "rms":
        return ((per_head**2 * w).sum(1) / count).sqrt()
    return (per_head * w).sum(1) / count


@register_pruner("zero-tprune")
@dataclass
class ZeroTPrune(SegmentDropPruner):
    """``keep_ratio`` of the segment survives each listed layer.

    ``importance_share``: share of the removed tokens chosen by the final I-stage (the rest by S).
    ``iterations``: PageRank steps for the first / middle / last third of the depth, or one
    number for all. ``prefix_weight``: start score of each prefix token relative to a patch
    (0: sqrt(N)). ``head_variance``: (low, high) bounds of the head filter, or () for no filter.
    ``head_combine``: "rms" or "mean". ``recompute``: the I-stage re-runs PageRank on the
    survivors of S.
    """

    default_target: ClassVar[str] = "vision"  # on an LVLM: the vision tower (a ViT method)

    segment: str = "visual"
    protect_first: int = 0
    protect_last: int = 0
    importance_share: float = 0.5
    iterations: int | tuple[int, int, int] = (30, 5, 1)
    prefix_weight: float = 0.0
    head_variance: tuple[float, ...] = (0.5, 32.0)
    head_combine: str = "rms"
    recompute: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_ratio(self.name, "importance_share", self.importance_share)
        steps = list(self.iterations) if isinstance(self.iterations, (list, tuple)) else [self.iterations]
        if len(steps) not in (1, 3) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in steps):
            raise TokenPruneError(f"{self.name}: iterations must be an integer >= 1 or three of them "
                                  f"(first / middle / last third of the layers), got {self.iterations!r}")
        self.iterations = steps[0] if len(steps) == 1 else tuple(steps)
        bounds = tuple(self.head_variance or ())
        if len(bounds) not in (0, 2) or (bounds and not 0 <= bounds[0] <= bounds[1]):
            raise TokenPruneError(f"{self.name}: head_variance must be (low, high) with 0 <= low <= high, "
                                  f"or () for no head filter, got {self.head_variance!r}")
        self.head_variance = bounds
        if self.head_combine not in ("rms", "mean"):
            raise TokenPruneError(f"{self.name}: head_combine must be 'rms' or 'mean', got {self.head_combine!r}")
        w = self.prefix_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise TokenPruneError(f"{self.name}: prefix_weight must be a number >= 0 (0: sqrt(N)), got {w!r}")

    def steps(self, layer: int, num_layers: int) -> int:
        """PageRank steps before ``layer``, which reads block ``layer - 1``'s attention."""
        if isinstance(self.iterations, int):
            return self.iterations
        third = min(2, 3 * (layer - 1) // num_layers)
        return self.iterations[third]

    def importance(self, state, attn: torch.Tensor, alive: torch.Tensor, scored: torch.Tensor,
                   steps: int) -> torch.Tensor:
        """(B, n) importance of the ``alive`` tokens on their own attention graph; heads judged on ``scored``."""
        n_alive = alive.sum(1, keepdim=True).float()
        weight = torch.full_like(n_alive, self.prefix_weight) if self.prefix_weight else n_alive.sqrt()
        init = alive.float() * torch.where(state.segments == Segment.SYSTEM, weight, 1.0)
        init = init / init.sum(1, keepdim=True)
        per_head = weighted_pagerank(attn, init, steps, alive=alive)
        heads = head_filter(per_head, scored, *self.head_variance) if self.head_variance else \
            torch.ones(per_head.shape[:2], dtype=torch.bool, device=per_head.device)
        return combine_heads(per_head, heads, self.head_combine)

    def select(self, state):
        candidates = self.candidates(state)
        remove = candidates.sum(1) - keep_count(candidates, self.keep_ratio)
        remove_i = (remove.double() * self.importance_share + 0.5).floor().long()
        steps = self.steps(state.layer, state.num_layers)
        attn = state.attention()  # (B, H, n, n)
        # the graph holds the prompt only: tokens generated after it (a cache-free recompute) must not vote
        prompt = state.content()
        rank = self.importance(state, attn, prompt, candidates, steps)  # I': ranking only

        # S: B (less important half) tokens most similar to an A token are removed
        order = rank.masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
        pos = torch.argsort(order, dim=1)
        half_a = candidates & (pos < (candidates.sum(1, keepdim=True) + 1) // 2)
        half_b = candidates & ~half_a
        a_slots, a_ok = rectangular(half_a, state.valid)
        b_slots, b_ok = rectangular(half_b, state.valid)
        keys = torch.nn.functional.normalize(state.keys().mean(dim=1).float(), dim=-1)
        pick = lambda slots: keys.gather(1, slots[..., None].expand(*slots.shape, keys.shape[-1]))  # noqa: E731
        sim = (pick(b_slots) @ pick(a_slots).transpose(-1, -2)).masked_fill_(~a_ok[:, None, :], float("-inf")).amax(-1)
        remove_s = torch.minimum(remove - remove_i, b_ok.sum(1))
        similar = torch.zeros_like(candidates).scatter(1, b_slots, top_k_mask(sim, b_ok, count=remove_s))

        # I: importance recomputed on the survivors; the least important go
        alive = prompt & ~similar
        if self.recompute and bool((remove > remove_s).any()):
            rank = self.importance(state, attn, alive, candidates & alive, steps)
        left = candidates & alive
        kept = top_k_mask(rank, left, count=left.sum(1) - (remove - remove_s))
        return Drop(keep=state.valid & ~(left & ~kept) & ~similar)
