"""Diffusers U-Nets (``UNet2DConditionModel``, or any pipeline holding one as ``.unet``).

Every reduction is confined to one ``BasicTransformerBlock``, so the feature map the
convolutions see stays whole. Before block i its pruners read a ``TokenState`` of the block's
input: the row-major pixels of the block's map (``Segment.VISUAL``) with ``state.grid`` (h, w),
``state.downsample`` (input size / map size), the call's diffusion ``state.timestep`` and, as
an LVLM gives for its patches, per-token ``state.info("row")`` / ``"col"`` / ``"image"``.
The chosen parts of the block (self-attention ``attn1``, cross-attention ``attn2``,
feed-forward ``ff``; all three unless the reduction names ``parts``) then run on the kept
slots, and each part's output is spread back to every token before its residual add: a
merged token takes its destination's update (ToMe-SD's unmerge), a dropped or skipped one
none (its residual passes that part unchanged).

One U-Net forward (one denoising step) is one call: a fresh state per call and per thread,
so classifier-free guidance batches, several prompts and ``num_images_per_prompt`` need
nothing special, and a row gives the same result alone or in a batch whenever its pruner
decides per row. Methods that read attention get the block's own self-attention, from its
``attn1`` q / k projections of ``norm1(input)`` (layer-norm blocks only), computed only when
asked for; under width pruning, the dense block's (every head: each row's expert keeps a subset
of these same heads, and the tokens do not depend on the code a row is routed to). Stats count
the transformer blocks' matmuls (what reductions change), not convolutions.

Width pruners (``unet-static``, APTP) have ``experts(units)`` instead of token reductions: at
attach their experts' kept heads and feed-forward channels become sliced copies of the block
parts (``Widths``), swapped in while attached (with several experts, each call's rows are
grouped by the expert the pruner's ``route(encoder_hidden_states, mask=, sample=)`` picks, listed
per row in ``stats.codes``) and swapped back
out, the original module objects, on ``remove()``. Token methods compose with them in the same
attachment (``tp.prune(unet, [width_pruner, token_pruner])``): their hooks go on whatever part runs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import TokenPruneError
from ..state import Segment, TokenState
from ..stats import Stats
from .base import HookedAdapter, attention_probs
from .stream import gather_rows

PARTS = ("attn1", "attn2", "ff")


def _diffusers():
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError:
        return None
    return UNet2DConditionModel, BasicTransformerBlock


def find_unet(model) -> nn.Module | None:
    """``model`` itself or its ``.unet`` when that is a diffusers U-Net with transformer blocks."""
    classes = _diffusers()
    if classes is None:
        return None
    unet_cls, block_cls = classes
    unet = model if isinstance(model, unet_cls) else getattr(model, "unet", None)
    if not isinstance(unet, unet_cls) or not any(isinstance(m, block_cls) for m in unet.modules()):
        return None
    return unet


def transformer_blocks(unet) -> list[nn.Module]:
    """The U-Net's ``BasicTransformerBlock``s in the order they run: down blocks, mid block, up blocks."""
    block_cls = _diffusers()[1]
    parts = [getattr(unet, n, None) for n in ("down_blocks", "mid_block", "up_blocks")] + [unet]
    return list(dict.fromkeys(m for p in parts if p is not None for m in p.modules() if isinstance(m, block_cls)))


def _weights(module: nn.Module | None, names=None) -> int:
    """Entries of the 2-D weight matrices under ``module`` (optionally only the named children)."""
    if module is None:
        return 0
    mods = [getattr(module, n, None) for n in names] if names else [module]
    return sum(p.numel() for m in mods if m is not None
               for k, p in m.named_parameters() if p.dim() == 2 and k.endswith("weight"))


class BlockCost:
    """Matmul FLOPs of one block's parts at a token count (2*m*n*k, as torch's flop_counter)."""

    def __init__(self, block):
        a1, a2 = block.attn1, block.attn2
        self.attn1, self.inner1 = _weights(a1), a1.inner_dim
        self.attn2_q = _weights(a2, ["to_q", "to_out"]) if a2 is not None else 0
        self.attn2_kv = _weights(a2, ["to_k", "to_v"]) if a2 is not None else 0
        self.inner2 = a2.inner_dim if a2 is not None else 0
        self.ff = _weights(block.ff)

    def __call__(self, n: dict, context: int) -> int:
        n1, n2, n3 = n["attn1"], n["attn2"], n["ff"]
        return (2 * n1 * self.attn1 + 4 * n1 * n1 * self.inner1
                + 2 * n2 * self.attn2_q + 2 * context * self.attn2_kv + 4 * n2 * context * self.inner2
                + 2 * n3 * self.ff)


@dataclass
class Plan:
    """One block's reduction: gather (and merge) a part's input, spread its output back."""

    state: TokenState
    reduction: object
    slots: torch.Tensor  # (B, m) kept slots
    parts: tuple[str, ...]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        self.state.hidden = x
        return gather_rows(self.reduction.combine(self.state), self.slots)

    def unmerge(self, out: torch.Tensor) -> torch.Tensor:
        B, m, C = out.shape
        full = out.new_zeros(B, self.state.num_slots, C).scatter_(1, self.slots[..., None].expand(B, m, C), out)
        redirect = self.reduction.redirect()
        if redirect is not None:
            keep = self.reduction.keep
            row, src = ((redirect >= 0) & ~keep).nonzero(as_tuple=True)
            dst = redirect[row, src]
            ok = keep[row, dst]
            full[row[ok], src[ok]] = full[row[ok], dst[ok]]
        return full


class UNetAdapter(HookedAdapter):
    family = "diffusers UNet2DConditionModel (or a pipeline with .unet): reductions inside its transformer blocks"
    stack = "unet"
    slices = True

    @classmethod
    def matches(cls, model) -> bool:
        return find_unet(model) is not None

    @classmethod
    def hooked_module(cls, model) -> nn.Module:
        return find_unet(model)

    def __init__(self, model, pruners, **options):
        if options:
            raise TokenPruneError(f"the U-Net adapter takes no options, got {sorted(options)}")
        self.model = model
        self.unet = find_unet(model)
        self.blocks = transformer_blocks(self.unet)  # numbered in the order they run
        self.holders = [m for m in self.unet.modules()
                        if isinstance(getattr(m, "transformer_blocks", None), nn.ModuleList)]
        super().__init__(pruners, len(self.blocks))
        self.dense_costs = [BlockCost(b) for b in self.blocks]
        self.attn1 = [b.attn1 for b in self.blocks]  # the dense self-attention, before any width swap
        self.widths = Widths.build(self, self.blocks, [p for p in pruners if callable(getattr(p, "experts", None))])
        self.costs = self.widths.costs if self.widths else [self.dense_costs]  # per expert, per block

    def attach(self):
        if self.widths:  # sliced parts first: the token hooks below go on whatever runs
            self.widths.swap_in()
        self.hook(self.unet.register_forward_pre_hook(self._open_call, with_kwargs=True))
        self.hook(self.unet.register_forward_hook(self._close_call, always_call=True))
        for holder in self.holders:
            self.hook(holder.register_forward_pre_hook(self._record_grid, with_kwargs=True))
        for i, block in enumerate(self.blocks):
            self.hook(block.register_forward_pre_hook(self._make_block_hook(i), with_kwargs=True))
            self.hook(block.register_forward_hook(self._make_after_hook(i), always_call=True))
            if i in self.at:
                for part in PARTS:
                    module = getattr(block, part, None)
                    if module is not None:
                        self.hook(module.register_forward_pre_hook(self._make_part_hook(i, part), with_kwargs=True))
                        self.hook(module.register_forward_hook(self._make_unmerge_hook(i, part)))

    def detach(self):
        super().detach()
        if self.widths:
            self.widths.swap_out()

    # ---- one call = one U-Net forward ----------------------------------------------------
    def _open_call(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        t = torch.as_tensor(t).flatten().float()
        single = float(t[0]) if len(t) and bool((t == t[0]).all()) else None
        self.call = {"size": tuple(sample.shape[-2:]), "timestep": single, "grid": None, "plan": None,
                     "stats": Stats(dense_tokens=[]), "open": set(), "groups": None}
        if self.widths:
            context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
            self.call["groups"] = self.widths.groups(context, sample.shape[0], mask=kwargs.get("encoder_attention_mask"),
                                                     sample=sample)

    def _close_call(self, module, args, output):
        call, self.call = self.call, None
        if call is not None:
            self.last_stats = call["stats"]

    def _record_grid(self, module, args, kwargs):
        call = self.call
        hidden = args[0] if args else kwargs.get("hidden_states")
        if call is not None and hidden is not None and hidden.dim() == 4:
            call["grid"] = tuple(hidden.shape[-2:])

    def _make_block_hook(self, i):
        def hook(block, args, kwargs):
            call = self.call
            if call is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            B, N = hidden.shape[:2]
            context = kwargs.get("encoder_hidden_states")
            context = context.shape[1] if context is not None and block.attn2 is not None else 0
            counts = dict.fromkeys(PARTS, N)
            plan = self._select(call, i, block, hidden) if i in self.at else None
            call["plan"] = plan
            stats = call["stats"]
            if plan is not None:
                for part in plan.parts:
                    counts[part] = plan.slots.shape[1]
            stats.dense_tokens = [max(d, N) for d in stats.dense_tokens or [N] * B]  # the largest map
            stats.tokens_per_layer.append([counts["attn1"]] * B)
            groups = call["groups"] or [(0, None, B)]
            stats.flops += sum(rows * self.costs[k][i](counts, context) for k, _, rows in groups)
            stats.dense_flops += B * self.dense_costs[i](dict.fromkeys(PARTS, N), context)
            return None

        return hook

    def _make_after_hook(self, i):
        def hook(block, args, output):
            call = self.call
            if call is not None:
                call["plan"] = None
                call["open"].clear()
            return None

        return hook

    def _select(self, call, i, block, hidden) -> Plan | None:
        B, N = hidden.shape[:2]
        dev = hidden.device
        grid, downsample = call["grid"], None
        if grid is not None and grid[0] * grid[1] == N:
            downsample = max(1, round(call["size"][0] / grid[0]))
        else:
            grid = None
        st = TokenState(i, len(self.blocks), hidden, torch.arange(N, device=dev).expand(B, N),
                        torch.ones(B, N, dtype=torch.bool, device=dev),
                        torch.full((B, N), int(Segment.VISUAL), device=dev),
                        grid=grid, downsample=downsample, timestep=call["timestep"])
        if grid is not None:  # the per-token grid facts an LVLM gives too (methods' spatial steps read them)
            pos = torch.arange(N, device=dev)[None]
            st.token_info = {"image": torch.zeros_like(pos), "row": pos // grid[1], "col": pos % grid[1]}
        if getattr(block, "norm_type", None) == "layer_norm":
            st._attention = lambda q: self._attention(i, block, hidden, q)
            st._keys = lambda: self._qk(i, block, hidden, need_q=False)[1]
        plan = None
        for pruner in self.at[i]:
            reduction = pruner.select(st)
            if reduction is None or reduction.is_noop(st):
                continue
            if plan is not None:
                raise TokenPruneError(f"two pruners reduce U-Net block {i} in one call; give them different blocks")
            slots, slot_valid = reduction.plan(st)
            if not bool(slot_valid.all()):
                raise TokenPruneError(f"{pruner.name}: rows keep different token counts at U-Net block {i}; "
                                      "a U-Net block needs the same count in every row")
            parts = PARTS if reduction.parts is None else tuple(reduction.parts)
            unknown = set(parts) - set(PARTS)
            if unknown:
                raise TokenPruneError(f"{pruner.name}: unknown block parts {sorted(unknown)}; U-Net blocks have {PARTS}")
            if "ff" in parts and block._chunk_size is not None:
                raise TokenPruneError("reducing the feed-forward of a block with feed-forward chunking is not supported")
            parts = tuple(p for p in parts if getattr(block, p, None) is not None)
            plan = Plan(st, reduction, slots, parts)
        return plan

    # ---- parts: merge in, unmerge out ----------------------------------------------------
    def _make_part_hook(self, i, part):
        def hook(module, args, kwargs):
            call = self.call
            plan = call and call["plan"]
            if not plan or part not in plan.parts:
                return None
            if part == "attn1" and kwargs.get("attention_mask") is not None:
                raise TokenPruneError("U-Net self-attention with an attention mask cannot run on reduced tokens")
            call["open"].add(part)
            if args:
                return (plan.merge(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = plan.merge(kwargs["hidden_states"])
            return args, kwargs

        return hook

    def _make_unmerge_hook(self, i, part):
        def hook(module, args, output):
            call = self.call
            if call is None or part not in call["open"]:
                return None
            call["open"].discard(part)
            return call["plan"].unmerge(output)

        return hook

    # ---- attention of the block itself, for methods that ask ------------------------------
    def _qk(self, i, block, hidden, need_q=True):
        """q / k of the dense block's self-attention, also under width pruning: an expert's
        kept heads have these same projections, and every row gets the same heads whatever
        expert it is routed to (a ``_Routed`` / ``_Removed`` attn1 has no projections of its own)."""
        attn = self.attn1[i]
        x = block.norm1(hidden)
        B, n, _ = x.shape

        def split(t, norm):
            t = t.view(B, n, attn.heads, -1).transpose(1, 2)
            return t if norm is None else norm(t)

        q = split(attn.to_q(x), attn.norm_q) if need_q else None
        return q, split(attn.to_k(x), attn.norm_k)

    def _attention(self, i, block, hidden, query_slots):
        q, k = self._qk(i, block, hidden)
        if query_slots is not None:
            q = q.gather(2, query_slots[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        visible = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=k.device)
        return attention_probs(q, k, self.attn1[i].scale, visible)


# ---- structural pruning: a smaller copy of the U-Net (the experts of APTP-style routing) ------
def _sub_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight if rows is None else lin.weight[rows]
    w = w if cols is None else w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if lin.bias is not None:
            out.bias.copy_(lin.bias if rows is None else lin.bias[rows])
    return out


def _keep_heads(attn, keep: torch.Tensor):
    d = attn.inner_dim // attn.heads
    idx = (keep.nonzero().flatten()[:, None] * d + torch.arange(d)).flatten()
    attn.to_q = _sub_linear(attn.to_q, rows=idx)
    attn.to_k = _sub_linear(attn.to_k, rows=idx)
    attn.to_v = _sub_linear(attn.to_v, rows=idx)
    attn.to_out[0] = _sub_linear(attn.to_out[0], cols=idx)
    attn.heads = int(keep.sum())
    attn.inner_dim = attn.inner_kv_dim = len(idx)


def _keep_channels(ff, keep: torch.Tensor):
    act, idx = ff.net[0], keep.nonzero().flatten()
    inner = ff.net[2].in_features
    gated = act.proj.out_features == 2 * inner  # GEGLU / SwiGLU: value and gate halves
    act.proj = _sub_linear(act.proj, rows=torch.cat([idx, idx + inner]) if gated else idx)
    ff.net[2] = _sub_linear(ff.net[2], cols=idx)


def slice_unet(unet, heads: dict | None = None, channels: dict | None = None):
    """A smaller copy of ``unet`` (the original is untouched) keeping, in transformer block i,
    the attention heads ``heads[i]`` (bool per head, in attn1 and attn2) and the feed-forward
    channels ``channels[i]`` (bool per hidden channel).

    Its output equals the full U-Net with the dropped heads' and channels' contributions gated
    to zero, at the smaller model's cost: what a width code of structural pruning (APTP) has to
    become for real speed, since gates that multiply by zero save nothing.
    """
    import copy

    heads, channels = heads or {}, channels or {}
    blocks = transformer_blocks(unet)
    for name, masks in (("heads", heads), ("channels", channels)):
        for i, keep in masks.items():
            if not 0 <= i < len(blocks):
                raise TokenPruneError(f"{name}: block {i} is beyond the model, which has {len(blocks)} transformer blocks")
            block = blocks[i]
            size = block.attn1.heads if name == "heads" else block.ff.net[2].in_features
            keep = torch.as_tensor(keep)
            if keep.dtype != torch.bool or keep.shape != (size,) or not bool(keep.any()):
                raise TokenPruneError(f"{name}[{i}] must be a bool mask of {size} entries keeping at least one")
            if name == "heads" and block.attn2 is not None and block.attn2.heads != size:
                raise TokenPruneError(f"block {i}: attn1 and attn2 have different head counts")
    expert = copy.deepcopy(unet)
    blocks = transformer_blocks(expert)
    for i, keep in heads.items():
        for attn in (blocks[i].attn1, blocks[i].attn2):
            if attn is not None:
                _keep_heads(attn, torch.as_tensor(keep))
    for i, keep in channels.items():
        _keep_channels(blocks[i].ff, torch.as_tensor(keep))
    return expert


# ---- width pruning: sliced parts swapped in while attached (unet-static, APTP's experts) -------
def width_units(blocks) -> list[dict]:
    """What a width pruner's ``experts`` reads, free of model classes: per transformer block,
    ``"heads"``: weight views whose first dim is the attention head (its to_q / to_k / to_v rows
    and to_out columns, attn1 then attn2), ``"channels"``: views whose first dim is the
    feed-forward hidden channel (its input-projection rows, value and gate, and output column)."""
    units = []
    for b in blocks:
        heads = []
        for attn in (b.attn1, b.attn2):
            if attn is not None:
                for lin in (attn.to_q, attn.to_k, attn.to_v):
                    heads.append(lin.weight.detach().view(attn.heads, -1, lin.in_features))
                out = attn.to_out[0].weight.detach()
                heads.append(out.view(out.shape[0], attn.heads, -1).transpose(0, 1))
        inner = b.ff.net[2].in_features
        proj = b.ff.net[0].proj.weight.detach()
        channels = [proj.view(-1, inner, proj.shape[1]).transpose(0, 1), b.ff.net[2].weight.detach().t()]
        units.append({"heads": heads, "channels": channels})
    return units


class _Removed(nn.Module):
    """A part an expert drops entirely (depth pruning): it adds nothing to the residual."""

    inner_dim = 0

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class _Routed(nn.Module):
    """One sliced copy of a block part per expert: each group of a call's rows runs through its own."""

    def __init__(self, copies, widths):
        super().__init__()
        self.copies = nn.ModuleList(copies)
        self._widths = [widths]  # a list, so it is not registered as a submodule

    def forward(self, hidden_states, *args, **kwargs):
        groups = self._widths[0].current_groups()
        if len(groups) == 1:
            return self.copies[groups[0][0]](hidden_states, *args, **kwargs)
        B = hidden_states.shape[0]
        outs = []
        for k, rows, _ in groups:
            def pick(t, rows=rows):
                return t[rows] if torch.is_tensor(t) and t.dim() and t.shape[0] == B else t

            outs.append(self.copies[k](pick(hidden_states), *map(pick, args), **{n: pick(v) for n, v in kwargs.items()}))
        if all(isinstance(rows, slice) for _, rows, _ in groups):  # groups in row order: one concatenation
            return torch.cat(outs)
        out = outs[0].new_empty((B, *outs[0].shape[1:]))
        for (_, rows, _), o in zip(groups, outs):
            out[rows] = o
        return out


def _sliced(module, part: str, keep: torch.Tensor | None):
    """``module`` at the kept heads / channels: itself when all are kept, a copy sharing no state
    that it could change (its weights are never written), or ``_Removed`` when none are."""
    if keep is None or bool(keep.all()):
        return module
    if not bool(keep.any()):
        return _Removed()
    new = copy.deepcopy(module, memo={id(p): p for p in module.parameters()})  # sliced below, not copied twice
    (_keep_channels if part == "ff" else _keep_heads)(new, keep)
    return new


class Widths:
    """The experts of a width pruner as sliced block parts, swapped into the U-Net while attached.

    One expert: each sliced part replaces the full one. Several: each part becomes a ``_Routed``
    holding every expert's copy (shared where two experts keep the same units), and each call's
    rows are grouped by the expert the pruner's ``route`` picks. ``swap_out`` puts the original
    module objects back, so removal is exact.
    """

    def __init__(self, adapter, pruner, blocks, experts):
        self.adapter, self.pruner, self.blocks = adapter, pruner, blocks
        shared = {}
        self.parts = []  # [expert][block] -> {part: module or None}
        for e in experts:
            per_block = []
            for i, b in enumerate(blocks):
                d = {}
                for part in PARTS:
                    module = getattr(b, part, None)
                    keep = e["channels" if part == "ff" else "heads"].get(i)
                    key = (i, part, None if keep is None else tuple(keep.tolist()))
                    if module is not None and key not in shared:
                        shared[key] = _sliced(module, part, keep)
                    d[part] = shared[key] if module is not None else None
                per_block.append(d)
            self.parts.append(per_block)
        self.costs = [[BlockCost(SimpleNamespace(**d)) for d in per_block] for per_block in self.parts]
        self.swapped = []  # (block, part, original module)

    @classmethod
    def build(cls, adapter, blocks, pruners) -> "Widths | None":
        """Ask the width pruner for its experts and slice them (the model is not touched yet)."""
        if not pruners:
            return None
        if len(pruners) > 1:
            raise TokenPruneError(f"one width-pruning method per U-Net, got {[p.name for p in pruners]}")
        pruner = pruners[0]
        experts = pruner.experts(width_units(blocks))
        if not isinstance(experts, (list, tuple)) or not experts:
            raise TokenPruneError(f"{pruner.name}: experts() must return a non-empty list of expert dicts")
        if len(experts) > 1 and not callable(getattr(pruner, "route", None)):
            raise TokenPruneError(f"{pruner.name}: {len(experts)} experts but no route() to pick one per row")
        checked = []
        for e in experts:
            unknown = set(e) - {"heads", "channels"}
            if unknown:
                raise TokenPruneError(f"{pruner.name}: an expert has unknown keys {sorted(unknown)}; use 'heads' / 'channels'")
            out = {}
            for name in ("heads", "channels"):
                out[name] = {}
                for i, keep in (e.get(name) or {}).items():
                    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks):
                        raise TokenPruneError(f"{pruner.name}: {name} of block {i!r}, but the U-Net has "
                                              f"{len(blocks)} transformer blocks (0..{len(blocks) - 1})")
                    b = blocks[i]
                    size = b.attn1.heads if name == "heads" else b.ff.net[2].in_features
                    keep = torch.as_tensor(keep)
                    if keep.dtype != torch.bool or keep.shape != (size,):
                        raise TokenPruneError(f"{pruner.name}: {name}[{i}] must be a bool mask of {size} entries")
                    if name == "heads" and b.attn2 is not None and b.attn2.heads != size:
                        raise TokenPruneError(f"block {i}: attn1 and attn2 have different head counts")
                    out[name][i] = keep.cpu()
            checked.append(out)
        return cls(adapter, pruner, blocks, checked)

    def swap_in(self):
        for i, b in enumerate(self.blocks):
            for part in PARTS:
                original = getattr(b, part, None)
                copies = [per_block[i][part] for per_block in self.parts]
                if original is None or all(c is original for c in copies):
                    continue
                setattr(b, part, copies[0] if len(copies) == 1 else _Routed(copies, self))
                self.swapped.append((b, part, original))

    def swap_out(self):
        for b, part, original in reversed(self.swapped):
            setattr(b, part, original)
        self.swapped.clear()
        self.parts = []  # an adapter attaches once: free the sliced copies now, not at the next gc cycle

    def groups(self, context, batch: int, mask=None, sample=None):
        """[(expert, rows, count)] of one call: rows a slice where the group is contiguous.

        ``route(context, mask=, sample=)`` sees the call's ``encoder_hidden_states``, its
        ``encoder_attention_mask`` and noisy ``sample`` (which pairs a guidance batch's rows);
        the experts it picks go to the call's ``stats.codes``."""
        if len(self.parts) == 1:
            return None
        if context is None:
            raise TokenPruneError(f"{self.pruner.name} routes by encoder_hidden_states, which this call lacks")
        codes = torch.as_tensor(self.pruner.route(context, mask=mask, sample=sample))
        if codes.shape != (batch,) or codes.dtype.is_floating_point or bool((codes < 0).any()) \
                or bool((codes >= len(self.parts)).any()):
            raise TokenPruneError(f"{self.pruner.name}: route() must give one expert index in "
                                  f"[0, {len(self.parts)}) per row ({batch} rows), got {codes.tolist()}")
        if self.adapter.call is not None:
            self.adapter.call["stats"].codes = codes.tolist()
        out = []
        for k in codes.unique().tolist():
            rows = (codes == k).nonzero().flatten()
            first, last = int(rows[0]), int(rows[-1])
            out.append((k, slice(first, last + 1) if last - first + 1 == len(rows) else rows.to(context.device), len(rows)))
        out.sort(key=lambda g: g[1].start if isinstance(g[1], slice) else int(g[1][0]))
        return out

    def current_groups(self):
        call = self.adapter.call
        if call is None:
            raise TokenPruneError("a routed U-Net part ran outside a U-Net call")
        return call["groups"] or [(0, slice(None), None)]
