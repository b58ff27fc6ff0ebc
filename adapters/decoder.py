"""Llama-family decoders (Llama/SmolLM2, Qwen2/3, Mistral, ...): reduce tokens between layers.

Transformers v5 builds one causal mask and one rotary embedding per forward and hands the
same objects to every decoder layer. This adapter hooks in without forking model code:

- base-model pre-hook: opens a *call* (thread-local) and finds its *request*: the state of
  one prompt's life (prefill + decode steps), bound to the KV cache object it fills;
- layer pre-hooks: at prefill, ask the pruners scheduled before this layer and apply their
  reduction to the hidden states and to the kwargs every later layer gets (mask rows and
  columns, rotary cos/sin, position ids); at decode, crop the mask's key axis to the keys
  this layer's cache holds, and ask routers (``Pruner.routes_decode``) about the new tokens:
  those that skip the block are left out of its run, so they leave no key / value in its
  cache (``key_index`` records what each layer's cache holds, per row);
- layer post-hooks: put tokens that skipped the block back. A block no token runs (ShortGPT's
  removed blocks, a decode step whose token skips) runs "hollow": a hook cannot cancel the
  call, so its linear layers get an empty input and it writes no cache (``_hollow``);
- q / k projection hooks (layers before a pruner): keep the layer's own projections, which
  attention scores for the next layer's pruners reuse;
- final-norm pre-hook: scatter kept tokens back to full length, so outputs keep the dense
  shape (a removed token's output is its hidden state when it left, a merged one takes
  the output of the token it joined).

Kept tokens keep their original positions unless ``renumber_positions=True``.

Before layer 0 (pruners that read no previous layer, ``Pruner.reads_previous_layer``): the
reduction runs in layer 0's pre-hook, so every layer, layer 0 included, runs on and caches
only the kept tokens (the embedding lookup, HF's mask and rotary tables stay full length,
which costs no matmul). A token removed there outputs its input embedding. HF derives what
a decode step needs from layer 0's cache length (positions when none are passed, the mask's
key count), so while layer 0's cache is pruned the base pre-hook passes the dense positions
and a 4-D mask over the dense key positions, which each layer cuts to the keys it holds.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import TokenPruneError, UnsupportedModelError
from ..pruner import ModelFacts
from ..state import Segment, TokenState
from ..stats import Stats, decoder_layer_flops, kv_bytes_per_token
from .base import HookedAdapter, attention_mass, attention_probs
from .stream import Stream, expand_rows, flat_rows, gather_rows, scatter_rows

SUPPORTED_ATTENTION = ("sdpa", "eager")
MASS_ROWS = 256  # query rows per chunk of ``_prefill_mass``


def find_decoder(model: nn.Module) -> nn.Module | None:
    """The module owning ``layers``, ``norm`` and ``rotary_emb`` (e.g. ``LlamaModel``)."""
    inner = getattr(model, "model", None)
    for m in (model, inner, getattr(inner, "language_model", None)):
        layers = getattr(m, "layers", None)
        if (
            isinstance(layers, nn.ModuleList)
            and len(layers) > 0
            and hasattr(m, "norm")
            and hasattr(m, "rotary_emb")
            and hasattr(getattr(layers[0], "self_attn", None), "q_proj")
            and hasattr(layers[0], "input_layernorm")
        ):
            return m
    return None


def mask_keys(mask: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Hide invalid keys (padding, fillers) in a bool (SDPA) or additive (eager) 4D mask."""
    hide = ~key_valid[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


CACHE_RULE = ("a KV cache filled under a pruner can only be continued by the attachment that filled it "
              "(same handle, before remove()); start a new cache instead")


def check_foreign_cache(cache, request) -> None:
    """Refuse a cache tokenprune cannot continue, before the model runs on it.

    A cache this attachment filled but whose length changed since, or one it did not fill
    whose layers hold different key counts (filled under another pruner), would otherwise fail
    deep inside attention, or silently attend to the wrong keys.
    """
    if request is not None:
        raise TokenPruneError(f"this KV cache holds {cache.get_seq_length()} tokens, tokenprune left it at "
                              f"{request.held(0)}: it was cropped or extended outside tokenprune; {CACHE_RULE}")
    counts = [layer.get_seq_length() for layer in getattr(cache, "layers", ()) if hasattr(layer, "get_seq_length")]
    if len(set(counts)) > 1:
        raise TokenPruneError(f"this KV cache was filled under another pruner (its layers hold {counts} keys); "
                              + CACHE_RULE)
    if getattr(cache, "tokenprune_before_layer0", False):  # equal counts, all pruned: marked at its prefill
        raise TokenPruneError("this KV cache was filled under another pruner (pruned before layer 0), or is a copy "
                              "of one; " + CACHE_RULE)


def check_cache_rows(request, args, kwargs) -> None:
    """A pruned cache continues the rows it was filled with (each row kept its own keys)."""
    rows = next(iter(request.key_index.values())).shape[0] if request.key_index else None
    x = next((t for t in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if torch.is_tensor(t)), None)
    if rows is not None and x is not None and x.shape[0] != rows:
        raise TokenPruneError(f"this call has {x.shape[0]} rows but its pruned KV cache holds {rows}: "
                              "a pruned cache can only be continued with the rows it was filled with")


def retire_cache(cache) -> None:
    """At ``remove()``: make the pruned caches this attachment filled refuse further use.

    Without hooks the dense model would attend to a pruned layer's keys at the wrong positions
    (silently with SDPA and one query); this instance attribute turns that into the rule.
    """
    cache.update = refuse_retired_cache  # a module-level function: the cache still pickles


def refuse_retired_cache(*args, **kwargs):
    raise TokenPruneError("this KV cache was filled under a pruner that has been removed; " + CACHE_RULE)


def key_heads(heads, num_heads: int, num_kv_heads: int) -> list[int]:
    """The key / value head each of the query ``heads`` reads (grouped-query attention)."""
    group = num_heads // num_kv_heads
    return [h // group for h in heads]


def contiguous_run(heads) -> bool:
    return list(heads) == list(range(heads[0], heads[0] + len(heads)))


def pick_heads(t: torch.Tensor, heads, head_dim: int) -> torch.Tensor:
    """``(B, m, len(heads), head_dim)``: the columns of ``heads`` in a ``(B, m, heads * head_dim)``
    projection; a view when they are one run (e.g. a single head)."""
    t = t.view(*t.shape[:2], -1, head_dim)
    if contiguous_run(heads):
        return t[:, :, heads[0]: heads[0] + len(heads)]
    return t[:, :, list(heads)]


def project_heads(proj: nn.Module, x: torch.Tensor, heads, head_dim: int) -> torch.Tensor:
    """``proj(x)``'s columns of ``heads`` only, ``(..., len(heads) * head_dim)``: a plain ``nn.Linear``
    multiplies by those weight rows alone; another module (e.g. a LoRA layer) runs whole."""
    if type(proj) is not nn.Linear:
        y = proj(x)
        return pick_heads(y.reshape(1, -1, y.shape[-1]), heads, head_dim).reshape(*y.shape[:-1], -1)
    if contiguous_run(heads):
        rows = slice(heads[0] * head_dim, (heads[0] + len(heads)) * head_dim)
    else:
        rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]).to(proj.weight.device)
    return nn.functional.linear(x, proj.weight[rows], None if proj.bias is None else proj.bias[rows])


class CacheOp:
    """``reorder_cache`` / ``batch_repeat_interleave`` / ``batch_select_indices`` / ``crop`` of a
    cache filled under pruning (instance attributes, installed at its prefill).

    HF moves a cache's rows between steps: beam search reorders them; contrastive search repeats
    each row ``top_k`` times, runs the candidates, then keeps the chosen one per prompt. Pruned rows
    hold different keys (each row kept its own tokens; once generated tokens route by content, the
    beams or candidates of one prompt differ too), so the request's per-row key bookkeeping moves
    with the rows. Assisted and prompt-lookup decoding ``crop`` the rejected candidates' keys: a
    pruned layer holds them in its own columns, not the last ``n`` (``Request.crop``).
    """

    OPS = ("reorder_cache", "batch_repeat_interleave", "batch_select_indices", "crop")

    def __init__(self, cache, request, op: str):
        self.cache, self.request, self.op = weakref.ref(cache), weakref.ref(request), op

    def __call__(self, arg):
        cache, request = self.cache(), self.request()
        if self.op == "crop" and request is not None:
            request.crop(cache, arg)
            return
        getattr(type(cache), self.op)(cache, arg)
        if request is not None:
            request.follow(self.op, arg)

    def __reduce__(self):  # a pickled copy cannot be continued by tokenprune anyway
        return (getattr, (sys.modules[__name__], "refuse_retired_cache"))


def record_reduction(stats: Stats, layer: int, st: TokenState, redirects) -> None:
    """Which original tokens enter ``layer`` and which were merged into which, per row."""
    stats.kept[layer] = [row[ok].tolist() for row, ok in zip(st.index, st.valid)]
    merged = [[] for _ in range(st.batch_size)]
    for rows, src, dst in redirects:
        for r, s, d in zip(rows.tolist(), src.tolist(), dst.tolist()):
            merged[r].append((s, d))
    if any(merged):
        stats.merged[layer] = merged


@dataclass
class Request:
    """One prompt's prefill and decode steps; lives as long as its KV cache."""

    key_index: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, K) dense key positions
    key_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    shift: dict[int, torch.Tensor] = field(default_factory=dict)  # renumbering: layer -> (B,) removed tokens
    next_position: torch.Tensor | None = None  # (B or 1,) position the next new token takes (None: dense_len)
    dense_len: int = 0
    stats: Stats = field(default_factory=Stats)
    row_offset: torch.Tensor | None = None  # (B,) left padding per row
    prompt_len: int = 0  # the prefill's length: what ``crop`` may not cut into

    def reorder(self, rows: torch.Tensor) -> None:
        """Row ``r`` becomes the old row ``rows[r]`` (rows may repeat or be left out)."""
        for table in (self.key_index, self.key_valid, self.shift):
            for layer, t in table.items():
                table[layer] = t.index_select(0, rows.to(t.device))
        if self.row_offset is not None:
            self.row_offset = self.row_offset.index_select(0, rows.to(self.row_offset.device))
        if self.next_position is not None and self.next_position.shape[0] > 1:  # (1,): shared by every row
            self.next_position = self.next_position.index_select(0, rows.to(self.next_position.device))

    def follow(self, op: str, arg) -> None:
        """Move the bookkeeping as the cache's ``op`` (a row move of ``CacheOp.OPS``) moved its rows."""
        if op == "batch_repeat_interleave":
            if self.row_offset is None:
                return
            rows = torch.arange(self.row_offset.shape[0]).repeat_interleave(int(arg))
        else:
            rows = torch.as_tensor(arg)
            rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.long().flatten()
        self.reorder(rows)

    def crop(self, cache, tokens_to_remove: int) -> None:
        """``cache.crop(-n)``: the sequence's last ``n`` tokens leave every layer. Dense layers drop
        their last ``n`` keys; a pruned layer drops the columns that held only those tokens (the
        others' keys of those tokens become masked fillers)."""
        n = -int(tokens_to_remove)
        if n < 0:
            raise TokenPruneError(f"cache.crop({tokens_to_remove}): a pruned KV cache is cropped by a negative "
                                  "count of tokens to remove, as transformers v5 does")
        if self.dense_len - n < self.prompt_len:  # (assisted / prompt-lookup decoding prefill with the candidates)
            raise TokenPruneError(f"cache.crop({tokens_to_remove}) would cut into the {self.prompt_len} tokens of the "
                                  "pruned prefill: its reductions chose among the tokens cut (assisted and prompt-lookup "
                                  "decoding prefill the prompt with their first candidates: not supported under "
                                  "pruning); only tokens decoded after the prefill can be cropped")
        new_len = self.dense_len - n
        for i, layer in enumerate(cache.layers):
            if i not in self.key_index:
                layer.crop(-n)
                continue
            index, keep = self.key_index[i], self.key_valid[i] & (self.key_index[i] < new_len)
            cols = keep.any(0).nonzero().flatten()
            if len(cols) < index.shape[1] and layer.is_initialized:
                layer.keys, layer.values = layer.keys.index_select(2, cols.to(layer.keys.device)), \
                    layer.values.index_select(2, cols.to(layer.values.device))
            self.key_index[i], self.key_valid[i] = index[:, cols], keep[:, cols]
        self.dense_len = new_len
        if self.next_position is not None:
            self.next_position = self.next_position - n

    def held(self, layer: int) -> int:
        """Keys ``layer``'s cache holds (the dense length unless a reduction reached it)."""
        return self.key_index[layer].shape[1] if layer in self.key_index else self.dense_len


@dataclass
class Call:
    """One forward of the base model."""

    request: Request
    mode: str  # "prefill" | "decode" | "off"
    mask2d: torch.Tensor | None
    segments: torch.Tensor | None
    stream: Stream | None = None
    start_len: int = 0
    derived: dict = field(default_factory=dict)  # id(HF's per-layer mask / rope / ids) -> (version, ours)
    positions: torch.Tensor | None = None  # renumbered positions of the slots (renumber_positions=True)
    positions_before_skip: torch.Tensor | None = None
    stash: tuple | None = None  # previous layer's input, for attention scores
    dstash: tuple | None = None  # decode: previous layer's input for the new tokens, and its cache
    layer_rope: tuple | None = None  # HF's rotary cos / sin of the current layer
    hollow: list | None = None  # hooks that empty the block no token runs (see ``_hollow``)
    causal: torch.Tensor | None = None  # (c, c) additive causal mask of one query chunk (``_prefill_mass``)
    new_keys: tuple | None = None  # decode: (positions, validity) of the new tokens, as keys of a layer they all run

    @property
    def state(self) -> TokenState:
        return self.stream.state


class DecoderAdapter(HookedAdapter):
    family = "decoder LLMs with the transformers-v5 Llama layer interface (Llama, SmolLM2, Qwen2, Qwen3, Mistral, Gemma3 text)"

    @classmethod
    def matches(cls, model) -> bool:
        return find_decoder(model) is not None

    def __init__(self, model, pruners, renumber_positions: bool = False):
        self.model = model
        self.base = find_decoder(model)
        self.layers = self.base.layers
        self.config = self.base.config
        # what the FLOPs / KV accounting reads, as plain attributes: HF config lookups are slow, and
        # the accounting runs at every layer of every decode step
        self.shape = SimpleNamespace(**{k: getattr(self.config, k, None) for k in (
            "hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "intermediate_size")})
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"attention implementation {impl!r} is not supported; load the model with "
                f"attn_implementation in {SUPPORTED_ATTENTION}"
            )
        cfg, attn = self.config, self.layers[0].self_attn
        heads = getattr(cfg, "num_attention_heads", None)
        super().__init__(pruners, ModelFacts(
            num_layers=len(self.layers), stack=self.stack, hidden_size=getattr(cfg, "hidden_size", None),
            num_heads=heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(attn, "head_dim", None)))
        for p in self.at.get(0, ()):
            if p.reads_previous_layer:
                raise TokenPruneError(f"{p.name}: it scores from the previous layer, and decoder layer 0 has none; "
                                      "start it at layer 1 (only methods that read no decoder layer run before layer 0)")
        self.renumber = bool(renumber_positions)
        attn_module = sys.modules[type(self.layers[0].self_attn).__module__]
        self._rotate = getattr(attn_module, "apply_rotary_pos_emb", None)
        if self._rotate is None:
            raise UnsupportedModelError(f"{attn_module.__name__} has no apply_rotary_pos_emb")
        self._requests: "weakref.WeakKeyDictionary[object, Request]" = weakref.WeakKeyDictionary()
        # the pruners asked at decode steps, per layer (looked up at every layer of every step)
        self.decode_routers = {i: [p for p in ps if p.routes_decode] for i, ps in self.at.items()}

    # ---- attach / detach -------------------------------------------------------------
    def attach(self):
        self.hook(self.base.register_forward_pre_hook(self._open_call, with_kwargs=True))
        self.hook(self.base.register_forward_hook(self._close_call, with_kwargs=True, always_call=True))
        for i, layer in enumerate(self.layers):
            self.hook(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
            self.hook(layer.register_forward_hook(self._make_skip_hook(i), always_call=True))
            if i + 1 in self.at:  # a pruner before the next layer may score with this layer's attention
                for name in ("q", "k"):
                    proj = getattr(layer.self_attn, f"{name}_proj")
                    self.hook(proj.register_forward_hook(self._make_capture_hook(i, name)))
        self.hook(self.base.norm.register_forward_pre_hook(self._restore_length))

    def _make_capture_hook(self, i, name):
        """Keep layer i's own q / k projections of the slots it runs (prefill), so attention
        scores before layer i + 1 reuse them instead of recomputing them."""
        def hook(module, args, out):
            call = self.call
            if call is not None and call.mode == "prefill" and call.stash is not None and call.stash[0] == i \
                    and call.stash[5] is not None:
                call.stash[5][name] = out
        return hook

    def detach(self):
        super().detach()
        for cache, request in list(self._requests.items()):
            if request.key_index:  # its layers hold fewer keys than the dense model expects
                retire_cache(cache)
        self._requests = weakref.WeakKeyDictionary()

    # ---- call lifecycle -------------------------------------------------------------
    def _open_call(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        mask2d = kwargs.get("attention_mask")
        mask2d = mask2d if torch.is_tensor(mask2d) and mask2d.dim() == 2 else None
        seen = cache.get_seq_length() if cache is not None else 0
        request = self._requests.get(cache) if cache is not None else None
        if request is not None and seen == request.held(0):
            mode = "decode"
            check_cache_rows(request, args, kwargs)
            if 0 in request.key_index:
                self._dense_decode_inputs(request, args, kwargs)
        elif seen == 0:
            mode, request = "prefill", Request()
            pids = kwargs.get("position_ids")
            request.next_position = pids[..., -1] + 1 if torch.is_tensor(pids) else None
        else:  # a cache filled without us (or changed since): dense caches run dense, pruned ones raise
            check_foreign_cache(cache, request)
            mode, request = "off", Request()
        self.call = Call(request, mode, mask2d, self.segments)
        return args, kwargs

    def _dense_decode_inputs(self, request: Request, args, kwargs):
        """Decode after a reduction before layer 0: what HF would derive from layer 0's (pruned)
        cache length, given in dense terms. Positions of the new tokens (when none are passed) and
        a 4-D mask over the dense key positions (from the 2-D padding mask, which spans the dense
        sequence); ``_decode_layer`` cuts it to each layer's keys."""
        x = next(t for t in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if torch.is_tensor(t))
        q, start = x.shape[1], request.dense_len
        keys = start + q
        new = torch.arange(start, keys, device=x.device)
        # generate restarted from a whole sequence slices it by layer 0's (pruned) cache length
        restart = ("continue a cache pruned before layer 0 with the new tokens only (generate from the whole "
                   "sequence with past_key_values= is not supported there)")
        pids = kwargs.get("position_ids")
        if pids is None:
            pids = kwargs["position_ids"] = new[None]
        else:
            expected = new[:1] if request.next_position is None else request.next_position
            if not bool((pids[..., 0] == expected).all()):
                raise TokenPruneError(f"the new tokens' positions start at {pids[..., 0].tolist()}, the pruned KV "
                                      f"cache's sequence continues at {expected.tolist()}: {restart}")
        mask = kwargs.get("attention_mask")
        if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2):
            request.next_position = pids[..., -1] + 1
            return  # a prepared 4-D mask (or per-layer-type masks) already spans the dense keys
        if mask is not None and mask.shape[-1] != keys:
            raise TokenPruneError(f"the attention mask covers {mask.shape[-1]} tokens, but the pruned KV cache's "
                                  f"prompt and the {q} new token(s) make {keys}: {restart}")
        window = self._sliding_window()
        if window is not None and keys > window:
            raise TokenPruneError(f"the sequence ({keys} tokens) outgrew the {window}-token sliding window: "
                                  "sliding-window layers are supported only while the sequence fits the window")
        visible = torch.arange(keys, device=x.device)[None, None, None, :] <= new[None, None, :, None]
        if mask is not None:
            visible = visible & mask.bool()[:, None, None, :]
        dtype = x.dtype if x.is_floating_point() else self.base.get_input_embeddings().weight.dtype
        kwargs["attention_mask"] = self._as_mask(visible, dtype)
        request.next_position = pids[..., -1] + 1  # only once the call is accepted

    def _sliding_window(self) -> int | None:
        types = getattr(self.config, "layer_types", None)
        if types is not None and not any("sliding" in t for t in types):
            return None
        return getattr(self.config, "sliding_window", None)

    def _close_call(self, module, args, kwargs, output):
        call, self.call = self.call, None
        if call is not None:
            self._unhollow(call)
            call.dstash = None
        if call is not None and call.stream is not None:
            call.stream.release()  # also when the forward raised before the final norm
        if call is None or call.mode == "off" or call.stream is None:
            return None
        req = call.request
        self._account_kv(call)
        req.dense_len = call.start_len + call.stream.N
        cache = kwargs.get("past_key_values")
        if call.mode == "prefill" and cache is not None and (req.key_index or any(p.routes_decode for p in self.pruners)):
            req.prompt_len = req.dense_len
            for op in CacheOp.OPS:  # beam / contrastive search move rows, assisted decoding crops: the bookkeeping follows
                setattr(cache, op, CacheOp(cache, req, op))
        req.stats.forward_calls += 1
        self.last_stats = req.stats
        return None

    # ---- per layer ------------------------------------------------------------------
    def _make_layer_hook(self, i):
        def hook(module, args, kwargs):
            call = self.call
            if call is None or call.mode == "off":
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                self._begin(call, hidden, kwargs)
            if call.mode == "prefill":
                hidden = self._prefill_layer(call, i, hidden, kwargs)
            else:
                hidden = self._decode_layer(call, i, hidden, kwargs)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _begin(self, call: Call, hidden: torch.Tensor, kwargs):
        B, N = hidden.shape[:2]
        dev = hidden.device
        cache = kwargs.get("past_key_values")
        if call.mode == "prefill" and cache is not None:
            kinds = {type(layer).__name__ for layer in getattr(cache, "layers", ())}
            if kinds - {"DynamicLayer", "DynamicSlidingWindowLayer"}:
                raise TokenPruneError(f"{sorted(kinds)} caches are not supported: layers hold different token counts "
                                      "after pruning; use the default DynamicCache")
            self._requests[cache] = call.request
        call.start_len = call.request.dense_len
        valid = call.mask2d.bool() if call.mask2d is not None else torch.ones(B, N, dtype=torch.bool, device=dev)
        if call.mode == "prefill":
            segments = call.segments
            if segments is None:
                segments = torch.where(valid, int(Segment.TEXT), int(Segment.PAD))
            elif tuple(segments.shape) != (B, N):
                raise TokenPruneError(f"segment map has shape {tuple(segments.shape)}, the input is {(B, N)}")
            call.request.stats = Stats(dense_tokens=valid.sum(1).tolist())
        else:
            segments = torch.full((B, N), int(Segment.GENERATED), device=dev)
            valid = torch.ones(B, N, dtype=torch.bool, device=dev)  # new tokens: padding was already counted
        if call.mode == "prefill":
            call.request.row_offset = (valid.long().cumsum(1) == 0).sum(1)
        # decode: the new tokens' absolute positions (what the layers' key_index record)
        index = (torch.arange(N, device=dev) + (call.start_len if call.mode == "decode" else 0)).expand(B, N)
        info = dict(self.token_info) if call.mode == "prefill" else {}
        call.stream = Stream(TokenState(0, len(self.layers), hidden, index, valid, segments.to(dev), token_info=info,
                                        row_offset=call.request.row_offset, decoding=call.mode == "decode"))
        mask = kwargs.get("attention_mask")
        if mask is not None and not torch.is_tensor(mask):
            raise UnsupportedModelError("tokenprune needs tensor attention masks (sdpa or eager attention)")

    def _prefill_layer(self, call: Call, i: int, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        stream, st = call.stream, call.state
        st.layer, st.hidden = i, hidden
        call.layer_rope = kwargs.get("position_embeddings")  # HF's, before it is fitted to the slots
        st._attention = (lambda q: self._attention(call, q)) if call.stash is not None else None
        st._keys = (lambda: self._keys(call)) if call.stash is not None else None
        st._mass = (lambda on, qs, heads=None: self._attention(call, qs, on, heads)) if call.stash is not None else None
        version, merges = stream.version, len(stream.redirects)
        pruners = self.at.get(i, ())
        for k, pruner in enumerate(pruners):
            reduction = pruner.select(st)
            if reduction is None or reduction.is_noop(st):
                continue
            if stream.skip is not None:
                raise TokenPruneError(f"layer {i}: a Skip must be the last reduction before its layer")
            self._reduce(call, i, reduction, rescore=k + 1 < len(pruners))
        if stream.version != version:
            record_reduction(call.request.stats, i, st, stream.redirects[merges:])
        hollow = self._is_hollow(call, i)
        if stream.changed:
            self._rewrite_kwargs(call, i, kwargs)
            req = call.request
            req.key_index[i], req.key_valid[i] = st.index, st.valid
            if i == 0 and kwargs.get("past_key_values") is not None:  # every layer holds the same pruned count
                kwargs["past_key_values"].tokenprune_before_layer0 = True  # so check_foreign_cache knows it
            if hollow:  # the block runs on no token: its cache stays empty
                req.key_index[i], req.key_valid[i] = st.index[:, :0], st.valid[:, :0]
                self._hollow(call, i, kwargs)
            if self.renumber:
                req.shift[i] = stream.dense_count - stream.alive_count
        call.stash = (i, st.hidden, kwargs.get("position_embeddings"), st.valid, None, None if hollow else {})
        stats = call.request.stats
        stats.tokens_per_layer.append(st.valid.sum(1).tolist())
        B, n = st.index.shape
        stats.flops += 0 if hollow else B * decoder_layer_flops(self.shape, n, n)
        stats.dense_flops += B * decoder_layer_flops(self.shape, stream.N, stream.N)
        return st.hidden

    def _reduce(self, call: Call, i: int, reduction, rescore: bool = True):
        """Apply ``reduction`` before layer i; ``rescore``: a later pruner at this layer will score."""
        before = self._positions(call) if self.renumber else None
        slots, valid = call.stream.reduce(i, reduction)
        if self.renumber:  # persistent reductions renumber; skipping tokens keep the numbering
            call.positions_before_skip = None if reduction.persistent else before
            call.positions = (valid.long().cumsum(1) - 1).clamp_min(0) if reduction.persistent else gather_rows(before, slots)
        if rescore and call.stash is not None:  # a later pruner at this layer scores the reduced set
            li, h, rope, _, ran, _ = call.stash
            call.stash = (li, gather_rows(h, slots), tuple(gather_rows(t, slots) for t in rope), valid,
                          None if ran is None else ran.gather(1, slots), None)

    def _positions(self, call: Call) -> torch.Tensor:
        if call.positions is None:
            call.positions = (call.state.valid.long().cumsum(1) - 1).clamp_min(0)
        return call.positions

    def _rope(self, i: int, hidden: torch.Tensor, position_ids: torch.Tensor):
        """Rotary cos/sin at new positions, for models with one or per-layer-type embeddings."""
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None and "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters:
            return self.base.rotary_emb(hidden, position_ids, layer_types[i])
        return self.base.rotary_emb(hidden, position_ids)

    def _rewrite_kwargs(self, call: Call, i: int, kwargs):
        """Fit HF's per-layer mask, rotary cos/sin and position ids to the current slots.

        Derived from HF's originals through the slots' original positions (``state.index``),
        so models that pass several masks / rotary embeddings (sliding vs full layers) work;
        cached per object until the slot set changes.
        """
        st, version = call.state, call.stream.version
        for name in ("attention_mask", "position_embeddings", "position_ids"):
            orig = kwargs.get(name)
            hit = call.derived.get((name, id(orig)))
            if hit is not None and hit[0] == version:
                kwargs[name] = hit[1]
                continue
            if name == "attention_mask":
                new = self._gather_mask(orig, st.index, st.valid, st.hidden.dtype)
            elif self.renumber:
                pids = self._positions(call)
                new = self._rope(i, st.hidden, pids) if name == "position_embeddings" else pids
            elif name == "position_embeddings":
                new = tuple(gather_rows(t, st.index) for t in orig)
            else:
                new = None if orig is None else gather_rows(orig, st.index)
            call.derived[(name, id(orig))] = (version, new)
            kwargs[name] = new

    def _gather_mask(self, mask, slots, valid, dtype):
        if mask is None:
            if bool(valid.all()):
                return None  # kept slots stay in causal order: is_causal still holds
            m = slots.shape[1]
            causal = torch.ones(m, m, dtype=torch.bool, device=slots.device).tril()
            return self._as_mask(causal[None, None].expand(slots.shape[0], 1, m, m) & valid[:, None, None, :], dtype)
        B, m = slots.shape
        mask = expand_rows(mask, B)
        h, n = mask.shape[1], mask.shape[-1]
        mask = mask.gather(2, slots[:, None, :, None].expand(B, h, m, n))
        mask = mask.gather(3, slots[:, None, None, :].expand(B, h, m, m))
        return mask_keys(mask, valid)

    def _as_mask(self, visible: torch.Tensor, dtype) -> torch.Tensor:
        """A bool "may attend" tensor in the form this model's attention takes."""
        if self.config._attn_implementation != "eager":
            return visible
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)

    def _make_skip_hook(self, i):
        def hook(module, args, output):
            call = self.call
            if call is None or call.stream is None or call.mode == "off":
                return None
            self._unhollow(call)
            skip = call.stream.skip
            if output is None or skip is None or skip[0] != i:  # (output is None: the block raised)
                return None
            out = output[0] if isinstance(output, tuple) else output
            merged = call.stream.unskip(i, out)
            if call.mode == "prefill":
                self._widen_stash(call, i, skip)
                if self.renumber:
                    call.positions = call.positions_before_skip
            return (merged, *output[1:]) if isinstance(output, tuple) else merged

        return hook

    def _widen_stash(self, call: Call, i: int, skip):
        """After block i: its stash (input of the tokens that ran it) in the slots of all tokens, so
        the next layer's scores index the current slots; ``ran`` marks who ran block i."""
        if call.stash is None or call.stash[0] != i:
            return
        _, slots, valid, full, (index, all_valid, _, _) = skip
        B, n = all_valid.shape
        if self.renumber:
            rope = self._rope(i, full, call.positions_before_skip)
        else:
            rope = tuple(gather_rows(t, index) for t in call.layer_rope)
        ran = torch.zeros(B, n, dtype=torch.bool, device=slots.device).scatter(1, slots, valid)
        cap = call.stash[5]
        cap = None if not cap or len(cap) < 2 else {**cap, "slots": slots}  # (q, k of the slots that ran it)
        call.stash = (i, full, rope, all_valid, ran, cap)

    # ---- blocks no token runs ---------------------------------------------------------
    def _is_hollow(self, call: Call, i: int) -> bool:
        skip = call.stream.skip
        return skip is not None and skip[0] == i and not bool(skip[2].any())

    def _hollow(self, call: Call, i: int, kwargs):
        """Every token skips block i, but a forward hook cannot cancel the block's call, and the
        attention reshapes fail on a 0-token input. So it runs on one filler slot per row with its
        linear layers emptied (input cut to 0 rows, output zeros: no matmul) and no KV cache
        (nothing is stored); the output is discarded by ``Stream.unskip``. Only this thread's call
        is affected; the hooks go at the block's post-hook."""
        kwargs["past_key_values"] = None
        kwargs["attention_mask"] = None  # one query, one key: nothing to mask
        call.hollow = []

        def empty_input(mod, args):
            if self.call is call:
                return (args[0][..., :0, :], *args[1:])

        def zero_output(mod, args, out):
            if self.call is call:
                return out.new_zeros(*out.shape[:-2], 1, out.shape[-1])

        for mod in self.layers[i].modules():
            if isinstance(mod, nn.Linear):
                call.hollow += [mod.register_forward_pre_hook(empty_input), mod.register_forward_hook(zero_output)]

    def _unhollow(self, call: Call):
        for h in call.hollow or ():
            h.remove()
        call.hollow = None

    def _restore_length(self, module, args):
        call = self.call
        if call is None or call.mode != "prefill" or call.stream is None:
            return None
        out = call.stream.restore(args[0])
        return None if out is None else (out, *args[1:])

    # ---- decode steps ---------------------------------------------------------------
    def _decode_layer(self, call: Call, i: int, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        """Fit the mask (and positions, after renumbering) to the keys layer i's cache holds; routers
        (``Pruner.routes_decode``) may let new tokens skip the block: those leave no key in it."""
        req = call.request
        B, q = hidden.shape[:2]
        stats = req.stats
        dense_keys = call.start_len + q
        stats.dense_flops += B * decoder_layer_flops(self.shape, q, dense_keys)
        cache = kwargs.get("past_key_values")
        rope = kwargs.get("position_embeddings")
        kept = self._route_decode(call, i, hidden)  # (slots, valid) of the new tokens that run block i
        if kept is None and i not in req.key_index:
            stats.flops += B * decoder_layer_flops(self.shape, q, dense_keys)
            call.dstash = (i, hidden, rope, None, cache)
            return hidden
        if i not in req.key_index:  # first reduction of this layer: its history is dense
            if cache is not None and cache.layers[i].get_seq_length() != call.start_len:
                raise TokenPruneError(f"layer {i}'s KV cache holds {cache.layers[i].get_seq_length()} keys, not "
                                      f"the {call.start_len} of the sequence: sliding-window layers are supported "
                                      "only while the sequence fits the window")
            req.key_index[i] = torch.arange(call.start_len, device=hidden.device).expand(B, -1)
            m2d = call.mask2d
            req.key_valid[i] = (m2d[:, : call.start_len].bool() if m2d is not None and m2d.shape[1] >= dense_keys
                                else torch.ones(B, call.start_len, dtype=torch.bool, device=hidden.device))
        held = req.key_index[i].shape[1]
        if cache is not None and cache.layers[i].get_seq_length() != held:
            raise TokenPruneError(
                f"layer {i}'s KV cache holds {cache.layers[i].get_seq_length()} keys, tokenprune expected {held}: "
                "the cache was cropped or edited outside tokenprune"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] != dense_keys:
            raise TokenPruneError(
                f"layer {i} attends to a {mask.shape[-1]}-key window, not the whole cache: "
                "sliding-window layers are supported only while the sequence fits the window"
            )
        pids = kwargs.get("position_ids")
        if self.renumber and i in req.shift:
            pids = expand_rows(pids, B) - req.shift[i][:, None]
            rope = self._rope(i, hidden, pids)
        call.dstash = (i, hidden, rope, kept, cache)
        if kept is None:  # every new token runs block i: the same for every such layer of this step
            if call.new_keys is None:
                call.new_keys = ((call.start_len + torch.arange(q, device=hidden.device)).expand(B, q),
                                 torch.ones(B, q, dtype=torch.bool, device=hidden.device))
            slots, (new, new_valid) = None, call.new_keys
        else:
            slots, new_valid = kept
            new = call.start_len + slots
            pids = None if pids is None else gather_rows(expand_rows(pids, B), slots)
            rope = tuple(gather_rows(t, slots) for t in rope)
            if not bool(new_valid.any()):  # no row's new token runs block i
                kwargs["position_ids"], kwargs["position_embeddings"] = pids, rope
                self._hollow(call, i, kwargs)
                return call.state.hidden
        m = new.shape[1]
        index = torch.cat([req.key_index[i], new], dim=1)
        valid = torch.cat([req.key_valid[i], new_valid], dim=1)
        req.key_index[i], req.key_valid[i] = index, valid
        stats.flops += B * decoder_layer_flops(self.shape, m, index.shape[1])
        if mask is not None:
            mask = expand_rows(mask, B)
            if slots is not None:
                mask = mask.gather(2, slots[:, None, :, None].expand(B, mask.shape[1], m, mask.shape[-1]))
            mask = mask_keys(mask.gather(3, index[:, None, None, :].expand(B, mask.shape[1], m, index.shape[1])), valid)
        elif not bool(valid.all()):
            mask = self._as_mask((index[:, None, None, :] <= new[:, None, :, None]) & valid[:, None, None, :], hidden.dtype)
        kwargs["attention_mask"] = mask
        if slots is not None or (self.renumber and i in req.shift):
            kwargs["position_ids"], kwargs["position_embeddings"] = pids, rope
        return hidden if kept is None else call.state.hidden

    def _route_decode(self, call: Call, i: int, hidden: torch.Tensor):
        """Ask the routers scheduled before layer i about the new tokens; apply a Skip they answer."""
        routers = self.decode_routers.get(i)
        if not routers:
            return None
        stream, st = call.stream, call.state
        st.layer, st.hidden = i, hidden
        st._attention = (lambda qs: self._decode_attention(call, qs)) if call.dstash is not None else None
        st._context = (lambda qs: self._decode_context(call, qs)) if call.dstash is not None else None
        st._mass = (lambda on, qs, heads=None: self._decode_context(call, qs, on, heads)) if call.dstash is not None else None
        st._keys = None
        kept = None
        for pruner in routers:
            reduction = pruner.select(st)
            if reduction is None or reduction.is_noop(st):
                continue
            if reduction.persistent:
                raise TokenPruneError(f"{pruner.name}: at a decode step only a Skip can be applied (layer {i})")
            if stream.skip is not None:
                raise TokenPruneError(f"layer {i}: a Skip must be the last reduction before its layer")
            kept = stream.reduce(i, reduction)
        return kept

    def _decode_context(self, call: Call, query_slots: torch.Tensor | None, on: torch.Tensor | None = None,
                        heads: tuple[int, ...] | None = None):
        """Decode step: attention ``(B, heads, q, K)`` of the previous layer from the new tokens in
        ``query_slots`` over the K keys its cache holds (this step's included), with their positions
        and validity ``(B, K)``. A new token that skipped that layer has a row (from its hidden
        state entering it) but no key."""
        li, hidden, (cos, sin), kept, cache = call.dstash
        layer, req = self.layers[li], call.request
        attn = layer.self_attn
        B, n, _ = hidden.shape
        dev = hidden.device
        every_row = query_slots is None
        if every_row:
            query_slots = torch.arange(n, device=dev).expand(B, n)
        x = layer.input_layernorm(hidden if every_row else gather_rows(hidden, query_slots))
        q = attn.q_proj(x).view(B, x.shape[1], -1, attn.head_dim)
        all_heads = q.shape[2]
        if heads is not None:
            q = q[:, :, list(heads)]
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = expand_rows(cos, B), expand_rows(sin, B)
        if not every_row:
            cos, sin = gather_rows(cos, query_slots), gather_rows(sin, query_slots)
        q = self._rotate(q, q, cos, sin)[0]
        if cache is None or not cache.layers[li].is_initialized:
            K = 0
            keys = q.new_zeros(B, 1, 0, q.shape[-1])
        else:
            keys = cache.layers[li].keys
            K = keys.shape[2]
            if heads is not None:  # the key heads these query heads read
                keys = keys[:, key_heads(heads, all_heads, keys.shape[1])]
        if li in req.key_index:
            kindex, kvalid = req.key_index[li], req.key_valid[li]
        else:
            kindex = torch.arange(K, device=dev).expand(B, K) + (call.start_len + n - K)
            m2d = call.mask2d
            kvalid = (m2d[:, -K:].bool() if m2d is not None and m2d.shape[1] >= K and K
                      else torch.ones(B, K, dtype=torch.bool, device=dev))
        qpos = call.start_len + query_slots
        visible = (kindex[:, None, :] <= qpos[:, :, None]) & kvalid[:, None, :]
        if on is not None:
            return attention_mass(q, keys, attn.scaling, visible[:, None], (kindex[:, :, None] == on[:, None, :]).any(-1))
        return attention_probs(q, keys, attn.scaling, visible[:, None]), kindex, kvalid

    def _decode_attention(self, call: Call, query_slots: torch.Tensor | None) -> torch.Tensor:
        """``state.attention`` at a decode step: ``_decode_context`` cut to the keys of the new slots
        (``[.., t, t]``: what token t has received so far, from itself; 0 if it skipped that layer)."""
        probs, kindex, kvalid = self._decode_context(call, query_slots)
        B, H, q, K = probs.shape
        n = call.dstash[1].shape[1]
        new = kindex - call.start_len  # slot of each key among the new tokens (< 0: an older key)
        own = (new >= 0) & kvalid
        out = probs.new_zeros(B, H, q, n + 1)  # column n collects the older keys, then goes
        col = torch.where(own, new, n)[:, None, None, :].expand(B, H, q, K)
        return out.scatter_(3, col, probs * own[:, None, None, :])[..., :n]

    # ---- attention scores -----------------------------------------------------------
    def _attention(self, call: Call, query_slots: torch.Tensor | None, on: torch.Tensor | None = None,
                   heads: tuple[int, ...] | None = None) -> torch.Tensor:
        """softmax(q k^T) of the previous layer for the query rows a method needs.

        Recomputed from that layer's own norm, projections and rotary embedding, so the model
        keeps running SDPA and nothing N x N is materialised unless asked for. ``heads``: only
        these query heads (and the key heads they read), sliced before rotary and attention.
        """
        if on is not None and query_slots is None:
            return self._prefill_mass(call, on, heads)
        li, hidden, (cos, sin), valid, ran, _ = call.stash
        layer = self.layers[li]
        attn = layer.self_attn
        B, n, D = hidden.shape
        every_row = query_slots is None
        if every_row:
            query_slots = torch.arange(n, device=hidden.device).expand(B, n)
        hd = attn.head_dim
        captured = self._captured(call, heads)
        if captured is not None:
            q = captured[0].view(B, n, -1, hd)
            q = q if every_row else gather_rows(q, query_slots)
            k = captured[1].view(B, n, -1, hd)
        else:
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x if every_row else gather_rows(x, query_slots)).view(B, query_slots.shape[1], -1, hd)
            k = attn.k_proj(x).view(B, n, -1, hd)
        if heads is not None:
            q, k = q[:, :, list(heads)], k[:, :, key_heads(heads, q.shape[2], k.shape[2])]
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = expand_rows(cos, B), expand_rows(sin, B)
        if every_row:  # queries and keys at the same positions: one rotary call
            q, k = self._rotate(q, k, cos, sin)
        else:
            q = self._rotate(q, q, gather_rows(cos, query_slots), gather_rows(sin, query_slots))[0]
            k = self._rotate(k, k, cos, sin)[0]
        pos = torch.arange(n, device=hidden.device)
        # after a Skip at that layer only the tokens that ran it are keys (the others left none in
        # its cache); every token has a row, from its hidden state entering that layer
        keys = valid if ran is None else valid & ran
        visible = (pos[None, None, :] <= query_slots[:, :, None]) & keys[:, None, :]
        if on is not None:
            return attention_mass(q, k, attn.scaling, visible[:, None], (call.state.index[:, :, None] == on[:, None, :]).any(-1))
        return attention_probs(q, k, attn.scaling, visible[:, None])

    def _prefill_mass(self, call: Call, on: torch.Tensor, heads: tuple[int, ...] | None) -> torch.Tensor:
        """``state.attention_mass`` at prefill for every slot (what FTP reads before each block):
        ``(B, heads, n)`` attention of the previous layer's queries on the keys at positions ``on``.

        Built for one or a few heads at every block: only those heads' q / k columns (from the
        projections the layer made as it ran; the tokens that skipped it get their q columns
        projected now); scores in query chunks over the keys each chunk can see (about half the
        causal square); masked keys (skipped that layer, padding) pushed far below every real score
        by one extra q / k column instead of an (n, n) mask; and no attention-times-value product:
        the mass is the softmax times a 0 / 1 column. On SmolLM2-135M (512 tokens, one head, CPU, 1
        thread) about 0.6 ms per block against 1.0 ms through SDPA with a mask.
        """
        li, hidden, (cos, sin), valid, ran, _ = call.stash
        attn = self.layers[li].self_attn
        B, n, _ = hidden.shape
        heads = tuple(range(self.facts.num_heads)) if heads is None else heads
        q, k = self._head_qk(call, heads)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self._rotate(q.transpose(1, 2), k.transpose(1, 2), expand_rows(cos, B), expand_rows(sin, B))
        H = q.shape[1]
        q = (q.float() * attn.scaling).reshape(B * H, n, -1)
        k = k.float().reshape(B * H, n, -1)
        keys = valid if ran is None else valid & ran
        target = (call.state.index[:, :, None] == on[:, None, :]).any(-1) & keys
        if not bool(keys.all()):  # one more column: q 1, k 0 for a key, -1e9 for a masked one
            q = torch.cat([q, q.new_ones(B * H, n, 1)], -1)
            far = torch.where(keys, 0.0, -1e9).to(k.dtype)
            k = torch.cat([k, far[:, None, :, None].expand(B, H, n, 1).reshape(B * H, n, 1)], -1)
        column = target.float()[:, None, :, None].expand(B, H, n, 1).reshape(B * H, n, 1)
        step = min(MASS_ROWS, max(16, 2 ** 22 // (B * H * n)))  # query rows per chunk: a few MB of scores
        if call.causal is None or call.causal.shape[0] < step:
            call.causal = torch.full((step, step), torch.finfo(torch.float32).min, device=q.device).triu_(1)
        out = []
        for a in range(0, n, step):  # rows a..b see keys 0..b; only the diagonal block needs the mask
            b = min(a + step, n)
            scores = q[:, a:b] @ k[:, :b].transpose(1, 2)
            scores[:, :, a:b] += call.causal[: b - a, : b - a]
            out.append(scores.softmax(-1) @ column[:, :b])
        return torch.cat(out, 1).view(B, H, n)

    def _head_qk(self, call: Call, heads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, n, len(heads), head_dim)`` q of the query ``heads`` and k of the key heads they read
        (before norm and rotary), for the stash's slots: the layer's own projections where it ran
        (captured), projected now for the tokens that skipped it (q only: they left no key)."""
        li, hidden, _, _, _, cap = call.stash
        layer = self.layers[li]
        attn = layer.self_attn
        B, n, _ = hidden.shape
        hd = attn.head_dim
        kheads = key_heads(heads, self.facts.num_heads, self.facts.num_kv_heads)
        if not cap or "q" not in cap or "k" not in cap:
            x = layer.input_layernorm(hidden)
            return (project_heads(attn.q_proj, x, heads, hd).view(B, n, -1, hd),
                    project_heads(attn.k_proj, x, kheads, hd).view(B, n, -1, hd))
        q, k = pick_heads(cap["q"], heads, hd), pick_heads(cap["k"], kheads, hd)
        slots = cap.get("slots")
        if slots is None:
            return q, k
        ran_rows = flat_rows(slots, n)  # of the B * n rows
        missing = torch.ones(B * n, dtype=torch.bool, device=hidden.device)
        missing[ran_rows] = False
        rows = missing.nonzero().squeeze(1)
        x = layer.input_layernorm(hidden.reshape(B * n, -1).index_select(0, rows))
        # rows that ran, then the others (their q projected now, keys 0), put in slot order by one gather
        order = torch.cat([ran_rows, rows]).argsort()
        q = torch.cat([q.reshape(len(ran_rows), -1), project_heads(attn.q_proj, x, heads, hd)]).index_select(0, order)
        k = torch.cat([k.reshape(len(ran_rows), -1), k.new_zeros(len(rows), k.shape[2] * hd)]).index_select(0, order)
        return q.view(B, n, -1, hd), k.view(B, n, -1, hd)

    def _captured(self, call: Call, heads: tuple[int, ...] | None = None):
        """The previous layer's own q / k projections ``(B, n, .)`` of the current slots, when it
        ran on them (captured as it ran); after a Skip there, the q rows of the tokens that skipped
        it are projected now (their keys stay zero: they are no keys), then kept for later calls.
        ``heads``: a caller that reads only these query heads gets only their columns projected
        for those rows (the others stay 0 and nothing is kept)."""
        li, hidden, _, _, _, cap = call.stash
        if not cap or "q" not in cap or "k" not in cap:
            return None
        slots = cap.get("slots")
        if slots is not None:
            B, n, _ = hidden.shape
            q, k = cap["q"], cap["k"]
            full_q = scatter_rows(q.new_zeros(B, n, q.shape[-1]), slots, q)
            full_k = scatter_rows(k.new_zeros(B, n, k.shape[-1]), slots, k)
            missing = torch.ones(B, n, dtype=torch.bool, device=hidden.device).scatter(1, slots, False)
            if bool(missing.any()):
                layer = self.layers[li]
                proj = layer.self_attn.q_proj
                x = layer.input_layernorm(hidden[missing])
                if heads is not None and type(proj) is nn.Linear:
                    hd = layer.self_attn.head_dim
                    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd, device=x.device) for h in heads])
                    rows = full_q[missing]
                    rows[:, cols] = project_heads(proj, x, heads, hd)
                    full_q[missing] = rows
                    return full_q, full_k
                full_q[missing] = proj(x)
            cap.update(q=full_q, k=full_k, slots=None)
        return cap["q"], cap["k"]

    def _keys(self, call: Call) -> torch.Tensor:
        """Previous layer's keys (B, kv_heads, n, head_dim) before rotary: content, not position."""
        li, hidden, _, _, _, cap = call.stash
        layer = self.layers[li]
        attn = layer.self_attn
        B, n, _ = hidden.shape
        if cap and "k" in cap and cap.get("slots") is None:
            k = cap["k"].view(B, n, -1, attn.head_dim)
        else:
            k = attn.k_proj(layer.input_layernorm(hidden)).view(B, n, -1, attn.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        return k.transpose(1, 2)

    def _account_kv(self, call: Call):
        req, st = call.request, call.state
        B = st.index.shape[0]
        per_token = kv_bytes_per_token(self.config, st.hidden.element_size())
        dense_len = call.start_len + call.stream.N
        held = sum(req.key_index[i].shape[1] if i in req.key_index else dense_len for i in range(len(self.layers)))
        req.stats.kv_bytes = B * held * per_token
        req.stats.dense_kv_bytes = B * len(self.layers) * dense_len * per_token
