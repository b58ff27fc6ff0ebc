"""ATP-LLaVA (Ye et al., CVPR 2025): per-instance, per-layer thresholds on visual-token scores.

An ATP module sits before each listed decoder layer and scores the visual tokens twice:

- *redundancy*: mean of the self-modality (visual -> visual) and cross-modality
  (text -> visual) attention each token receives in the previous layer. Each term averages
  over the queries that can see the token (causal order; each query's attention taken
  relative to uniform over the keys it sees) and is divided by its row mean, so both weigh
  the same; the score ``z`` is its log, standardised per row.
- *spatial* (SAP): the image grid is sampled uniformly at strides 1, 2, 4, ... (nested grids
  around the centre); a token's score is log2 of the sparsest stride that samples it, so the
  tokens that cover the image most coarsely are kept first (the paper's ``1 - lambda * R_s``
  is a monotone map of the same sampling rate).

A small head reads statistics of ``z`` (mean, spread, quantiles), the layer's depth and its
budget, and predicts two per-instance thresholds: ``theta_r`` (as an offset to the quantile
that would keep exactly the budget) and ``theta_s``. A token stays if ``z > theta_r`` or its
spatial score ``> theta_s``, so kept counts differ per row and per layer; in a batch the
engine pads rows to the longest and masks the fillers.

Budget: ``keep_ratio`` is the share of a prompt's visual tokens left after the last ATP layer;
each of the K layers aims at ``keep_ratio ** (1 / K)`` of the visual tokens that reach it
(the head moves around that per instance). ``keep_ratio=1`` keeps everything (dense, exactly).

Training (``evals/train/train_atp.py``) uses :class:`SoftMasks`: no token is dropped; the soft
masks ``sigmoid((score - theta) * tau)`` become additive ``log(mask)`` attention biases on the
keys of every later layer, which is what a drop does when the mask is 0 or 1.

``checkpoint``: a shipped testbed name (``"tiny-llava"``, the default), a path to a trained
``atp.safetensors`` (or its folder), or ``None`` for the untrained rule (head output zero:
the top-``keep`` quantile of the redundancy score plus the samples of the stride-8 grid).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import TokenPruneError
from ..pruner import Pruner, check_ratio, register_pruner
from ..reductions import Drop, keep_count
from ..state import Segment
from .checkpoints import checkpoint_file, read_safetensors, write_safetensors

FILE = "atp.safetensors"
NUM_FEATURES = 7
SPATIAL_INIT = 2.5  # untrained theta_s: only the coarsest grid (stride >= 8: log2 = 3) is kept by SAP
MIN_LOG = -1e4  # "mask 0" as an attention bias: exp(-1e4) == 0 in float32, without NaN rows


class ATPHead(nn.Module):
    """Score statistics + depth + budget -> (theta_r offset, theta_s) per row."""

    def __init__(self, hidden: int = 32, num_layers: int = 0):
        super().__init__()
        self.num_layers = num_layers  # decoder depth it was trained for (0: any)
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(features)
        return out[:, 0], out[:, 1] + SPATIAL_INIT

    def save(self, path: str, **meta) -> None:
        info = {"method": "atp", "num_layers": str(self.num_layers), "features": str(NUM_FEATURES),
                "hidden": str(self.net[0].out_features)}
        write_safetensors(self, path, info, meta)


def checkpoint_path(checkpoint: str) -> str:
    """A testbed name's shipped module, or a path (file, or folder holding ``atp.safetensors``)."""
    return checkpoint_file("atp", checkpoint, FILE)


@lru_cache(maxsize=8)
def load_head(path: str) -> ATPHead:
    meta, tensors = read_safetensors("atp", path)
    if meta.get("method") != "atp" or int(meta.get("features", -1)) != NUM_FEATURES:
        raise TokenPruneError(f"atp: {path} is not an ATP module for this version (method={meta.get('method')!r}, "
                              f"{meta.get('features')} features; expected {NUM_FEATURES})")
    head = ATPHead(int(meta["hidden"]), int(meta["num_layers"]))
    try:
        head.load_state_dict(tensors)
    except RuntimeError as e:
        raise TokenPruneError(f"atp: {path} does not fit the ATP head: {e}") from None
    return head.eval().requires_grad_(False)


def kth_largest(z: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B,) the value a ``z > value`` rule needs to keep the ``k`` largest masked entries per row."""
    order = z.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
    value = order.gather(1, k.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    return torch.where(k >= mask.sum(1), torch.full_like(value, float("-inf")), value)


def spatial_score(row: torch.Tensor, col: torch.Tensor, grid: int) -> torch.Tensor:
    """log2 of the sparsest uniform grid stride (1, 2, 4, ...) whose samples include (row, col)."""
    centre = (grid - 1) // 2
    score = torch.zeros(row.shape, dtype=torch.float32, device=row.device)
    stride = 2
    while stride <= max(grid, 1):
        on = (torch.remainder(row - centre, stride) == 0) & (torch.remainder(col - centre, stride) == 0)
        score = torch.where(on, math.log2(stride), score)
        stride *= 2
    return score


@register_pruner("atp")
@dataclass
class ATP(Pruner):
    """``layer``: the decoder layer(s) an ATP module runs before (>= 1); ``keep_ratio``: share of
    the visual tokens left after the last of them (per-row counts vary around it);
    ``checkpoint``: shipped testbed name, path, or None (untrained threshold rule)."""

    layer: int | tuple[int, ...] = (1, 3)
    keep_ratio: float = 0.25
    checkpoint: str | None = "tiny-llava"

    def __post_init__(self):
        super().__post_init__()
        layers = list(self.layer) if isinstance(self.layer, (list, tuple)) else [self.layer]
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in layers) \
                or len(set(layers)) != len(layers):
            raise TokenPruneError(f"atp: layer must be an integer >= 1 or a list of distinct ones, got {self.layer!r}")
        self.layer = layers[0] if isinstance(self.layer, int) else tuple(sorted(layers))
        check_ratio(self.name, "keep_ratio", self.keep_ratio)
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise TokenPruneError(f"atp: checkpoint must be a testbed name, a path or None, got {self.checkpoint!r}")
        self.head = ATPHead() if self.checkpoint is None else load_head(checkpoint_path(self.checkpoint))
        self.soft = None  # SoftMasks while training: select() records masks instead of dropping

    def layers(self) -> list[int]:
        return [self.layer] if isinstance(self.layer, int) else list(self.layer)

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        trained = self.head.num_layers
        if trained and trained != num_layers:
            raise TokenPruneError(f"atp: checkpoint {self.checkpoint!r} was trained for a {trained}-layer decoder; "
                                  f"this model has {num_layers} layers (train one for it, or checkpoint=None)")

    def layer_target(self) -> float:
        return float(self.keep_ratio) ** (1.0 / len(self.layers()))

    # ---- scores ------------------------------------------------------------------------
    def scores(self, state, candidates: torch.Tensor) -> torch.Tensor:
        """(B, n) log redundancy score z of each candidate (0 elsewhere)."""
        B, n = candidates.shape
        text = state.content() & (state.segments == int(Segment.TEXT))
        asks = candidates | text
        m = max(int(asks.sum(1).max()), 1)
        pos = torch.arange(n, device=asks.device)
        query = (asks.long() * 2 * n - pos).topk(m, dim=1).indices.sort(dim=1).values  # (B, m) asking slots first
        real = asks.gather(1, query)
        probs = state.attention(query).float().mean(dim=1).nan_to_num(0.0)  # (B, m, n); padding queries see nothing
        sees = real[:, :, None] & (query[:, :, None] > pos[None, None, :])  # later queries only (not itself)
        # relative to uniform attention over the keys a query can see: removes the causal bias
        # towards early tokens (an early query spreads the same mass over fewer keys)
        probs = probs * (state.valid[:, None, :] & (pos[None, None, :] <= query[:, :, None])).sum(-1, keepdim=True)
        z = torch.zeros(B, n, device=asks.device)
        for kind in (candidates, text):
            w = (sees & kind.gather(1, query)[:, :, None]).float()
            term = (probs * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, n) mean over the queries that see it
            mean = (term * candidates).sum(1, keepdim=True) / candidates.sum(1, keepdim=True).clamp_min(1)
            z = z + 0.5 * term / mean.clamp_min(1e-12)
        return torch.where(candidates, z.clamp_min(1e-6).log(), torch.zeros_like(z))

    def features(self, state, z: torch.Tensor, mask: torch.Tensor, target: float, base: torch.Tensor,
                 mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        cnt = mask.sum(1).clamp_min(1).float()
        q50 = kth_largest(z, mask, (cnt * 0.5).long())
        q90 = kth_largest(z, mask, (cnt * 0.1).long())
        depth = torch.full_like(mean, state.layer / max(state.num_layers, 1))
        finite = torch.where(torch.isfinite(base), base, z.masked_fill(~mask, float("inf")).amin(1) - 1)
        feats = torch.stack([torch.full_like(mean, target), depth, mean, std, q50, q90, finite], dim=1)
        return torch.where(mask.any(1, keepdim=True), feats, torch.zeros_like(feats)).nan_to_num(0.0, 0.0, 0.0)

    def thresholds(self, state, candidates: torch.Tensor):
        """(z, spatial, theta_r, theta_s) for the rows' ``candidates``."""
        target = self.layer_target()
        with torch.no_grad():  # scores are inputs; only the head learns
            z = self.scores(state, candidates)
            # standardised per row, so one temperature fits every instance and layer
            cnt = candidates.sum(1, keepdim=True).clamp_min(1).float()
            mean = (z * candidates).sum(1, keepdim=True) / cnt
            std = (((z - mean) ** 2 * candidates).sum(1, keepdim=True) / cnt).sqrt()
            z = torch.where(candidates, (z - mean) / std.clamp_min(1e-6), torch.zeros_like(z))
            row, col = state.info("row"), state.info("col")  # the library's error if the model has no grid
            grid = int(state.token_info["row"].max()) + 1  # of the whole prompt, not of the tokens left
            spatial = spatial_score(row, col, grid)
            base = kth_largest(z, candidates, keep_count(candidates, target))
            features = self.features(state, z, candidates, target, base, mean[:, 0], std[:, 0])
        offset, theta_s = self.head(features.to(next(self.head.parameters())))
        return z, spatial, base + offset.float(), theta_s.float()

    def select(self, state):
        candidates = state.candidates("visual")
        if self.soft is not None:
            return self.soft.record(self, state, candidates)
        if self.keep_ratio >= 1.0:
            return None
        if self.keep_ratio <= 0.0:
            return Drop(keep=state.valid & ~candidates)
        with torch.no_grad():
            z, spatial, theta_r, theta_s = self.thresholds(state, candidates)
        keep = (z > theta_r[:, None]) | (spatial > theta_s[:, None])
        return Drop(keep=(state.valid & ~candidates) | (candidates & keep))


class SoftMasks:
    """Training mode of attached :class:`ATP` pruners: soft masks instead of drops.

    At each ATP layer the pruner records ``log mask`` per token, with
    ``mask = max(sigmoid((z - theta_r) * tau), sigmoid((spatial - theta_s) * tau))``; hooks on
    the decoder layers from there on add the running sum of those logs to the attention mask's
    key columns, so later layers weigh each visual key by its mask (0 = dropped, 1 = kept).
    ``hard=True`` uses 0/1 masks: the soft forward then equals the pruned one.
    ``layers``: the decoder's ``nn.ModuleList`` (the caller knows its model; the method does not).

        with tp.pruning(model, atp), SoftMasks([atp], model.model.language_model.layers) as soft:
            loss = lm_loss(model(**batch)) + soft.budget_loss()
    """

    def __init__(self, pruners, layers: nn.ModuleList, tau: float = 5.0, hard: bool = False):
        self.pruners, self.layers, self.tau, self.hard = list(pruners), layers, float(tau), hard
        self.log_mask: torch.Tensor | None = None  # (B, N) running sum over ATP layers so far
        self.shares: list[tuple[torch.Tensor, float]] = []  # (kept share per row, target) per ATP layer
        self._hooks = []

    def __enter__(self):
        for p in self.pruners:
            p.soft = self
        first = min(l for p in self.pruners for l in p.layers())
        for layer in self.layers[first:]:
            self._hooks.append(layer.register_forward_pre_hook(self._bias, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self.pruners:
            p.soft = None

    def reset(self):
        self.log_mask, self.shares = None, []

    def budget_loss(self) -> torch.Tensor:
        """Mean squared gap between each row's kept share and the layer's target."""
        return torch.stack([((share - target) ** 2).mean() for share, target in self.shares]).mean()

    def record(self, pruner: ATP, state, candidates: torch.Tensor):
        B, n = candidates.shape
        N = state.token_info["row"].shape[1]
        if self.log_mask is None or self.log_mask.shape != (B, N):
            self.log_mask = torch.zeros(B, N, device=candidates.device)
        before = self.log_mask.gather(1, state.index)
        alive = candidates & (before > math.log(0.5))  # earlier ATP layers' survivors
        z, spatial, theta_r, theta_s = pruner.thresholds(state, alive)
        if self.hard:
            keep = (z > theta_r[:, None]) | (spatial > theta_s[:, None])
            log_m = torch.where(keep, 0.0, MIN_LOG)
        else:
            a = (z - theta_r[:, None]) * self.tau
            b = (spatial - theta_s[:, None]) * self.tau
            log_m = torch.maximum(nn.functional.logsigmoid(a), nn.functional.logsigmoid(b))
        log_m = torch.where(alive, log_m, torch.where(candidates, MIN_LOG, 0.0)) if self.hard else \
            torch.where(candidates, log_m, torch.zeros_like(log_m))
        # the budget counts what inference will keep (hard masks) with the soft masks' gradient
        # (straight-through): a soft share alone overstates the kept share by the masks' tails
        prev = before.exp() * candidates
        soft = (prev * log_m.exp()).sum(1) / prev.sum(1).clamp_min(1e-6)
        keep = ((z > theta_r[:, None]) | (spatial > theta_s[:, None])) & alive
        hard = keep.sum(1) / alive.sum(1).clamp_min(1)
        self.shares.append((hard.detach() + soft - soft.detach(), pruner.layer_target()))
        self.log_mask = (self.log_mask.scatter(1, state.index, before + log_m)).clamp_min(MIN_LOG)
        return None

    def _bias(self, module, args, kwargs):
        if self.log_mask is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        B, N = hidden.shape[:2]
        if self.log_mask.shape != (B, N):
            return None  # decode steps of generate: training runs full forwards only
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(N, N, dtype=torch.bool, device=hidden.device).tril()[None, None]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~mask, torch.finfo(hidden.dtype).min)
        kwargs["attention_mask"] = mask + self.log_mask.to(hidden.dtype)[:, None, None, :]
        return args, kwargs
