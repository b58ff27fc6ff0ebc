"""ViT-style encoders: HF ViT / DeiT and the open_clip ``VisionTransformer``.

Reductions run between blocks. The prefix tokens (CLS, DeiT's distillation token) are
``Segment.SYSTEM`` and patches ``Segment.VISUAL``, so pruners that target "visual" never
touch CLS. Attention probabilities and keys are recomputed from the previous block's own
projections only at the layers whose pruner asks for them. Merged tokens carry their size
and, as in ToMe, get proportional attention (log-size added to their attention logits).
Outputs keep the dense shape (removed tokens exit with their last hidden state, merged
ones take their target's output).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..state import Segment, TokenState
from ..stats import Stats
from .base import HookedAdapter, attention_probs
from .stream import Stream


@dataclass
class Tower:
    """Where the blocks are and how to read q/k out of one of them."""

    root: nn.Module  # module whose forward is one image batch (opens/closes a call)
    blocks: nn.ModuleList
    prefix: int  # leading non-patch tokens
    kind: str  # "hf" | "open_clip"

    def qk(self, block: nn.Module, hidden: torch.Tensor, need_q: bool = True):
        """(q, k) as (B, heads, n, head_dim) and the softmax scale of ``block``'s attention.

        Only the projections asked for are computed (keys alone for similarity methods).
        """
        B, n, D = hidden.shape
        if self.kind == "hf":
            attn = block.attention
            x = block.layernorm_before(hidden)
            q, k = attn.q_proj(x) if need_q else None, attn.k_proj(x)
            heads, scale = attn.num_attention_heads, attn.scaling
        else:
            mha = block.attn
            x = block.ln_1(hidden)
            w, b = mha.in_proj_weight, mha.in_proj_bias
            part = lambda i: F.linear(x, w[i * D : (i + 1) * D], None if b is None else b[i * D : (i + 1) * D])  # noqa: E731
            q, k = part(0) if need_q else None, part(1)
            heads = mha.num_heads
            scale = (D // heads) ** -0.5
        split = lambda t: None if t is None else t.view(B, n, heads, -1).transpose(1, 2)  # noqa: E731
        return split(q), split(k), scale

    def bias_kwargs(self, bias: torch.Tensor | None, heads: int, n: int) -> dict:
        """Pass an additive (B, 1, 1, n) key bias to a block in the form it takes."""
        if self.kind == "hf":
            return {"attention_mask": bias}
        if bias is None:
            return {"attn_mask": None}
        B = bias.shape[0]
        return {"attn_mask": bias.expand(B, heads, n, n).reshape(B * heads, n, n)}


def find_tower(model: nn.Module) -> Tower | None:
    for m in (model, getattr(model, "visual", None), getattr(model, "base_model", None)):
        if m is None:
            continue
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "layernorm_before") \
                and hasattr(getattr(layers[0], "attention", None), "q_proj"):
            emb = getattr(m, "embeddings", None)
            prefix = 1 + int(getattr(emb, "distillation_token", None) is not None)
            return Tower(m, layers, prefix, "hf")
        blocks = getattr(getattr(m, "transformer", None), "resblocks", None)
        if isinstance(blocks, nn.ModuleList) and hasattr(m, "class_embedding") and len(blocks) \
                and isinstance(getattr(blocks[0], "attn", None), nn.MultiheadAttention):
            return Tower(m, blocks, 1, "open_clip")
    return None


def block_flops(block: nn.Module, n: int, width: int) -> int:
    """Matmul FLOPs of one block over n tokens: every weight matrix plus the two n x n products."""
    weights = sum(p.numel() for name, p in block.named_parameters() if p.dim() == 2 and name.endswith("weight"))
    return 2 * n * weights + 4 * n * n * width


class EncoderAdapter(HookedAdapter):
    family = "ViT encoders: HF ViT / DeiT (ViTModel, ViTForImageClassification, DeiT*) and open_clip VisionTransformer / CLIP"

    @classmethod
    def matches(cls, model) -> bool:
        return find_tower(model) is not None

    def __init__(self, model, pruners, proportional_attention: bool = True):
        self.model = model
        self.tower = find_tower(model)
        if self.tower.kind == "open_clip" and not getattr(self.tower.root.transformer, "batch_first", True):
            raise UnsupportedModelError("open_clip towers with batch_first=False are not supported")
        impl = getattr(getattr(self.tower.root, "config", None), "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise UnsupportedModelError(f"attention implementation {impl!r} is not supported; use sdpa or eager")
        super().__init__(pruners, len(self.tower.blocks))
        self.proportional = proportional_attention

    def attach(self):
        self.hook(self.tower.root.register_forward_pre_hook(self._open_call))
        self.hook(self.tower.root.register_forward_hook(self._close_call, always_call=True))
        last = len(self.tower.blocks) - 1
        for i, block in enumerate(self.tower.blocks):
            self.hook(block.register_forward_pre_hook(self._make_block_hook(i), with_kwargs=True))
            self.hook(block.register_forward_hook(self._make_after_hook(i, i == last)))

    def _open_call(self, module, args):
        self.call = {"stream": None, "stash": None}

    def _close_call(self, module, args, output):
        call, self.call = self.call, None
        if call and call["stream"] is not None:
            self.last_stats = call["stats"]

    def _make_block_hook(self, i):
        def hook(block, args, kwargs):
            call = self.call
            if call is None:
                return None
            hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("q_x"))
            if i == 0:
                self._begin(call, hidden)
            stream, st = call["stream"], call["stream"].state
            st.layer, st.hidden = i, hidden
            st._attention = (lambda q: self._attention(call, q)) if call["stash"] else None
            st._keys = (lambda: self._keys(call)) if call["stash"] else None
            for pruner in self.at.get(i, ()):
                reduction = pruner.select(st)
                if reduction is None or reduction.is_noop(st):
                    continue
                slots, _ = stream.reduce(i, reduction)
                if call["stash"]:
                    li, h = call["stash"]
                    call["stash"] = (li, h.gather(1, slots[..., None].expand(-1, -1, h.shape[-1])))
            call["stash"] = (i, st.hidden)
            n = st.num_slots
            stats = call["stats"]
            stats.tokens_per_layer.append(st.valid.sum(1).tolist())
            width = st.hidden.shape[-1]
            stats.flops += st.batch_size * block_flops(block, n, width)
            stats.dense_flops += st.batch_size * block_flops(block, stream.N, width)
            if not stream.changed:
                return None
            bias = self._key_bias(st)
            heads = self._heads(block)
            args = (st.hidden, *args[1:]) if args else args
            if not args:
                kwargs["hidden_states" if self.tower.kind == "hf" else "q_x"] = st.hidden
            if self.tower.kind == "hf" and len(args) > 1:
                args = (args[0], bias, *args[2:])
            else:
                kwargs.update(self.tower.bias_kwargs(bias, heads, n))
            return args, kwargs

        return hook

    def _make_after_hook(self, i, last):
        def hook(block, args, output):
            call = self.call
            if call is None or call["stream"] is None:
                return None
            out = call["stream"].unskip(i, output)
            out = output if out is None else out
            if last:
                restored = call["stream"].restore(out)
                return out if restored is None else restored
            return out

        return hook

    def _begin(self, call, hidden):
        B, N = hidden.shape[:2]
        dev = hidden.device
        segments = torch.full((B, N), int(Segment.VISUAL), device=dev)
        segments[:, : self.tower.prefix] = int(Segment.SYSTEM)
        valid = torch.ones(B, N, dtype=torch.bool, device=dev)
        index = torch.arange(N, device=dev).expand(B, N)
        call["stream"] = Stream(TokenState(0, len(self.tower.blocks), hidden, index, valid, segments))
        call["stats"] = Stats(dense_tokens=[N] * B)

    def _key_bias(self, st: TokenState) -> torch.Tensor | None:
        """Additive (B, 1, 1, n) attention bias: log token size (ToMe) and -inf for fillers."""
        bias = None
        if self.proportional and st.sizes is not None:
            bias = st.sizes.log()
        if not bool(st.valid.all()):
            hide = torch.zeros(st.valid.shape, device=st.valid.device).masked_fill(~st.valid, float("-inf"))
            bias = hide if bias is None else bias + hide
        return None if bias is None else bias[:, None, None, :].to(st.hidden.dtype)

    def _heads(self, block) -> int:
        return block.attention.num_attention_heads if self.tower.kind == "hf" else block.attn.num_heads

    def _attention(self, call, query_slots):
        li, hidden = call["stash"]
        st = call["stream"].state
        q, k, scale = self.tower.qk(self.tower.blocks[li], hidden)
        if query_slots is not None:
            q = q.gather(2, query_slots[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        bias = self._key_bias(st)
        visible = st.valid[:, None, None, :]
        return attention_probs(q, k, scale, visible, None if bias is None else bias.float().clamp_min(-1e4))

    def _keys(self, call):
        li, hidden = call["stash"]
        return self.tower.qk(self.tower.blocks[li], hidden, need_q=False)[1]

