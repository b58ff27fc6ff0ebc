"""FTP (Li et al., 2024): a learned router lets tokens skip decoder blocks one token at a time.

Before each block ``i >= 1`` one small MLP, shared by every block, reads four scalars per token
and says whether the token runs the block or passes it by on the residual stream (``Skip``: it
leaves no keys / values in that block and rejoins after it unchanged):

- *position*: ``log(1 + p) / log(4096)`` with ``p`` the token's position in its row;
- *attention score*: the share of the token's own attention (previous block) that goes to the
  row's first token, the attention sink: how idle the token currently is. It is the mean over a
  few query heads fixed at training (``Router.heads``; SmolLM2-135M: head 1 of 9), computed on
  those heads only (``TokenState.attention_mass``), so routing costs a sliver of a block;
- *attention rank*: the rank of that score among the row's prompt tokens, in [0, 1];
- *target sparsity* of this block (from the schedule).

Decisions are hard at inference. The prompt's tokens are ranked by the router's logit and the
``round(s_i * n)`` lowest skip block ``i`` (``n``: the row's prompt tokens), so the realised
sparsity is the target. Every input is causal (a token's own attention row), so a prompt's
routing never depends on the tokens generated after it, and a token routes the same in
``generate`` as in a cache-free recompute. The first token of each row is never routed away: it
is the attention sink every later token reads in every block. Block 0 is never routed (no
attention before it), so a uniform schedule skips ``sparsity * L / (L - 1)`` per block ``>= 1``.

Which tokens may skip (``route_generated``). By default (False) the tokens whose next-token
prediction is read run every block: generated tokens and the prompt's last token; the budget is
spent on the rest of the prompt, whose tokens only lend their keys / values to later ones.
Measured on SmolLM2-135M (``results/smollm2-ftp``): a skipped block costs a prompt token's keys
little, but costs a token's own prediction dearly, so skipping the predicting tokens loses to
removing whole blocks (ShortGPT) at equal FLOPs, while sparing them beats it. The saving is the
prefill's (and the KV cache of the skipped prompt tokens); decode steps run dense. With
``route_generated=True`` every token is routed, as in the paper: generated tokens
(``Segment.GENERATED``, at decode steps or a scored continuation) one by one, skipping where the
logit is below a threshold calibrated after training at the eval's positions so that the target
share of them skips on average (``Router.thresholds``, per block sparsity); their rank input is
0.5, unknown.

``sparsity``: the share of the prompt's token-block computations skipped (with
``route_generated``, every token's; 0.0 = dense, bit-exact; 0.3 on a 30-block model skips as many
as removing 9 blocks would on the prompt). ``schedule``: per-block sparsities (length =
the model's depth, block 0 at 0, mean = ``sparsity``); ``"searched"``: the one
``evals/train/search_ftp.py`` found for this ``sparsity``, shipped beside the router; None = uniform.
``checkpoint``: a shipped model name (``"smollm2-135m"``, the default) or a path to an
``ftp.safetensors`` (or its folder). ``static=True``: instead of the MLP, the static attention-rank
rule the router is guided towards in training: the tokens with the highest sink share skip (the
prompt's top ``round(s_i * n)``; a generated token when its share is above the checkpoint's
calibrated ``Router.static_thresholds``), on the checkpoint's heads, so it skips generated tokens
like the router does (equal FLOPs). ``checkpoint=None``: that static rule with no weights, for any
model: every head's mean, and generated tokens never skip (nothing calibrated their threshold).
``route_generated``: see above.
Training: ``evals/train/train_ftp.py``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import TokenPruneError
from ..pruner import Pruner, check_ratio, register_pruner
from ..reductions import Skip
from ..state import Segment
from .checkpoints import checkpoint_file, read_safetensors, write_safetensors

FILE = "ftp.safetensors"
NUM_FEATURES = 4
POSITION_SCALE = math.log(4096.0)


class Router(nn.Module):
    """Four scalars per token -> keep logit (> 0: run the block)."""

    def __init__(self, hidden: int = 32, num_layers: int = 0, hidden_size: int = 0, thresholds=(), heads=None,
                 static_thresholds=()):
        super().__init__()
        self.num_layers, self.hidden_size = num_layers, hidden_size  # the model it was trained for (0: any)
        # (block sparsity, logit) pairs: a generated token skips when its logit is below the value
        # interpolated at its block's sparsity (calibrated after training); none: 0
        self.thresholds = [tuple(t) for t in thresholds]
        # the static rule's pairs for the same model: (block sparsity, minus the sink share)
        self.static_thresholds = [tuple(t) for t in static_thresholds]
        # query heads whose attention share on the first token is the feature (their mean); None: all
        self.heads = None if heads is None else tuple(int(h) for h in heads)
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)[..., 0]

    def threshold(self, sparsity: float, static: bool = False) -> float | None:
        """Keep score (the logit; for ``static``, minus the sink share) below which a generated token
        skips a block of this sparsity; None if not calibrated (static: generated tokens never skip)."""
        table = self.static_thresholds if static else self.thresholds
        if not table:
            return None if static else 0.0
        return interpolate(table, sparsity)

    def save(self, path: str, **meta) -> None:
        info = {"method": "ftp", "features": str(NUM_FEATURES), "hidden": str(self.net[0].out_features),
                "num_layers": str(self.num_layers), "hidden_size": str(self.hidden_size),
                "thresholds": json.dumps(self.thresholds), "static_thresholds": json.dumps(self.static_thresholds),
                "heads": json.dumps(self.heads)}
        write_safetensors(self, path, info, meta)


def interpolate(table, x: float) -> float:
    """Piecewise-linear ``y(x)`` through the ``(x, y)`` pairs, constant outside them."""
    if x <= table[0][0]:
        return table[0][1]
    for (x0, y0), (x1, y1) in zip(table, table[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return table[-1][1]


def checkpoint_path(checkpoint: str) -> str:
    """A shipped model name's router, or a path (file, or folder holding ``ftp.safetensors``)."""
    return checkpoint_file("ftp", checkpoint, FILE)


@lru_cache(maxsize=8)
def load_router(path: str) -> Router:
    meta, tensors = read_safetensors("ftp", path)
    if meta.get("method") != "ftp" or int(meta.get("features", -1)) != NUM_FEATURES:
        raise TokenPruneError(f"ftp: {path} is not an FTP router for this version (method={meta.get('method')!r}, "
                              f"{meta.get('features')} features; expected {NUM_FEATURES})")
    router = Router(int(meta["hidden"]), int(meta["num_layers"]), int(meta["hidden_size"]),
                    json.loads(meta.get("thresholds", "[]")), json.loads(meta.get("heads", "null")),
                    json.loads(meta.get("static_thresholds", "[]")))
    try:
        router.load_state_dict(tensors)
    except RuntimeError as e:
        raise TokenPruneError(f"ftp: {path} does not fit the FTP router: {e}") from None
    return router.eval().requires_grad_(False)


def features(sink: torch.Tensor, positions: torch.Tensor, prompt: torch.Tensor, sparsity,
             position: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n, 4) router inputs from each token's attention share on the sink ``(B, n)``, its
    position in the row ``(B, n)`` and the routed prompt tokens ``(B, n)`` (their rank group);
    other tokens get rank 0.5. ``sparsity``: the block's target, a float or ``(B, 1)``.
    ``position``: ``position_feature(positions)``, when the caller has it already."""
    # the rank among the prompt: the inverse of the sorting permutation (a row without prompt tokens: 0.5)
    rank = sink.masked_fill(~prompt, float("inf")).argsort(dim=1, stable=True).argsort(dim=1)
    count = prompt.sum(1, keepdim=True)
    rank = torch.where(prompt, rank.float() / (count - 1).clamp_min(1), torch.full_like(sink, 0.5))
    pos = position_feature(positions) if position is None else position
    target = torch.as_tensor(sparsity, dtype=sink.dtype, device=sink.device).expand_as(sink)
    return torch.stack([pos, sink, rank, target], dim=-1)


def position_feature(positions: torch.Tensor) -> torch.Tensor:
    return torch.log1p(positions.float().clamp_min(0)) / POSITION_SCALE


def skip_count(prompt: torch.Tensor, fixed: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(B,) prompt tokens to skip: ``round(sparsity * n)`` of the row's ``n`` prompt tokens
    (the ``fixed`` ones that always run included), at most the routable ones."""
    n = (prompt | fixed).sum(1).double()
    return torch.minimum((n * sparsity + 0.5).floor().long(), prompt.sum(1))


def searched_schedule(checkpoint: str | None, sparsity: float) -> tuple[float, ...] | None:
    """The schedule ``search_ftp.py`` found for ``sparsity``, shipped beside the router (``schedules.json``)."""
    if sparsity == 0.0:
        return None
    if checkpoint is None:
        raise TokenPruneError("ftp: schedule='searched' needs a checkpoint (the schedules ship beside the router)")
    path = os.path.join(os.path.dirname(checkpoint_path(checkpoint)), "schedules.json")
    found = json.load(open(path)) if os.path.isfile(path) else {}
    if f"{sparsity:g}" not in found:
        raise TokenPruneError(f"ftp: no searched schedule for sparsity {sparsity:g} beside {checkpoint!r} "
                              f"(searched: {', '.join(sorted(found)) or 'none'}); run evals/train/search_ftp.py")
    return tuple(found[f"{sparsity:g}"])


def uniform_schedule(sparsity: float, num_layers: int) -> list[float]:
    """Block 0 dense, the others alike, mean ``sparsity`` (capped at 1 per block)."""
    per = min(1.0, sparsity * num_layers / max(num_layers - 1, 1))
    return [0.0] + [per] * (num_layers - 1)


@register_pruner("ftp")
@dataclass
class FTP(Pruner):
    """``sparsity``: share of token-block computations skipped; ``schedule``: per-block shares
    (None: uniform); ``checkpoint``: shipped model name, path, or None (static rule, no weights);
    ``static``: the static attention-rank rule on the checkpoint's heads and thresholds."""

    sparsity: float = 0.3
    schedule: tuple[float, ...] | str | None = None
    checkpoint: str | None = "smollm2-135m"
    static: bool = False
    route_generated: bool = False

    @property
    def routes_decode(self) -> bool:
        """Asked at every decode step only when generated tokens are routed."""
        return self.route_generated

    @property
    def spares_generated(self) -> bool:
        return not self.route_generated

    def __post_init__(self):
        super().__post_init__()
        check_ratio(self.name, "sparsity", self.sparsity)
        if self.schedule == "searched":
            self.schedule = searched_schedule(self.checkpoint, self.sparsity)
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)) or not self.schedule:
                raise TokenPruneError(f"ftp: schedule must be a list of per-block sparsities, got {self.schedule!r}")
            for s in self.schedule:
                check_ratio(self.name, "schedule entries", s)
            self.schedule = tuple(float(s) for s in self.schedule)
            if self.schedule[0] != 0.0:
                raise TokenPruneError("ftp: schedule[0] must be 0: block 0 has no attention before it to route by")
            mean = sum(self.schedule) / len(self.schedule)
            if abs(mean - self.sparsity) > 0.01:
                raise TokenPruneError(f"ftp: the schedule's mean sparsity is {mean:.3f}, but sparsity is "
                                      f"{self.sparsity}: give the schedule's mean as sparsity")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise TokenPruneError(f"ftp: checkpoint must be a model name, a path or None, got {self.checkpoint!r}")
        for flag in ("static", "route_generated"):
            if not isinstance(getattr(self, flag), bool):
                raise TokenPruneError(f"ftp: {flag} must be True or False, got {getattr(self, flag)!r}")
        self.router = None if self.checkpoint is None else load_router(checkpoint_path(self.checkpoint))

    def block_sparsity(self, num_layers: int) -> list[float]:
        return list(self.schedule) if self.schedule is not None else uniform_schedule(self.sparsity, num_layers)

    def layers(self) -> list[int]:
        if self.schedule is None:
            raise TokenPruneError("ftp: its blocks depend on the model's depth (use layers_on(num_layers))")
        return self.layers_on(len(self.schedule))

    def layers_on(self, num_layers: int) -> list[int]:
        if self.sparsity <= 0.0:
            return []
        return [i for i, s in enumerate(self.block_sparsity(num_layers)) if s > 0 and i < num_layers]

    def validate(self, num_layers: int) -> None:
        if self.schedule is not None and len(self.schedule) != num_layers:
            raise TokenPruneError(f"ftp: the schedule lists {len(self.schedule)} blocks; this model has {num_layers}")
        trained = self.router.num_layers if self.router is not None else 0
        if trained and trained != num_layers:
            raise TokenPruneError(f"ftp: checkpoint {self.checkpoint!r} was trained for a {trained}-layer decoder; "
                                  f"this model has {num_layers} layers (train one for it, or checkpoint=None)")
        super().validate(num_layers)

    def check(self, model) -> None:
        super().check(model)
        size = self.router.hidden_size if self.router is not None else 0
        if size and model.hidden_size and size != model.hidden_size:
            raise TokenPruneError(f"ftp: checkpoint {self.checkpoint!r} was trained for hidden size {size}; "
                                  f"this model has {model.hidden_size} (train one for it, or checkpoint=None)")
        heads = self.router.heads if self.router is not None else None
        if heads and model.num_heads and not all(0 <= h < model.num_heads for h in heads):
            raise TokenPruneError(f"ftp: checkpoint {self.checkpoint!r} reads attention heads {list(heads)}; "
                                  f"this model has {model.num_heads}")

    def scores(self, state, sparsity: float, prompt, positions):
        """(B, n) keep scores, the lowest skip: the router's logit, or (static rule) minus the sink share."""
        router = self.router
        # the previous block's attention on the row's first token (at a decode step: over its whole
        # cache), for the router's heads only, with no (n, n) probability matrix kept
        mass = state.attention_mass(state.row_offset, heads=None if router is None else router.heads)
        sink = mass[:, 0] if mass.shape[1] == 1 else mass.mean(1)
        if router is None or self.static:
            return -sink
        position = state.memo("ftp-position", lambda: position_feature(positions))
        feats = features(sink, positions, prompt, sparsity, position)
        return router(feats.to(router.net[0].weight.dtype)).float()

    def routable(self, state):
        """What routing needs of the slots alone, the same at every block of a prefill (``state.memo``):
        positions, the prompt, its tokens routed by rank (and whether there is one), the generated
        tokens routed by threshold (None: they always run)."""
        positions = state.positions()
        is_generated = state.segments == int(Segment.GENERATED)
        in_prompt = state.valid & ~is_generated
        routed = state.valid & (positions > 0)  # the first token never skips
        prompt = routed & ~is_generated
        generated = None
        if not self.route_generated:  # tokens whose prediction is read run every block: the prompt's last, generated ones
            prompt &= positions < last_prompt_position(in_prompt, positions)
        elif self.router is not None and bool((routed & is_generated).any()):
            generated = routed & is_generated
        return positions, in_prompt, prompt, bool(prompt.any()), generated

    def skip_counts(self, state, sparsity: float, in_prompt, prompt):
        """(the most prompt tokens a row skips, (B, most): whether the row skips its i-th lowest)."""
        k = skip_count(prompt, in_prompt & ~prompt, sparsity)
        most = int(k.max())
        return most, torch.arange(most, device=k.device)[None, :] < k[:, None]

    def select(self, state):
        sparsity = self.block_sparsity(state.num_layers)[state.layer]
        if sparsity <= 0.0:
            return None
        positions, in_prompt, prompt, any_prompt, generated = state.memo(
            ("ftp", self.route_generated, self.router is None), lambda: self.routable(state))
        # generated tokens skip below a calibrated threshold; without one (the static rule without a
        # checkpoint) they never skip
        cut = None if generated is None else self.router.threshold(sparsity, self.static)
        if not any_prompt and cut is None:
            return None
        with torch.no_grad():
            score = self.scores(state, sparsity, prompt, positions)
        skip = generated & (score < cut) if cut is not None else None
        if any_prompt:  # the prompt's round(s * n) lowest scores skip: the exact share
            most, take = state.memo(("ftp-k", self.route_generated, sparsity),
                                    lambda: self.skip_counts(state, sparsity, in_prompt, prompt))
            if most:
                low = score.masked_fill(~prompt, float("inf")).topk(most, dim=1, largest=False).indices
                ranked = torch.zeros_like(prompt).scatter_(1, low, take)
                skip = ranked if skip is None else skip | ranked
        return None if skip is None else Skip(keep=state.valid & ~skip)


def last_prompt_position(prompt: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, 1) position of each row's last prompt token (-1 for a row without one)."""
    return positions.masked_fill(~prompt, -1).amax(dim=1, keepdim=True)
