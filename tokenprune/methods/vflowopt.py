"""VFlowOpt (Yang et al., ICCV 2025): visual-token pruning with information-flow-guided calibration.

Importance of each visual token = context relevance + ``alpha`` x softmax(patch entropy):

- *context relevance*: head-averaged attention (of the layer before each stage) from the
  "global" tokens, those receiving more than ``global_threshold`` x the mean received
  attention (the reference code's rule, its ``t``), plus the last ``text_queries`` prompt
  tokens. The reference scores in the bidirectional vision tower; in a causal decoder a query
  only sees earlier tokens, so each token's relevance is the mean over the queries that can
  see it, then normalised to sum to 1 over the row's candidates (so ``alpha`` weighs two
  distributions, as in the reference where both terms sum to 1 over an image's patches).
- *patch entropy*: Shannon entropy (bits) of a 256-bin grayscale histogram of the token's
  image patch, from ``state.info("patch_pixels")``. Those pixels are processor-normalised
  ((x - mean_c) / std_c per channel), so each channel is min-max stretched over the row's
  visual tokens first: that undoes any per-channel affine normalisation without knowing it,
  the gray value is the channel mean (the reference's equal weights) and the 256 bins match
  its 8-bit histogram. The softmax runs over the row's candidates.

Progressive: ``layer`` lists the stage layers, ``keep_ratio`` the share of the current
candidates each stage keeps (one float for every stage, or one per stage).

Recycling (``recycle_grid`` = a, the reference's ``m``): the reference takes the
lowest-importance tokens, groups them by cell of an a x a grid over each image's patch grid,
and writes each group's importance-weighted mean into the slot of its most important member,
which stays (every other member leaves). That is exactly our ``Merge`` with ``dst`` = that
member's slot and ``weight`` = importance (times token size, so a token recycled at an earlier
stage counts for what it holds; importance is clamped positive, as negative ``alpha`` can make
it negative): no new token is made, the recycled token keeps its own position. The kept count
includes the recycled tokens and is exact: the low set is grown by as many tokens as it has
groups (the reference over-selects by N / a^2 and may miss the count by a few).

What the model must provide: the entropy term needs ``"patch_pixels"`` and recycling needs
``"image"``, ``"row"``, ``"col"`` (the LLaVA adapter gives them). On models that provide none
(text decoders; ViT encoders today) both are skipped: the method is then the reference's
global-token attention importance with progressive dropping.

Where this differs from the reference code (sihany077/VFlowOpt, LLaVA-OneVision): it scores
once, in the vision tower (attention of the global tokens at one ViT layer, plus the entropy
term), recycles there, and reuses that one score at every LLM stage; here each stage scores
from the decoder's own attention of the layer before it, and recycles at every stage, so
tokens stay model-agnostic decoder slots (the tower-side variant would need the tower's
patch-to-patch attention, which the LVLM adapter does not provide yet).

Calibration (``tokenprune calibrate vflowopt``, :mod:`tokenprune.calibrate`) tunes the stage
layers, ratios, ``alpha``, ``global_threshold`` and ``recycle_grid`` with an optuna study; a
shipped result loads with ``VFlowOpt(calibrated="tiny-llava", budget=0.1)``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from ..pruner import Pruner, TokenPruneError, check_ratio, register_pruner
from ..reductions import Drop, Merge, keep_count, top_k_mask
from ..state import Segment

ZOO_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoo", "weights")
#: the fields a calibrated config sets
CALIBRATED_FIELDS = ("layer", "keep_ratio", "alpha", "global_threshold", "text_queries", "recycle_grid")


def patch_entropy(pixels: torch.Tensor, present: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """(B, n) entropy in bits of each token's grayscale patch histogram (0 where not ``present``).

    ``pixels``: (B, n, C, p, p) in any per-channel affine normalisation; each channel is
    min-max stretched to [0, 1] over the row's ``present`` tokens, averaged to gray and cut
    into ``bins`` levels.
    """
    B, n, C = pixels.shape[:3]
    x = pixels.float().reshape(B, n, C, -1)
    m = present[:, :, None, None]
    lo = x.masked_fill(~m, float("inf")).amin(dim=(1, 3), keepdim=True)
    hi = x.masked_fill(~m, float("-inf")).amax(dim=(1, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-12)
    gray = ((x - lo) / span).clamp(0, 1).where(m, torch.zeros(())).mean(dim=2)  # (B, n, P)
    level = (gray * (bins - 1)).round().long()
    hist = torch.zeros(B, n, bins, dtype=torch.float32, device=pixels.device)
    hist.scatter_add_(2, level, torch.ones_like(gray))
    prob = hist / hist.sum(-1, keepdim=True)
    ent = -(prob * torch.log2(prob.clamp_min(1e-30))).sum(-1)
    return torch.where(present, ent, torch.zeros_like(ent))


def recycle(importance: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor, cell: torch.Tensor):
    """Keep ``count[b]`` candidates of row b, the lowest ones recycled into one token per cell.

    Returns ``(keep, dst)`` (B, n): the kept candidates (top ones plus one representative per
    cell of the low set), and for each other candidate the kept slot it merges into (-1: a
    plain drop, for tokens without a cell or when the count leaves no slot for their group).
    The low set is the ``D + R`` lowest candidates (``D`` = candidates - count) with the
    smallest R such that they span at most R cells, so exactly ``count`` stay.
    """
    B, n = importance.shape
    keep = torch.zeros_like(candidates)
    dst = torch.full((B, n), -1, dtype=torch.long, device=importance.device)
    for b in range(B):
        slots = candidates[b].nonzero().squeeze(1)
        total, k = len(slots), int(count[b])
        if k >= total:
            keep[b, slots] = True
            continue
        # descending importance, ties to the earlier slot (as top_k_mask); low set = the tail
        order = slots[torch.argsort(-importance[b, slots].float(), stable=True)]
        asc = order.flip(0)  # lowest first
        cells = cell[b, asc]
        has_cell = cells >= 0
        uniq, inverse = torch.unique(cells[has_cell], return_inverse=True)
        first = torch.full((len(uniq),), total).scatter_reduce(0, inverse, torch.arange(total)[has_cell], reduce="amin")
        spanned = (first[None, :] < torch.arange(total + 1)[:, None]).sum(1)  # cells among the p lowest
        must = total - k
        fits = (spanned[must:] <= torch.arange(k + 1)).nonzero()  # R cells for R recycled slots
        r = int(fits[0]) if len(fits) else k
        low = asc[: must + r]
        keep[b, order[: k - r]] = True
        low = low[cell[b, low] >= 0]  # tokens without a cell just leave
        if r == 0 or len(low) == 0:
            continue
        _, group = torch.unique(cell[b, low], return_inverse=True)
        # ``low`` runs from the least important up, so a group's best member is its last one
        best = torch.full((int(group.max()) + 1,), -1).scatter_reduce(0, group, torch.arange(len(low)), reduce="amax")
        chosen = torch.zeros(len(best), dtype=torch.bool)
        chosen[best.argsort(descending=True)[:r]] = True  # more groups than slots only when count is tiny
        members = chosen[group]
        rep = low[best]
        dst[b, low[members]] = rep[group[members]]
        dst[b, rep[chosen]] = -1
        keep[b, rep[chosen]] = True
    return keep, dst


@register_pruner("vflowopt")
@dataclass
class VFlowOpt(Pruner):
    """Progressive visual-token pruning by attention + patch entropy, with spatial recycling.

    ``layer``: stage layers (an int or a list); ``keep_ratio``: share of the current candidates
    kept at each stage (a float for all, or one per stage). The default keeps 50% at layers 1
    and 2 (75% of the visual tokens pruned from layer 2 on).
    ``alpha``: weight of the entropy term. ``global_threshold``: a token is "global" when it
    receives more than this times the mean attention (None: no global queries);
    ``text_queries``: last prompt tokens used as queries too. ``recycle_grid``: cell size in
    patches of the recycling grid (0: pruned tokens are dropped).
    ``calibrated``: a testbed name (``tokenprune/zoo/weights/<name>/vflowopt/keep<budget>.json``)
    or a JSON path; that config replaces the fields in :data:`CALIBRATED_FIELDS`.
    ``budget``: which calibrated config, by the share of visual tokens it keeps averaged over
    decoder layers 1..L-1 (the calibration's budget, see :mod:`tokenprune.calibrate`: the
    compute of FastV(layer=1, keep_ratio=budget)); None = ``keep_ratio``, so ``tokenprune eval
    --methods vflowopt:calibrated=tiny-llava --budgets 0.1`` picks ``keep0.10.json``. In a
    calibrated JSON it records the budget; without ``calibrated`` it is not used.
    """

    layer: int | tuple[int, ...] = (1, 2)
    keep_ratio: float | tuple[float, ...] = 0.5
    alpha: float = 0.5
    global_threshold: float | None = 7.0
    text_queries: int = 1
    recycle_grid: int = 2
    segment: str = "visual"
    protect_first: int = 0
    protect_last: int = 0
    calibrated: str | None = None
    budget: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.calibrated is not None:
            self._load_calibrated()
        layers = list(self.layer) if isinstance(self.layer, (list, tuple)) else [self.layer]
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in layers):
            raise TokenPruneError(f"{self.name}: layer must be an integer >= 1 or a list of them, got {self.layer!r}")
        if len(set(layers)) != len(layers) or layers != sorted(layers):
            raise TokenPruneError(f"{self.name}: stage layers {layers} must be increasing")
        self.layer = layers[0] if isinstance(self.layer, int) else tuple(layers)
        if isinstance(self.keep_ratio, (list, tuple)):
            if len(self.keep_ratio) != len(layers):
                raise TokenPruneError(f"{self.name}: keep_ratio lists {len(self.keep_ratio)} values for "
                                      f"{len(layers)} stage layers {layers}")
            for r in self.keep_ratio:
                check_ratio(self.name, "keep_ratio", r)
            self.keep_ratio = tuple(float(r) for r in self.keep_ratio)
        else:
            check_ratio(self.name, "keep_ratio", self.keep_ratio)
        for f in ("alpha",) + (("global_threshold",) if self.global_threshold is not None else ()):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TokenPruneError(f"{self.name}: {f} must be a finite number, got {v!r}")
        for f in ("text_queries", "recycle_grid", "protect_first", "protect_last"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TokenPruneError(f"{self.name}: {f} must be a non-negative integer, got {v!r}")
        if self.global_threshold is None and self.text_queries == 0:
            raise TokenPruneError(f"{self.name}: no attention queries (global_threshold=None and text_queries=0)")
        Segment.parse(self.segment)

    # ---- calibrated configs ------------------------------------------------------------
    def _load_calibrated(self):
        budget = self.budget if self.budget is not None else self.keep_ratio
        path, where = self.calibrated, None
        if not (path.endswith(".json") or os.path.sep in path):
            where = os.path.join(ZOO_WEIGHTS, path, "vflowopt")
            if isinstance(budget, (list, tuple)) or isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise TokenPruneError(f"{self.name}: calibrated={path!r} needs a budget (a number), got {budget!r}")
            path = os.path.join(where, f"keep{float(budget):.2f}.json")
        if not os.path.isfile(path):
            shipped = sorted(f for f in os.listdir(where) if f.startswith("keep") and not f.endswith(".study.json")) \
                if where and os.path.isdir(where) else []
            raise TokenPruneError(f"{self.name}: no calibrated config {path!r}"
                                  + (f"; shipped for {self.calibrated!r}: {', '.join(shipped)}" if shipped else
                                     f"; run `tokenprune calibrate vflowopt --model {self.calibrated} --budget B --out cfg.json`"))
        with open(path) as f:
            config = json.load(f)
        if config.get("name") != self.name:
            raise TokenPruneError(f"{self.name}: {path} is not a vflowopt config (name={config.get('name')!r})")
        for k in CALIBRATED_FIELDS:
            if k in config:
                v = config[k]
                setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.budget = config.get("budget", budget)

    # ---- schedule ----------------------------------------------------------------------
    def layers(self) -> list[int]:
        return [self.layer] if isinstance(self.layer, int) else list(self.layer)

    def stage_ratio(self, layer: int) -> float:
        if isinstance(self.keep_ratio, tuple):
            return self.keep_ratio[self.layers().index(layer)]
        return float(self.keep_ratio)

    # ---- scoring -----------------------------------------------------------------------
    def relevance(self, state, candidates: torch.Tensor) -> torch.Tensor:
        """(B, n) context relevance: attention from global and last prompt tokens, sums to 1 over candidates."""
        content = state.content()
        B, n = content.shape
        pos = torch.arange(n, device=content.device)
        queries = torch.zeros_like(content)
        if self.text_queries:
            rank = content.long().flip(1).cumsum(1).flip(1)  # 1 = last prompt token
            queries |= content & (rank <= self.text_queries)
        if self.global_threshold is not None:
            attn = state.attention().float().mean(dim=1)  # (B, n, n): all query rows
            rows = content[:, :, None].float()
            received = (attn * rows).sum(1) / rows.sum(1).clamp_min(1)  # mean over prompt queries
            mean = (received * content).sum(1, keepdim=True) / content.sum(1, keepdim=True).clamp_min(1)
            queries |= content & (received > self.global_threshold * mean)
            q_attn = attn
        else:
            q_attn = None
        slots = torch.where(queries, pos, -1).sort(dim=1, descending=True).values[:, : int(queries.sum(1).max())]
        if q_attn is None:
            q_attn = state.attention(slots.clamp_min(0)).float().mean(dim=1)  # (B, q, n)
        else:
            q_attn = q_attn.gather(1, slots.clamp_min(0)[..., None].expand(-1, -1, n))
        used = (slots >= 0)[..., None] & (pos[None, None, :] <= slots[..., None])  # query sees the key
        rel = (q_attn * used).sum(1) / used.sum(1).clamp_min(1)
        rel = rel * candidates
        return rel / rel.sum(1, keepdim=True).clamp_min(1e-12)

    def entropy_term(self, state, candidates: torch.Tensor) -> torch.Tensor:
        """(B, n) softmax over each row's candidates of their patch entropy."""
        if "vflowopt_entropy" not in state.token_info:
            state.token_info["vflowopt_entropy"] = lambda: _full_entropy(state.token_info)
        ent = state.info("vflowopt_entropy")
        return torch.softmax(ent.masked_fill(~candidates, float("-inf")), dim=1).nan_to_num(0.0)

    def importance(self, state, candidates: torch.Tensor) -> torch.Tensor:
        score = self.relevance(state, candidates)
        if self.alpha and "patch_pixels" in state.token_info:
            score = score + self.alpha * self.entropy_term(state, candidates)
        return score

    def select(self, state):
        candidates = state.candidates(self.segment, self.protect_first, self.protect_last)
        count = keep_count(candidates, self.stage_ratio(state.layer))
        if bool((count >= candidates.sum(1)).all()):
            return Drop(keep=state.valid)  # keep everything: no scoring, the adapter sees a no-op
        score = self.importance(state, candidates)
        others = state.valid & ~candidates
        if not self.recycle_grid or not all(k in state.token_info for k in ("image", "row", "col")):
            return Drop(keep=others | top_k_mask(score, candidates, count=count))
        a = self.recycle_grid
        image, row, col = state.info("image"), state.info("row"), state.info("col")
        cell = torch.where((image >= 0) & (row >= 0), (image * 4096 + row // a) * 4096 + col // a, -1)
        keep, dst = recycle(score.cpu(), candidates.cpu(), count.cpu(), cell.cpu())
        weight = score.clamp_min(1e-6) * state.token_sizes()
        return Merge(keep=others | keep.to(others.device), dst=dst.to(others.device), weight=weight)


def _full_entropy(info: dict) -> torch.Tensor:
    """Patch entropy of every original token (B or 1, N), from the adapter's per-token facts."""
    def resolve(name):
        v = info[name]
        if callable(v):
            v = info[name] = v()
        return v

    pixels, image = resolve("patch_pixels"), resolve("image")
    B = max(pixels.shape[0], image.shape[0])
    pixels = pixels.expand(B, *pixels.shape[1:])
    present = (image >= 0).expand(B, image.shape[1])
    size = pixels.shape[-1]  # C * p * p with C in {1, 3}: 3 p^2 and p^2 are never both squares
    C = 3 if size % 3 == 0 and math.isqrt(size // 3) ** 2 == size // 3 else 1
    p = math.isqrt(size // C)
    return patch_entropy(pixels.reshape(B, pixels.shape[1], C, p, p), present)
