"""What every adapter shares: hook bookkeeping, per-thread call state, the pruner schedule."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from ..errors import TokenPruneError
from ..pruner import ModelFacts


class HookedAdapter:
    """Removable hooks + one call state per thread (concurrent requests never share state)."""

    stack = "language"  # what ``Pruner.target`` this adapter's layers are: "language" or "vision"
    slices = False  # True: applies width pruners (pruners with ``experts``: sliced copies of model parts)

    def __init__(self, pruners, facts: "ModelFacts | int", min_layer: int = 0):
        """``facts``: what the adapter knows about the model (a bare layer count is taken as
        ``ModelFacts(num_layers=...)``); every pruner checks them here, before any hook."""
        self.pruners = pruners
        self.facts = facts if isinstance(facts, ModelFacts) else ModelFacts(num_layers=int(facts), stack=self.stack)
        num_layers = self.facts.num_layers
        self.at: dict[int, list] = {}
        for p in pruners:
            if callable(getattr(p, "experts", None)) and not self.slices:
                raise TokenPruneError(f"{p.name} slices the transformer blocks of a diffusers U-Net; "
                                      f"this {type(self).__name__.removesuffix('Adapter').lower()} model cannot be sliced")
            if p.target not in ("auto", self.stack):
                where = "vision tower" if p.target == "vision" else "language model"
                raise TokenPruneError(f"{p.name} has target={p.target!r}, but this model has no {where} to prune")
            p.check(self.facts)
            for layer in p.layers_on(num_layers):
                if layer < min_layer:
                    raise TokenPruneError(f"{p.name}: this model family is reduced from layer {min_layer} on, got {layer}")
                self.at.setdefault(layer, []).append(p)
        self._hooks = []
        self._local = threading.local()
        self.last_stats = None

    def hook(self, handle):
        self._hooks.append(handle)

    def detach(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def call(self):
        return getattr(self._local, "call", None)

    @call.setter
    def call(self, value):
        self._local.call = value

    @contextmanager
    def segment_override(self, segments: torch.Tensor):
        prev = getattr(self._local, "segments", None)
        self._local.segments = segments
        try:
            yield
        finally:
            self._local.segments = prev

    @property
    def segments(self):
        return getattr(self._local, "segments", None)

    @property
    def token_info(self) -> dict:
        """Per-token facts for this thread's next prefill (set by a wrapping adapter, e.g. the LVLM's)."""
        return getattr(self._local, "token_info", None) or {}

    @token_info.setter
    def token_info(self, value: dict | None):
        self._local.token_info = value


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, visible: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) over visible keys, in float32. q: (B,H,q,d), k: (B,Hk,n,d)."""
    if q.shape[1] != k.shape[1]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    # scale the (q, d) operand rather than the (q, n) scores; contiguous operands make one fast bmm
    scores = (q.float() * scale).contiguous() @ k.float().contiguous().transpose(-1, -2)
    if bias is not None:
        scores += bias
    if bool(visible.all()):
        return scores.softmax(dim=-1)
    scores.masked_fill_(~visible, float("-inf"))
    # a query that sees no key (a padding row) attends to nothing, rather than giving NaN
    return scores.softmax(dim=-1).masked_fill_(~visible.any(-1, keepdim=True), 0.0)


def attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float, visible: torch.Tensor,
                   on: torch.Tensor) -> torch.Tensor:
    """(B, H, q): the softmax(q k^T * scale) mass on the keys ``on`` (B, n), in float32, through
    SDPA with a 0 / 1 value column: no (q, n) matrix is materialised. Rows that see no key: 0.
    The value is zero-padded to the head width: a one-column value sends the CPU SDPA to its
    unfused path (a (q, n) matrix again), about twice as slow."""
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    B, H = q.shape[:2]
    v = torch.zeros(B, 1, k.shape[2], q.shape[-1], device=q.device)
    v[..., 0] = on.float()[:, None, :]
    v = v.expand(B, H, -1, -1)
    visible = visible.expand(B, H, *visible.shape[2:])
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v, attn_mask=visible, scale=scale)[..., 0]
    return out.masked_fill_(~visible.any(-1), 0.0)
