"""ViT-style encoders: HF ViT / DeiT, HF CLIP vision towers and the open_clip ``VisionTransformer``.

Reductions run between blocks, or inside a block between attention and MLP for pruners
whose ``inside_block`` is true (ToMe's placement: the block's attention runs on all its
tokens, its MLP and every later block on the reduced set; ``stats.tokens_per_layer[i]`` then
counts what block i's MLP ran on). The prefix tokens (CLS, DeiT's distillation token) are
``Segment.SYSTEM`` and patches ``Segment.VISUAL``, so pruners that target "visual" never
touch CLS. A pruner before layer i reads the attention probabilities and keys of block i-1,
one inside block i those of block i itself, only if it asks for them: HF blocks' q / k
projections are captured while the block runs (no second projection; only softmax(q k^T) is
computed again, since SDPA never materialises it), open_clip's are recomputed from the
block's input. Merged tokens carry their size and, as in ToMe, get proportional attention
(log-size added to their attention logits).

Inside a block the merge is three hooks, no forked forward: the post-attention norm's
pre-hook reduces the residual stream h (n slots) to h' (m slots), so norm and MLP run on m;
the MLP branch's last module hands the block a zero update at n slots for its own residual
add, and the block's forward hook returns h' + MLP(norm(h')), which is ToMe's block.
Outputs keep the dense shape (removed tokens exit with their last hidden state, merged
ones take their target's output). When a call records hidden states (HF
``output_hidden_states``, which LLaVA sets to read ``hidden_states[vision_feature_layer]``),
every block's output is given back at the dense length too, because transformers v5
records them with forward hooks on the blocks; the next block takes its slots back out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TokenPruneError, UnsupportedModelError
from ..pruner import ModelFacts
from ..state import Segment, TokenState
from ..stats import Stats
from .base import HookedAdapter, attention_probs
from .stream import Stream, gather_rows


# kind -> block parts: attention, its norm, the post-attention norm (its input is the residual
# stream between attention and MLP), the MLP, and the MLP branch's last module (its output is
# what the block adds to the residual stream)
PARTS = {
    "hf": ("attention", "layernorm_before", "layernorm_after", "mlp", "mlp"),  # ViT / DeiT layers
    "clip": ("self_attn", "layer_norm1", "layer_norm2", "mlp", "mlp"),  # HF CLIPEncoderLayer
    "open_clip": ("attn", "ln_1", "ln_2", "mlp", "ls_2"),  # ResidualAttentionBlock
}


@dataclass
class Tower:
    """Where the blocks are and how to read q/k out of one of them."""

    root: nn.Module  # module whose forward is one image batch (opens/closes a call)
    blocks: nn.ModuleList
    prefix: int  # leading non-patch tokens
    kind: str  # a key of PARTS

    def attn(self, block: nn.Module) -> nn.Module:
        return getattr(block, PARTS[self.kind][0])

    def norm1(self, block: nn.Module) -> nn.Module:
        return getattr(block, PARTS[self.kind][1])

    def norm2(self, block: nn.Module) -> nn.Module:
        return getattr(block, PARTS[self.kind][2])

    def mlp(self, block: nn.Module) -> nn.Module:
        return getattr(block, PARTS[self.kind][3])

    def branch_end(self, block: nn.Module) -> nn.Module:
        return getattr(block, PARTS[self.kind][4])

    def heads_and_scale(self, block: nn.Module) -> tuple[int, float]:
        attn = self.attn(block)
        if self.kind == "hf":
            return attn.num_attention_heads, attn.scaling
        if self.kind == "clip":
            return attn.num_heads, attn.scale
        return attn.num_heads, (attn.embed_dim // attn.num_heads) ** -0.5

    def projections(self, block: nn.Module) -> dict[str, nn.Module]:
        """The q / k projection modules whose outputs can be captured while the block runs.

        open_clip's ``nn.MultiheadAttention`` projects inside one functional call, so there
        is nothing to capture and :meth:`project` recomputes.
        """
        if self.kind == "open_clip":
            return {}
        attn = self.attn(block)
        return {"q": attn.q_proj, "k": attn.k_proj}

    def project(self, block: nn.Module, hidden: torch.Tensor, need_q: bool = True):
        """Recompute ``block``'s (q, k) projections, (B, n, D) each, from its input ``hidden``.

        Only the projections asked for are computed (keys alone for similarity methods).
        """
        D = hidden.shape[-1]
        attn, x = self.attn(block), self.norm1(block)(hidden)
        if self.kind != "open_clip":
            return (attn.q_proj(x) if need_q else None), attn.k_proj(x)
        w, b = attn.in_proj_weight, attn.in_proj_bias
        part = lambda i: F.linear(x, w[i * D : (i + 1) * D], None if b is None else b[i * D : (i + 1) * D])  # noqa: E731
        return (part(0) if need_q else None), part(1)

    def bias_kwargs(self, bias: torch.Tensor | None, heads: int, n: int) -> dict:
        """Pass an additive (B, 1, 1, n) key bias to a block in the form it takes."""
        if self.kind != "open_clip":
            return {"attention_mask": bias}
        if bias is None:
            return {"attn_mask": None}
        B = bias.shape[0]
        return {"attn_mask": bias.expand(B, heads, n, n).reshape(B * heads, n, n)}


def find_tower(model: nn.Module) -> Tower | None:
    for m in (model, getattr(model, "visual", None), getattr(model, "base_model", None),
              getattr(model, "vision_model", None)):
        if m is None:
            continue
        layers = getattr(getattr(m, "encoder", None), "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(m, "pre_layrnorm") \
                and hasattr(layers[0], "layer_norm1") and hasattr(getattr(layers[0], "self_attn", None), "q_proj"):
            return Tower(m, layers, 1, "clip")  # CLIPVisionModel: CLS + patches
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


def _weights(module: nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if p.dim() == 2 and name.endswith("weight"))


def block_flops(block: nn.Module, n: int, width: int, mlp: nn.Module | None = None, mlp_tokens: int | None = None,
                weights: tuple[int, int] | None = None) -> int:
    """Matmul FLOPs of one block over n tokens: every weight matrix plus the two n x n products.

    With ``mlp`` (the block's MLP module) and ``mlp_tokens``, the MLP half runs on that many
    tokens instead (a merge between attention and MLP). ``weights``: the (block, MLP) weight
    counts, if already known.
    """
    total, mlp_weights = weights or (_weights(block), _weights(mlp) if mlp is not None else 0)
    m = n if mlp_tokens is None else mlp_tokens
    return 2 * n * (total - mlp_weights) + 4 * n * n * width + 2 * m * mlp_weights


class EncoderAdapter(HookedAdapter):
    stack = "vision"
    family = ("ViT encoders: HF ViT / DeiT (ViTModel, ViTForImageClassification, DeiT*), HF CLIPVisionModel "
              "and open_clip VisionTransformer / CLIP")

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
        block = self.tower.blocks[0]
        heads = self.tower.heads_and_scale(block)[0]
        width = getattr(self.tower.norm1(block), "normalized_shape", (None,))[-1]
        super().__init__(pruners, ModelFacts(num_layers=len(self.tower.blocks), stack=self.stack, hidden_size=width,
                                             num_heads=heads, num_kv_heads=heads,
                                             head_dim=width // heads if width and heads else None))
        self.proportional = proportional_attention
        self.weights = [(_weights(b), _weights(self.tower.mlp(b))) for b in self.tower.blocks]  # for FLOPs
        self.inside: dict[int, list] = {}  # block -> pruners that reduce between its attention and MLP
        for layer, at in list(self.at.items()):
            self.inside[layer] = [p for p in at if getattr(p, "inside_block", False)]
            self.at[layer] = [p for p in at if not getattr(p, "inside_block", False)]

    def attach(self):
        self.hook(self.tower.root.register_forward_pre_hook(self._open_call, with_kwargs=True))
        self.hook(self.tower.root.register_forward_hook(self._close_call, always_call=True))
        last = len(self.tower.blocks) - 1
        for i, block in enumerate(self.tower.blocks):
            self.hook(block.register_forward_pre_hook(self._make_block_hook(i), with_kwargs=True))
            # first of the block's forward hooks: HF's hidden-state recorders then see what we return
            self.hook(block.register_forward_hook(self._make_after_hook(i, i == last), prepend=True))
            if self.inside.get(i):
                self.hook(self.tower.norm2(block).register_forward_pre_hook(self._make_mid_hook(i)))
                self.hook(self.tower.branch_end(block).register_forward_hook(self._make_branch_hook(i)))
            if self.at.get(i + 1) or self.inside.get(i):  # pruners that may read this block's q / k
                for name, proj in self.tower.projections(block).items():
                    self.hook(proj.register_forward_hook(self._make_capture(name)))

    def _open_call(self, module, args, kwargs):
        # as HF's capture_outputs decides: the call's flag, else the config's
        config = getattr(module, "config", None)
        record = kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", None))
        self.call = {"stream": None, "stash": None, "record": bool(record), "dense_out": False, "mid": None}

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
            if call["dense_out"]:  # the previous block gave its output back at the dense length
                hidden, call["dense_out"] = gather_rows(hidden, st.index), False
            st.layer, st.hidden = i, hidden
            self._select(call, i, self.at.get(i, ()))
            call["stash"] = {"layer": i, "hidden": st.hidden, "q": None, "k": None, "version": stream.version,
                             "pending": []}
            n = st.num_slots
            call["attn_slots"] = n  # the MLP half is counted after the block (an inside merge may shrink it)
            stats = call["stats"]
            stats.tokens_per_layer.append(st.valid.sum(1).tolist())
            width = st.hidden.shape[-1]
            stats.dense_flops += st.batch_size * block_flops(block, stream.N, width, weights=self.weights[i])
            if not stream.changed:
                return None
            bias = self._key_bias(st)
            heads = self.tower.heads_and_scale(block)[0]
            args = (st.hidden, *args[1:]) if args else args
            if not args:
                kwargs["q_x" if self.tower.kind == "open_clip" else "hidden_states"] = st.hidden
            if self.tower.kind != "open_clip" and len(args) > 1:
                args = (args[0], bias, *args[2:])
            else:
                kwargs.update(self.tower.bias_kwargs(bias, heads, n))
            return args, kwargs

        return hook

    def _select(self, call, i, pruners, inside: bool = False) -> bool:
        """Ask ``pruners`` at the current point of layer ``i`` and apply their reductions."""
        stream, st, stash = call["stream"], call["stream"].state, call["stash"]
        current = stash is not None and stash["version"] == stream.version  # no skip in between
        st._attention = (lambda q: self._attention(call, q)) if current else None
        st._keys = (lambda: self._keys(call)) if current else None
        changed = False
        for pruner in pruners:
            reduction = pruner.select(st)
            if reduction is None or reduction.is_noop(st):
                continue
            if inside and not reduction.persistent:
                raise TokenPruneError(f"{pruner.name}: a {type(reduction).__name__} cannot start inside block {i}")
            slots, _ = stream.reduce(i, reduction)
            changed = True
            if current:  # a later reader of the same block sees the kept slots (gathered when read)
                stash["pending"].append(slots)
                stash["version"] = stream.version
        return changed

    def _make_mid_hook(self, i):
        def hook(norm, args):
            call = self.call
            if call is None or call["stream"] is None:
                return None
            stream, st = call["stream"], call["stream"].state
            if stream.skip is not None:
                raise TokenPruneError(f"layer {i}: tokens skipping block {i} cannot be merged inside it")
            n = st.num_slots
            st.hidden = args[0]  # the residual stream after attention, (B, n, D)
            if not self._select(call, i, self.inside[i], inside=True):
                return None
            call["mid"] = (i, n)
            call["stats"].tokens_per_layer[-1] = st.valid.sum(1).tolist()
            return (st.hidden, *args[1:])

        return hook

    def _make_branch_hook(self, i):
        def hook(module, args, output):
            call = self.call
            if call is None or call["mid"] is None or call["mid"][0] != i:
                return None
            call["branch"] = output  # (B, m, D): the MLP update of the kept slots
            B, _, D = output.shape
            return output.new_zeros(()).expand(B, call["mid"][1], D)  # the block's own residual add at n slots

        return hook

    def _make_after_hook(self, i, last):
        def hook(block, args, output):
            call = self.call
            if call is None or call["stream"] is None:
                return None
            st = call["stream"].state
            if call["mid"] is not None:  # merged inside this block: ToMe's h' + MLP(norm(h'))
                output = st.hidden + call.pop("branch")
                call["mid"] = None
            call["stats"].flops += st.batch_size * block_flops(block, call["attn_slots"], st.hidden.shape[-1],
                                                               mlp_tokens=st.num_slots, weights=self.weights[i])
            out = call["stream"].unskip(i, output)
            out = output if out is None else out
            if last or call["record"]:
                restored = call["stream"].restore(out)
                if restored is not None and not last:
                    call["dense_out"] = True
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

    def _make_capture(self, name):
        def hook(module, args, output):
            call = self.call
            if call is not None and call["stash"] is not None:
                call["stash"][name] = output

        return hook

    def _qk(self, call, need_q: bool = True):
        """The previous block's (q, k) as (B, heads, n, head_dim): captured while it ran, else recomputed."""
        stash = call["stash"]
        for slots in stash["pending"]:
            for key in ("hidden", "q", "k"):
                if stash[key] is not None:
                    stash[key] = gather_rows(stash[key], slots)
        stash["pending"].clear()
        block = self.tower.blocks[stash["layer"]]
        q, k = stash["q"], stash["k"]
        if k is None or (need_q and q is None):
            q, k = self.tower.project(block, stash["hidden"], need_q)
        heads, scale = self.tower.heads_and_scale(block)
        B, n = k.shape[:2]
        split = lambda t: t.view(B, n, heads, -1).transpose(1, 2)  # noqa: E731
        return (split(q) if need_q else None), split(k), scale

    def _attention(self, call, query_slots):
        st = call["stream"].state
        q, k, scale = self._qk(call)
        if query_slots is not None:
            q = q.gather(2, query_slots[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        bias = self._key_bias(st)
        visible = st.valid[:, None, None, :]
        return attention_probs(q, k, scale, visible, None if bias is None else bias.float().clamp_min(-1e4))

    def _keys(self, call):
        return self._qk(call, need_q=False)[1]

