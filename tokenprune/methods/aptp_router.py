"""The learned half of APTP (Ganjdanesh et al., 2024): prompt -> architecture code.

A hypernetwork reads the frozen text encoder's token states of a prompt (a bidirectional GRU
over the tokens, summed, LayerNorm, ReLU, one linear head per gate group) and answers an
*architecture vector*: one logit per gate. Per U-Net transformer block there are width gates,
its attention heads (one gate per head, shared by self- and cross-attention) and its
feed-forward channels (one gate per ``channel_group`` hidden channels), and one depth gate that
drops the whole block (attn1, attn2 and ff add nothing; the reference's depth gates skip whole
layers the same way). A unit costs MACs only when its width gate and its block's depth gate
are both on.

A codebook of ``K`` architecture codes (orthogonal init) holds the only widths that are ever
built: a prompt runs on the code nearest to its architecture vector (cosine of the gate
probabilities, each gate weighted by the MACs it costs), so ``K`` smaller U-Nets are sliced
once and a batch is served by grouping its prompts by code. A gate is
``sigmoid((logit + offset + noise) / temperature)`` with logistic noise in training (the
Gumbel-sigmoid trick) and none at inference; it keeps its width when that exceeds 1/2.
Training assigns prompts to codes by Sinkhorn optimal transport (balanced use of the codes);
``evals/train/train_aptp.py`` trains it.

The router also remembers the unconditional prompt's pooled text state (``null``), so the
unconditional rows of a classifier-free-guidance batch can follow their prompt's code.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

FILE = "aptp.safetensors"
CONFIG = "config.json"
VERSION = 2  # 2: a depth gate per transformer block


def group_sizes(layout: list[dict], channel_group: int) -> list[int]:
    """Gates per group, in order: block 0 heads, block 0 channel groups, block 0 depth (1), block 1 heads, ..."""
    sizes = []
    for block in layout:
        sizes += [block["heads"], block["channels"] // channel_group, 1]
    return sizes


def gate_macs(layout: list[dict], channel_group: int, tokens: list[int], context: int) -> torch.Tensor:
    """MACs per gate for one image: a head's share of attn1 + attn2 at the block's ``tokens``
    (projections and attention) and a channel group's share of the feed-forward (GEGLU: two
    input projections and one output). A depth gate costs nothing itself (0): it switches its
    block's units off (see ``APTPRouter.effective``)."""
    out = []
    for block, n in zip(layout, tokens):
        dim, hd = block["dim"], block["head_dim"]
        head = (4 * n * dim * hd + 2 * n * n * hd  # self-attention: q, k, v, out; scores and values
                + 2 * n * dim * hd + 2 * context * block["context_dim"] * hd + 2 * n * context * hd)  # cross
        ff = channel_group * n * 3 * dim
        out += [head] * block["heads"] + [ff] * (block["channels"] // channel_group) + [0]
    return torch.tensor(out, dtype=torch.float64)


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, offset: float, noise: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft gates ``sigmoid((logits + offset + logistic noise) / temperature)`` in [0, 1]."""
    x = logits + offset
    if noise:
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-6, 1 - 1e-6)
        x = x + u.log() - (-u).log1p()
    return torch.sigmoid(x / temperature)


def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """(B, K) balanced soft assignment of B rows to K codes (SwAV's Sinkhorn-Knopp): each code
    gets about B / K rows. ``scores``: similarities (B, K)."""
    q = torch.exp((scores - scores.max()) / eps).t()  # (K, B)
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


class APTPRouter(nn.Module):
    """Hypernetwork + codebook for one U-Net ``layout`` (per transformer block: ``heads``,
    ``head_dim``, ``channels`` (feed-forward hidden), ``dim``, ``context_dim``)."""

    def __init__(self, layout: list[dict], num_codes: int = 4, text_dim: int = 384, hidden: int = 64,
                 channel_group: int = 8, temperature: float = 0.4, offset: float = 2.0,
                 tokens: list[int] | None = None, context: int = 8, depth_offset: float = 4.0):
        super().__init__()
        for b in layout:
            if b["channels"] % channel_group:
                raise ValueError(f"feed-forward width {b['channels']} is not a multiple of channel_group {channel_group}")
        self.config = dict(layout=[dict(b) for b in layout], num_codes=num_codes, text_dim=text_dim, hidden=hidden,
                           channel_group=channel_group, temperature=temperature, offset=offset,
                           depth_offset=depth_offset,
                           tokens=list(tokens) if tokens else [64] * len(layout), context=context)
        self.sizes = group_sizes(layout, channel_group)
        self.gru = nn.GRU(text_dim, hidden, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * hidden)
        self.heads = nn.ModuleList(nn.Linear(2 * hidden, s, bias=False) for s in self.sizes)
        codes = torch.empty(num_codes, sum(self.sizes))
        nn.init.orthogonal_(codes)
        self.codes = nn.Parameter(codes)
        self.register_buffer("macs", gate_macs(layout, channel_group, self.config["tokens"], context).float())
        self.register_buffer("null", torch.zeros(text_dim))  # pooled unconditional text state (0: unknown)
        self.trained = True  # False for ``from_shares`` routers (saved in config.json)
        # a depth gate starts further on than a width gate: it switches a whole block, so the
        # resource gradient reaching it (the sum over the block's units) would drop blocks first
        depth = torch.tensor([j % 3 == 2 for j in range(len(self.sizes))]).repeat_interleave(torch.tensor(self.sizes))
        self.offsets = torch.where(depth, float(depth_offset), float(offset))

    @property
    def num_codes(self) -> int:
        return self.codes.shape[0]

    # ---- prompt -> architecture vector ---------------------------------------------------
    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) gate logits of each prompt from its text states ``(B, L, text_dim)``."""
        B, L, _ = context.shape
        lengths = torch.full((B,), L) if mask is None else mask.bool().sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(context.float(), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=L)
        pooled = torch.relu(self.norm(out.sum(1)))
        return torch.cat([head(pooled) for head in self.heads], dim=1)

    def pooled(self, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, text_dim) mean of each prompt's valid token states."""
        if mask is None:
            return context.float().mean(1)
        m = mask.float()[..., None]
        return (context.float() * m).sum(1) / m.sum(1).clamp_min(1.0)

    def is_null(self, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) bool: rows holding the unconditional prompt (always False if ``null`` is unknown)."""
        if not bool(self.null.any()):
            return torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
        cos = nn.functional.cosine_similarity(self.pooled(context, mask), self.null[None].to(context.device), dim=-1)
        return cos > 0.999

    # ---- gates and codes -----------------------------------------------------------------
    def gates(self, logits: torch.Tensor, noise: bool = True, hard: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, D) gates of gate logits; ``hard``: 0 / 1 forward with the soft gradient
        (straight-through), and a width group never loses all its units (its strongest stays, as
        the reference's non-zero width: only a depth gate removes a whole block), so training
        runs exactly what the sliced experts compute."""
        soft = gumbel_sigmoid(logits, self.config["temperature"], self.offsets, noise, generator)
        if not hard:
            return soft
        on = soft.detach() > 0.5
        for j, (part, value) in enumerate(zip(on.split(self.sizes, dim=-1), soft.detach().split(self.sizes, dim=-1))):
            if j % 3 == 2:  # a depth gate may be off
                continue
            rows = (~part.any(-1)).nonzero().flatten()
            part[rows, value[rows].argmax(-1)] = True  # a view of ``on``
        return on.to(soft.dtype) + soft - soft.detach()

    def effective(self, gates: torch.Tensor) -> torch.Tensor:
        """(B, D) gates with every width gate multiplied by its block's depth gate (a unit runs
        only when both are on); depth entries stay as they are."""
        parts = self.split(gates)
        out = []
        for i in range(0, len(parts), 3):
            heads, channels, depth = parts[i: i + 3]
            out += [heads * depth, channels * depth, depth]
        return torch.cat(out, dim=-1)

    def share(self, gates: torch.Tensor) -> torch.Tensor:
        """(B,) kept share of the transformer blocks' prunable MACs under ``gates``."""
        return self.effective(gates) @ self.macs / self.macs.sum()

    def similarity(self, logits: torch.Tensor, code_logits: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) cosine of MAC-weighted effective gate probabilities (no noise) of rows vs codes."""
        w = (self.macs / self.macs.mean()).sqrt()  # depth entries weigh 0: they act through their units
        a = self.effective(self.gates(logits, noise=False, hard=False)) * w
        c = self.effective(self.gates(self.codes if code_logits is None else code_logits, noise=False, hard=False)) * w
        return nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(c, dim=-1).t()

    def nearest(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) the code each row runs on at inference."""
        return self.similarity(logits).argmax(dim=-1)

    def split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        return list(vector.split(self.sizes, dim=-1))

    def code_masks(self, k: int) -> tuple[dict, dict]:
        """Code ``k`` as the adapter's expert masks: ``heads[i]`` (bool per head), ``channels[i]``
        (bool per feed-forward channel): its noise-free hard gates; a block whose depth gate is
        off keeps nothing (the U-Net adapter then removes its attn1, attn2 and ff)."""
        keep = self.split(self.effective(self.gates(self.codes[k: k + 1].detach(), noise=False))[0] > 0.5)
        heads, channels = {}, {}
        for i in range(len(self.config["layout"])):
            heads[i] = keep[3 * i].clone()
            channels[i] = keep[3 * i + 1].repeat_interleave(self.config["channel_group"])
        return heads, channels

    def kept_share(self, k: int) -> float:
        """MAC share of code ``k``'s gates in the transformer blocks' prunable MACs (model card / stats)."""
        return float(self.share(self.gates(self.codes[k: k + 1].detach(), noise=False))[0])

    def dropped_blocks(self, k: int) -> list[int]:
        """Transformer blocks code ``k`` removes whole (depth gate off)."""
        depth = self.split(self.gates(self.codes[k: k + 1].detach(), noise=False)[0])[2::3]
        return [i for i, d in enumerate(depth) if float(d) < 0.5]

    @classmethod
    def from_shares(cls, layout: list[dict], shares: list[float], **kwargs) -> "APTPRouter":
        """An UNTRAINED router (``trained=False`` in its saved config) whose code ``k`` keeps about
        ``shares[k]`` of each block's heads and feed-forward channel groups (the first ones, at
        least one; every block kept), for timing experts on any U-Net layout; its hypernetwork is
        random, so route with ``code=k`` or read its codes, never quality. ``kwargs``: as
        ``__init__`` (``text_dim``, ``tokens``, ``context``, ``channel_group``...)."""
        if not shares or any(not 0.0 < float(s) <= 1.0 for s in shares):
            raise ValueError(f"shares must be a non-empty list of numbers in (0, 1], got {shares}")
        router = cls(layout, num_codes=len(shares), **kwargs)
        with torch.no_grad():
            for k, s in enumerate(shares):
                parts = []
                for j, size in enumerate(router.sizes):
                    keep = size if j % 3 == 2 else max(1, round(float(s) * size))
                    parts.append(torch.where(torch.arange(size) < keep, 8.0, -12.0))  # past the offsets: clear-cut
                router.codes[k] = torch.cat(parts)
        router.trained = False
        return router

    # ---- files -----------------------------------------------------------------------------
    def save(self, folder: str, **meta) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, os.path.join(folder, FILE),
                  metadata={"method": "aptp", "version": str(VERSION)})
        with open(os.path.join(folder, CONFIG), "w") as f:
            json.dump({"method": "aptp", "version": VERSION, **self.config, "trained": self.trained, **meta}, f, indent=1)
