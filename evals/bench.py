"""Speed benchmarks: pruned vs dense in one run, next to the ideal.

    python -m tokenprune.evals.bench llm [--lengths 1024 2048] [--layer 4] [--keep 0.5]
    python -m tokenprune.evals.bench vit [--batch 16] [--flops-cut 0.347]

llm: SmolLM2-135M prefill. vit: a DeiT-S-shaped ViT (random weights: speed only) with
Zero-TPrune (layers 3, 6, 9) and ToMe (merging inside every block: ToMe's constant r, and a
geometric keep share) at the Zero-TPrune paper's FLOPs cut, images/s dense vs pruned, plus
random drop at Zero-TPrune's token counts (the engine's own cost without a scoring method).

llm's ideal is the dense model's own time at the kept token counts: layers before the
pruning layer timed at the full length, layers after it at the kept length. vit's ideal gain
is what a time exactly proportional to the blocks' FLOPs would give, 1 / (1 - FLOPs cut) - 1.
Uses CUDA events on a GPU, ``perf_counter`` on the CPU. FLOPs are the adapters' exact counts
(``tokenprune.stats.decoder_layer_flops``, ``adapters.encoder.block_flops``; both checked
against ``torch.utils.flop_counter`` in the tests; the stock counter skips the CPU SDPA
kernel, so it is not used directly). Scoring work (recomputed attention, PageRank) is not in
the FLOPs: it shows as time above the ideal.

    python -m tokenprune.evals.bench skip [--methods shortgpt skip-rank skip-random] [--sparsity 0.3] [--lengths 512]

skip: SmolLM2-135M prefill and per-token decode, dense vs token / block skipping at one
sparsity, next to the FLOP ideal, with the routing overhead as a share of the dense prefill
(``bench_skip``).

    python -m tokenprune.evals.bench lvlm [--methods fastv random:layer=0 ...] [--prunes 0.75 0.9] [--text 60]
    python -m tokenprune.evals.bench lvlm --accounting-only [--methods ...]

lvlm: time to first token of a LLaVA-1.5-shaped model (random weights, widths cut to fit a CPU;
576 visual + ``--text`` text tokens), dense vs each method at each share of visual tokens
pruned, next to the ideal (the dense decoder timed at each kept count in the same turns), with
each method's scoring time (its ``select``) as a share of the dense prefill; plus the exact
FLOPs and KV-cache bytes of LLaVA-1.5-7B at the same settings (``llava7b_accounting``;
``--accounting-only`` computes just these, no timing). A method may carry options as in
``tokenprune eval``: ``random:layer=0`` (before decoder layer 0), ``visionzip:layer=1``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time

import torch

from .. import FastV, TokenPruneError, build_pruner, list_pruners, prune, pruning, zoo
from ..stats import decoder_layer_flops, kv_bytes_per_token
from .text import token_block


def pick_device(name: str | None = None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up run."""
    fn()
    return statistics.median(once(fn, device) for _ in range(repeats))


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each of ``fns``, timed in turns so load drift hits all alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(once(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def bench_llm(lengths=(1024, 2048), layer=4, keep=0.5, repeats=3, device=None) -> list[dict]:
    device = pick_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tok = zoo.load("smollm2-135m", dtype=dtype)
    model.to(device)
    num_layers = model.config.num_hidden_layers
    rows = []
    for n in lengths:
        ids = token_block(tok, n).to(device)

        def prefill(x=ids):
            return model(x, logits_to_keep=1)  # what generate's prefill computes

        handle = prune(model, FastV(layer=layer, keep_ratio=keep))
        prefill()
        stats = handle.stats
        handle.remove()
        kept = stats.tokens_per_layer[-1][0]

        def pruned():
            with pruning(model, FastV(layer=layer, keep_ratio=keep)):
                prefill()

        t = interleaved({"dense": prefill, "pruned": pruned, "short": lambda: prefill(ids[:, :kept])}, repeats, device)
        dense_t, pruned_t, short_t = t["dense"], t["pruned"], t["short"]
        dense_flops, pruned_flops = stats.dense_flops, stats.flops
        ideal_t = (layer * dense_t + (num_layers - layer) * short_t) / num_layers
        rows.append(
            {
                "device": device.type, "tokens": n, "kept_after_layer": kept, "layer": layer,
                "dense_s": round(dense_t, 4), "pruned_s": round(pruned_t, 4), "ideal_s": round(ideal_t, 4),
                "speedup": round(dense_t / pruned_t, 3), "ideal_speedup": round(dense_t / ideal_t, 3),
                "fraction_of_ideal": round(ideal_t / pruned_t, 3),
                "savings_fraction_of_ideal": round((dense_t - pruned_t) / (dense_t - ideal_t), 3),
                "flops_ratio": round(pruned_flops / dense_flops, 4),
                "dense_gflops": round(dense_flops / 1e9, 2), "pruned_gflops": round(pruned_flops / 1e9, 2),
            }
        )
        print_table(rows[-1:], header=len(rows) == 1)
    return rows


COLUMNS = ["device", "tokens", "kept_after_layer", "dense_s", "pruned_s", "ideal_s", "speedup", "ideal_speedup",
           "fraction_of_ideal", "savings_fraction_of_ideal", "flops_ratio"]


def print_table(rows, header=True):
    if header:
        print(" | ".join(COLUMNS))
    for r in rows:
        print(" | ".join(str(r[c]) for c in COLUMNS), flush=True)


def deit_small(device, dtype):
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    cfg = DeiTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                     image_size=224, patch_size=16, num_labels=1000)
    return DeiTForImageClassification(cfg).eval().to(device=device, dtype=dtype)


def flops_cut(model, pruner) -> float:
    """1 - counted FLOPs ratio of ``pruner`` on one image."""
    x = torch.zeros(1, 3, 224, 224, device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    handle = prune(model, pruner)
    model(x)
    ratio = handle.stats.flops_ratio
    handle.remove()
    return 1 - ratio


def keep_for_cut(model, make, cut: float) -> float:
    """The keep ratio whose counted FLOPs cut is closest to ``cut`` (bisection on one image)."""
    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops_cut(model, make(mid)) > cut else (lo, mid)
    return round((lo + hi) / 2, 4)


def r_for_cut(model, make, cut: float, top: int = 32) -> int:
    """The integer r whose counted FLOPs cut is closest to ``cut``."""
    return min(range(1, top + 1), key=lambda r: abs(flops_cut(model, make(r)) - cut))


@torch.no_grad()
def bench_vit(batch=16, cut=0.347, repeats=3, device=None) -> list[dict]:
    from .. import RandomDrop, ToMe, ZeroTPrune

    device = pick_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = deit_small(device, dtype)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    schedules = {
        "zero-tprune": lambda k: ZeroTPrune(layer=(3, 6, 9), keep_ratio=k),
        "tome-geometric": lambda k: ToMe(layer=tuple(range(12)), keep_ratio=k),
    }
    pruners = {name: make(keep_for_cut(model, make, cut)) for name, make in schedules.items()}
    constant_r = lambda r: ToMe(layer=tuple(range(12)), r=r)  # noqa: E731  ToMe's own schedule
    pruners["tome-r"] = constant_r(r_for_cut(model, constant_r, cut))
    # the same token counts as Zero-TPrune with (almost) free scoring: what the engine alone costs
    floor = pruners["zero-tprune"]
    pruners["random"] = RandomDrop(layer=floor.layer, keep_ratio=floor.keep_ratio, segment="visual",
                                   protect_first=0, protect_last=0)

    def run_with(pruner):
        def fn():
            with pruning(model, pruner):
                model(x)
        return fn

    times = interleaved({"dense": lambda: model(x), **{n: run_with(p) for n, p in pruners.items()}}, repeats, device)
    dense_t = times["dense"]
    rows = [{"device": device.type, "method": "dense", "batch": batch, "images_per_s": round(batch / dense_t, 2),
             "flops_cut": 0.0, "throughput_gain": 0.0, "ideal_gain": 0.0, "gain_minus_ideal": 0.0}]
    for name, pruner in pruners.items():
        t = times[name]
        setting = f"r={pruner.r}" if name == "tome-r" else f"keep={pruner.keep_ratio}"
        cut_here = flops_cut(model, pruner)
        ideal = 1 / (1 - cut_here) - 1
        gain = dense_t / t - 1
        rows.append({"device": device.type, "method": f"{name}({setting})", "batch": batch,
                     "images_per_s": round(batch / t, 2), "flops_cut": round(cut_here, 4),
                     "throughput_gain": round(gain, 4), "ideal_gain": round(ideal, 4),
                     "gain_minus_ideal": round(gain - ideal, 4)})
    rows.append({"device": "paper (DeiT-S, GPU, batch 256)", "method": "Zero-TPrune", "batch": 256,
                 "images_per_s": None, "flops_cut": 0.347, "throughput_gain": 0.453,
                 "ideal_gain": round(1 / (1 - 0.347) - 1, 4), "gain_minus_ideal": round(0.453 - (1 / 0.653 - 1), 4)})
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    return rows


# ---- lvlm: LLaVA-1.5 shape ------------------------------------------------------------------
IMAGE_TOKEN = 32000  # llava-hf's <image> id
#: llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 tower (features of its second-to-last layer, CLS
#: dropped: 576 tokens), 2-layer GELU MLP projector, Llama-2-7B decoder (32000 words plus the
#: checkpoint's added tokens, padded to 32064).
LLAVA_7B = {
    "vision": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                   num_hidden_layers=24, num_attention_heads=16),
    "text": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32),
}
#: What the CPU times: LLaVA-7B's prompt layout and depths, widths cut 8x so a prefill takes seconds
LLAVA_CPU = {
    "vision": dict(LLAVA_7B["vision"], hidden_size=128, intermediate_size=512, num_attention_heads=2),
    "text": dict(LLAVA_7B["text"], hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                 num_key_value_heads=8),
}
#: LLaVA-7B's layout and decoder depth at a width where a prefill is cheap: the real adapter runs
#: here to give the kept tokens per layer (and cached keys) of the 7B accounting
LLAVA_COUNT = {
    "vision": dict(LLAVA_7B["vision"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=1),
    "text": dict(LLAVA_7B["text"], hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=2),
}
#: options the bench sets besides the budget: trained modules fit their testbed, not random weights
LVLM_OPTIONS = {"atp": dict(checkpoint=None)}


def llava(shape: dict, device="cpu", dtype=torch.float32, attn="sdpa", seed=0):
    """A random LlavaForConditionalGeneration of ``shape`` (``device="meta"``: no weights at all)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(**shape["vision"]),
                         text_config=LlamaConfig(**shape["text"], max_position_embeddings=4096, pad_token_id=0),
                         image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).eval()
    return model.to(dtype)


def llava_prompt(model, text: int = 60, before: int = 35) -> dict:
    """One LLaVA-1.5 prompt: bos + system prompt + "USER:" (``before`` tokens), the image's
    tokens, then the question and " ASSISTANT:" (``text`` text tokens in all); random ids."""
    vc = model.config.vision_config
    visual = (vc.image_size // vc.patch_size) ** 2
    before = min(before, text // 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, IMAGE_TOKEN, (1, text + visual), generator=g)
    ids[0, 0] = 1
    ids[0, before:before + visual] = IMAGE_TOKEN
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
    p = next(model.parameters())
    return dict(input_ids=ids.to(p.device), pixel_values=pixels.to(p.device, p.dtype), logits_to_keep=1)


def lvlm_methods(names=None) -> list[str]:
    """``names``, or every registered method that goes to an LVLM's decoder by default."""
    if names:
        return list(names)
    return [n for n in list_pruners() if build_pruner(n, **LVLM_OPTIONS.get(n, {})).resolved_target() == "language"]


def visual_kept(stats, text: int) -> int:
    """Visual tokens entering the last decoder layer (row 0)."""
    return stats.tokens_per_layer[-1][0] - text


def run_pruned(model, pruner, inputs):
    """(stats, cached keys per layer) of one prefill under ``pruner``."""
    with pruning(model, pruner) as handle:
        out = model(**inputs, use_cache=True)
        stats = handle.stats
    return stats, [layer.get_seq_length() for layer in out.past_key_values.layers]


def lvlm_pruner(model, name: str, prune: float, inputs, text: int):
    """``name`` (a method, or a spec with options: ``random:layer=0``) on the decoder's visual
    tokens, its ``keep_ratio`` set so that ``prune`` of the visual tokens are gone after its last
    layer; the method's own defaults otherwise.

    ``keep_ratio`` means that share for single-layer and budgeted methods; for per-stage ratios
    (progressive schedules) it is found by bisection on the kept count.
    """
    from .runner import MethodSpec

    spec = MethodSpec.parse(name)
    name = spec.name
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    target = visual - int(visual * prune + 0.5)
    fields = {f.name for f in dataclasses.fields(type(build_pruner(name, **LVLM_OPTIONS.get(name, {}))))}
    if "keep_ratio" not in fields:
        raise TokenPruneError(f"{name} has no keep_ratio: the bench cannot set its budget")

    def make(keep):
        options = dict(segment="visual", protect_first=0, protect_last=0, target="language",
                       **LVLM_OPTIONS.get(name, {}))
        options.update(spec.overrides, keep_ratio=keep)
        return build_pruner(name, **{k: v for k, v in options.items() if k in fields})

    def kept(keep):
        return visual_kept(run_pruned(model, make(keep), inputs)[0], text)

    keep, tolerance = round(1 - prune, 6), max(1, visual // 100)
    best = (abs(kept(keep) - target), keep)
    if best[0] and kept(0.0) > target + tolerance:
        raise TokenPruneError(f"{name} cannot prune {prune:.0%} of the visual tokens with its schedule "
                              f"(keep_ratio=0 leaves {kept(0.0)} of {visual}, target {target})")
    lo, hi = 0.0, 1.0
    for _ in range(14):
        if best[0] == 0:
            break
        mid = (lo + hi) / 2
        got = kept(mid)
        best = min(best, (abs(got - target), round(mid, 6)))
        lo, hi = (mid, hi) if got < target else (lo, mid)
    if best[0] > tolerance:
        raise TokenPruneError(f"{name} cannot prune {prune:.0%} of the visual tokens: the closest keep_ratio "
                              f"leaves {best[0]} tokens off the target {target} of {visual}")
    return make(best[1])


class SelectTimer:
    """Seconds spent in a pruner's ``select`` (its scoring: attention recomputed, tower facts,
    top-k) during one forward; times a copy, so the pruners timed in turns are not touched."""

    def __init__(self, pruner, device):
        self.pruner, self.seconds = copy.copy(pruner), 0.0
        select = self.pruner.select

        def timed_select(state):
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = select(state)
            sync()
            self.seconds += time.perf_counter() - t0
            return out

        self.pruner.select = timed_select


def scoring_seconds(model, pruner, inputs, repeats, device) -> float:
    spent = []
    for _ in range(repeats):
        timer = SelectTimer(pruner, device)
        with pruning(model, timer.pruner):
            model(**inputs)
        spent.append(timer.seconds)
    return statistics.median(spent)


def layer_flops_counted(layer, rotary, n: int) -> int:
    """flop_counter's count of one (meta) decoder layer on ``n`` tokens."""
    from .metrics import count_flops

    p = next(layer.parameters())
    x = torch.zeros(1, n, p.shape[-1], device=p.device, dtype=p.dtype)
    rope = rotary(x, torch.arange(n, device=p.device)[None])
    return count_flops(lambda: layer(x, attention_mask=None, position_embeddings=rope))


def llava7b_accounting(methods, prunes, text=60, kv_dtype_bytes=2) -> dict:
    """Exact FLOPs and KV-cache bytes of a LLaVA-1.5-7B prefill, dense vs each method.

    The engine reads token counts (data-dependent), so meta tensors cannot run through the
    pruning path: the real adapter runs on ``LLAVA_COUNT`` (the 7B's layout and depth, narrow
    widths) and gives the tokens entering each layer and the keys each layer caches; the FLOPs
    are ``flop_counter`` on the dense meta 7B model's tower + projector, on one decoder layer at
    each kept count, and on the LM head (one position, as prefill computes), next to the
    adapter's analytic count (``decoder_layer_flops``). KV bytes: cached keys x the 7B's
    per-token K+V bytes (fp16 by default).
    """
    from .metrics import count_flops

    counter = llava(LLAVA_COUNT)
    inputs = llava_prompt(counter, text)
    meta = llava(LLAVA_7B, device="meta", attn="eager")
    cfg = meta.config.text_config
    lm = meta.model.language_model
    vc = meta.config.vision_config
    pixels = torch.zeros(1, 3, vc.image_size, vc.image_size, device="meta")
    with torch.no_grad():
        tower = count_flops(lambda: meta.model.get_image_features(pixel_values=pixels))
        head = count_flops(lambda: meta.lm_head(torch.zeros(1, 1, cfg.hidden_size, device="meta")))
        per_layer = {}

        def layer_flops(n):
            if n not in per_layer:
                per_layer[n] = layer_flops_counted(lm.layers[0], lm.rotary_emb, n)
            return per_layer[n]

        kv_per_token = kv_bytes_per_token(cfg, kv_dtype_bytes)
        N = inputs["input_ids"].shape[1]
        L = cfg.num_hidden_layers

        def entry(method, prune, tokens, cached, config=None):
            decoder = sum(layer_flops(n) for n in tokens)
            return {"method": method, "visual_pruned": prune, "config": config,
                    "tokens_per_layer": tokens, "cached_keys_per_layer": cached,
                    "visual_kept": tokens[-1] - text,
                    "decoder_flops": decoder, "decoder_flops_analytic": sum(decoder_layer_flops(cfg, n, n) for n in tokens),
                    "ttft_flops": tower + decoder + head, "kv_bytes": sum(cached) * kv_per_token}

        rows = [entry("dense", 0.0, [N] * L, [N] * L)]
        skipped = {}
        for name in methods:
            for prune in prunes:
                try:
                    pruner = lvlm_pruner(counter, name, prune, inputs, text)
                except TokenPruneError as e:
                    skipped[f"{name}@{prune}"] = str(e)
                    continue
                stats, cached = run_pruned(counter, pruner, inputs)
                row = entry(name, prune, [r[0] for r in stats.tokens_per_layer], cached, pruner.to_dict())
                # the adapter's own KV accounting, at the 7B's per-token bytes
                counted = kv_bytes_per_token(counter.config.text_config, next(counter.parameters()).element_size())
                row["kv_bytes_adapter"] = stats.kv_bytes // counted * kv_per_token
                rows.append(row)
    dense = rows[0]
    for r in rows:
        r["ttft_flops_ratio"] = round(r["ttft_flops"] / dense["ttft_flops"], 4)
        r["decoder_flops_ratio"] = round(r["decoder_flops"] / dense["decoder_flops"], 4)
        r["kv_ratio"] = round(r["kv_bytes"] / dense["kv_bytes"], 4)
    return {"shape": LLAVA_7B, "kv_dtype_bytes": kv_dtype_bytes, "tower_projector_flops": tower,
            "lm_head_flops": head, "prompt_tokens": N, "visual_tokens": N - text, "text_tokens": text,
            "rows": rows, "skipped": skipped,
            "note": "meta tensors cannot run through the pruning path (the engine reads token counts); kept "
                    "counts per layer come from the real adapter on a narrow model with the 7B's layout and "
                    "depth, FLOPs from flop_counter on the dense meta 7B model at those counts"}


@torch.no_grad()
def bench_lvlm(methods=None, prunes=(0.75, 0.9), text=60, repeats=5, device=None, shape=None,
               accounting=True) -> dict:
    """Time to first token of a LLaVA-1.5-shaped model (random weights), dense vs each method.

    The ideal is the dense model's own time at the kept counts: the dense prefill minus, for
    each decoder layer, what the dense decoder saves per layer at that layer's kept count
    (the decoder alone, timed at each count in the same turns, divided by its depth).
    """
    from tqdm.auto import tqdm

    device = pick_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shape = shape or LLAVA_CPU
    model = llava(shape, dtype=dtype).to(device)
    inputs = llava_prompt(model, text)
    N = inputs["input_ids"].shape[1]
    L = model.config.text_config.num_hidden_layers
    names = lvlm_methods(methods)

    pruners, skipped = {}, {}
    for name in tqdm(names, desc="budgets", leave=False):
        for prune in prunes:
            try:
                pruners[(name, prune)] = lvlm_pruner(model, name, prune, inputs, text)
            except TokenPruneError as e:  # cannot run on an LVLM, or not at this budget: listed, not timed
                skipped[f"{name}@{prune}"] = str(e)
    runs = {key: run_pruned(model, p, inputs)[0] for key, p in pruners.items()}

    lm = model.model.language_model
    embeds = torch.randn(1, N, model.config.text_config.hidden_size, device=device, dtype=dtype)
    counts = sorted({N} | {r[0] for s in runs.values() for r in s.tokens_per_layer})

    def with_pruner(p):
        def fn():
            with pruning(model, p):
                model(**inputs)
        return fn

    fns = {"dense": lambda: model(**inputs)}
    fns.update({f"{n}@{p}": with_pruner(pr) for (n, p), pr in pruners.items()})
    fns.update({f"decoder@{n}": (lambda n=n: lm(inputs_embeds=embeds[:, :n])) for n in counts})
    bar = tqdm(total=len(fns) * (repeats + 1), desc="timing in turns", leave=False)

    def ticking(fn):
        def run():
            fn()
            bar.update()
        return run

    times = interleaved({k: ticking(f) for k, f in fns.items()}, repeats, device)
    bar.close()
    dense_t = times["dense"]
    rows = [{"method": "dense", "visual_pruned": 0.0, "visual_kept": N - text, "tokens_per_layer": [N] * L,
             "dense_s": round(dense_t, 4), "pruned_s": round(dense_t, 4), "ideal_s": round(dense_t, 4)}]
    for (name, prune), pruner in tqdm(pruners.items(), desc="scoring", leave=False):
        stats = runs[(name, prune)]
        t = times[f"{name}@{prune}"]
        tokens = [r[0] for r in stats.tokens_per_layer]
        ideal = dense_t - sum(times[f"decoder@{N}"] - times[f"decoder@{n}"] for n in tokens) / L
        scoring = scoring_seconds(model, pruner, inputs, repeats, device)
        rows.append({
            "method": name, "visual_pruned": prune, "visual_kept": visual_kept(stats, text), "config": pruner.to_dict(),
            "tokens_per_layer": tokens, "dense_s": round(dense_t, 4), "pruned_s": round(t, 4), "ideal_s": round(ideal, 4),
            "speedup": round(dense_t / t, 3), "ideal_speedup": round(dense_t / ideal, 3),
            "fraction_of_ideal": round(ideal / t, 3),
            "savings_fraction_of_ideal": round((dense_t - t) / (dense_t - ideal), 3) if dense_t > ideal else None,
            "scoring_s": round(scoring, 4), "scoring_share_of_dense": round(scoring / dense_t, 4),
            "overhead_share_of_dense": round((t - ideal) / dense_t, 4),
            "flops_ratio": round(stats.flops_ratio, 4), "kv_ratio": round(stats.kv_ratio, 4),
        })
    cols = ["method", "visual_pruned", "visual_kept", "pruned_s", "ideal_s", "speedup", "ideal_speedup",
            "savings_fraction_of_ideal", "scoring_share_of_dense", "overhead_share_of_dense"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "-")) for c in cols), flush=True)
    result = {
        "device": device.type, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "repeats": repeats, "shape": shape, "prompt_tokens": N, "visual_tokens": N - text, "text_tokens": text,
        "decoder_s": {str(n): round(times[f"decoder@{n}"], 4) for n in counts},
        "rows": rows, "skipped": skipped,
    }
    if accounting:
        timed = list(dict.fromkeys(name for name, _ in pruners))
        result["llava_7b"] = acc = llava7b_accounting(timed, prunes, text)
        cols = ["method", "visual_pruned", "visual_kept", "ttft_flops_ratio", "decoder_flops_ratio", "kv_ratio"]
        print("\nLLaVA-1.5-7B: " + " | ".join(cols))
        for r in acc["rows"]:
            print(" | ".join(str(r[c]) for c in cols), flush=True)
    return result


SKIP_METHODS = ["shortgpt", "skip-rank", "skip-random", "ftp", "ftp:schedule=searched", "ftp:static=true",
                "ftp:route_generated=true"]


def routing_only(pruner):
    """A copy of ``pruner`` that computes its routing (``select``) and then skips nothing, so its
    prefill time above dense is the cost of choosing: features, scores and the hooks that capture
    what ``select`` reads."""
    p = copy.copy(pruner)
    select = p.select

    def route_and_keep_all(state):
        select(state)
        return None

    p.select = route_and_keep_all
    return p


@torch.no_grad()
def bench_skip(methods=None, sparsity=0.3, length=512, new_tokens=16, repeats=3, device=None) -> dict:
    """SmolLM2-135M prefill (``length`` tokens) and per-token decode (``new_tokens`` greedy steps
    after it), dense vs each skip method at ``sparsity``, in turns.

    Prefill ideal: the dense model's own time at each layer's token count (the decoder timed at
    the routed count, a block no token runs costs nothing), as for ``lvlm``. Decode ideal: the
    dense step's time times the step's FLOPs ratio, the LM head's ``2 * hidden * vocab`` per token
    included (it is never skipped). ``prefill_flop_ideal_speedup``: dense over routed FLOPs.
    ``routing_share_of_dense``: time in the methods' ``select`` (attention recomputed, ranks,
    hashes) over the dense prefill; the rest of the gap to the ideal is the engine's (gathers,
    masks, hook calls). ``routing_overhead``: the prefill with the method's routing computed but
    nothing skipped (``RoutingOnly``), minus dense, over dense: what choosing costs, hooks included.
    """
    from tqdm.auto import tqdm

    device = pick_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tok = zoo.load("smollm2-135m", dtype=dtype)
    model.to(device)
    cfg = model.config
    L = cfg.num_hidden_layers
    ids = token_block(tok, length).to(device)
    names = methods or SKIP_METHODS
    pruners = {name: build_pruner(name.split(":")[0], sparsity=sparsity, **_options(name)) for name in names}

    def prefill(p=None):
        def fn():
            if p is None:
                return model(ids, logits_to_keep=1)
            with pruning(model, p):
                return model(ids, logits_to_keep=1)
        return fn

    def decode(p=None):
        """Seconds per decode step (the prefill before them is not timed) and the handle's stats."""
        def fn():
            handle = prune(model, p) if p is not None else None
            try:
                out = model(ids, use_cache=True, logits_to_keep=1)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                before = (handle.stats.flops, handle.stats.dense_flops) if handle else (0, 0)
                t0 = time.perf_counter()
                for _ in range(new_tokens):
                    out = model(nxt, past_key_values=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                fn.seconds = (time.perf_counter() - t0) / new_tokens
                fn.stats = (handle.stats.flops - before[0], handle.stats.dense_flops - before[1]) if handle else None
            finally:
                if handle is not None:
                    handle.remove()
        return fn

    runs = {}
    for name, p in pruners.items():
        with pruning(model, p) as h:
            model(ids, logits_to_keep=1)
            runs[name] = h.stats
    counts = sorted({length} | {r[0] for s in runs.values() for r in s.tokens_per_layer if r[0] > 0})
    base = model.model
    fns = {"dense": prefill()}
    fns.update({f"prefill:{n}": prefill(p) for n, p in pruners.items()})
    fns.update({f"routing:{n}": prefill(routing_only(p)) for n, p in pruners.items()})
    fns.update({f"decoder@{n}": (lambda n=n: base(ids[:, :n])) for n in counts})
    decoders = {"dense": decode()}
    decoders.update({n: decode(p) for n, p in pruners.items()})
    fns.update({f"decode:{n}": f for n, f in decoders.items()})
    bar = tqdm(total=len(fns) * (repeats + 1), desc="timing in turns", leave=False)

    def ticking(fn):
        def run():
            out = fn()
            bar.update()
            return out
        return run

    steps = {k: [] for k in decoders}

    def recording(k, f):
        def run():
            f()
            steps[k].append(f.seconds)
        return run

    times = interleaved({k: ticking(recording(k.split(":", 1)[1], f) if k.startswith("decode:") else f)
                         for k, f in fns.items()}, repeats, device)
    bar.close()
    step_t = {k: statistics.median(v[1:]) for k, v in steps.items()}  # (the warm-up run dropped)
    dense_t, dense_step = times["dense"], step_t["dense"]
    head = 2 * cfg.hidden_size * cfg.vocab_size
    rows = [{"method": "dense", "prefill_s": round(dense_t, 4), "decode_ms": round(1000 * dense_step, 2)}]
    for name, pruner in pruners.items():
        stats = runs[name]
        t = times[f"prefill:{name}"]
        tokens = [r[0] for r in stats.tokens_per_layer]
        full = times[f"decoder@{length}"]
        ideal = dense_t - sum(full - (times[f"decoder@{n}"] if n else 0.0) for n in tokens) / L
        routing = scoring_seconds(model, pruner, {"input_ids": ids, "logits_to_keep": 1}, repeats, device)
        flops, dense_flops = decoders[name].stats
        decode_ratio = (flops + head * new_tokens) / (dense_flops + head * new_tokens)
        step, ideal_step = step_t[name], dense_step * decode_ratio
        flop_ideal = 1 / stats.flops_ratio
        rows.append({
            "method": name, "config": pruner.to_dict(), "tokens_per_layer": tokens,
            "prefill_flops_ratio": round(stats.flops_ratio, 4), "kv_ratio": round(stats.kv_ratio, 4),
            "prefill_s": round(t, 4), "prefill_ideal_s": round(ideal, 4),
            "prefill_speedup": round(dense_t / t, 3), "prefill_ideal_speedup": round(dense_t / ideal, 3),
            "prefill_flop_ideal_speedup": round(flop_ideal, 3),
            "prefill_speedup_share_of_flop_ideal": round(dense_t / t / flop_ideal, 3),
            "prefill_savings_fraction_of_ideal": round((dense_t - t) / (dense_t - ideal), 3) if dense_t > ideal else None,
            "routing_share_of_dense": round(routing / dense_t, 4),
            "routing_only_s": round(times[f"routing:{name}"], 4),
            "routing_overhead": round(times[f"routing:{name}"] / dense_t - 1, 4),
            "decode_ms": round(1000 * step, 2), "decode_ideal_ms": round(1000 * ideal_step, 2),
            "decode_flops_ratio": round(decode_ratio, 4),
            "decode_speedup": round(dense_step / step, 3), "decode_ideal_speedup": round(dense_step / ideal_step, 3),
        })
    cols = ["method", "prefill_flops_ratio", "prefill_s", "prefill_speedup", "prefill_ideal_speedup",
            "prefill_flop_ideal_speedup", "prefill_speedup_share_of_flop_ideal", "prefill_savings_fraction_of_ideal",
            "routing_overhead", "routing_share_of_dense", "decode_ms", "decode_speedup", "decode_ideal_speedup"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "-")) for c in cols), flush=True)
    return {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "repeats": repeats, "prompt_tokens": length, "new_tokens": new_tokens, "sparsity": sparsity,
            "decoder_s": {str(n): round(times[f"decoder@{n}"], 4) for n in counts}, "rows": rows}


def _options(spec: str) -> dict:
    """``name:key=value,...`` -> options (numbers parsed), as ``tokenprune eval`` specs."""
    if ":" not in spec:
        return {}
    out = {}
    for item in spec.split(":", 1)[1].split(","):
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tokenprune.evals.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=["llm", "vit", "lvlm", "skip"], help="which benchmark")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--layer", type=int, default=4, help="first layer that runs on the pruned set")
    ap.add_argument("--keep", type=float, default=0.5, help="share of prompt tokens kept")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--batch", type=int, default=None, help="vit: images per batch (default 256 on GPU, 16 on CPU)")
    ap.add_argument("--flops-cut", type=float, default=0.347, help="vit: FLOPs cut to match (paper: 34.7%%)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="lvlm: methods to time (default: every registered method for an LVLM decoder)")
    ap.add_argument("--prunes", type=float, nargs="+", default=[0.75, 0.9], help="lvlm: shares of visual tokens pruned")
    ap.add_argument("--text", type=int, default=60, help="lvlm: text tokens per prompt (plus 576 visual)")
    ap.add_argument("--accounting-only", action="store_true",
                    help="lvlm: only the exact LLaVA-1.5-7B FLOPs / KV accounting (no timing)")
    ap.add_argument("--sparsity", type=float, default=0.3, help="skip: share of token-block computations skipped")
    ap.add_argument("--new-tokens", type=int, default=16, help="skip: decode steps timed")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.family == "lvlm" and args.accounting_only:
        rows = llava7b_accounting(lvlm_methods(args.methods), tuple(args.prunes), args.text)
        rows["command"] = " ".join(["python -m tokenprune.evals.bench", *(argv if argv is not None else sys.argv[1:])])
        cols = ["method", "visual_pruned", "visual_kept", "ttft_flops_ratio", "decoder_flops_ratio", "kv_ratio"]
        print("LLaVA-1.5-7B: " + " | ".join(cols))
        for r in rows["rows"]:
            print(" | ".join(str(r[c]) for c in cols), flush=True)
    elif args.family == "lvlm":
        rows = bench_lvlm(args.methods, tuple(args.prunes), args.text, args.repeats, args.device)
        rows["command"] = " ".join(["python -m tokenprune.evals.bench", *(argv if argv is not None else sys.argv[1:])])
    elif args.family == "skip":
        rows = bench_skip(args.methods, args.sparsity, args.lengths[0] if args.lengths != [1024, 2048] else 512,
                          args.new_tokens, args.repeats, args.device)
        rows["command"] = " ".join(["python -m tokenprune.evals.bench", *(argv if argv is not None else sys.argv[1:])])
    elif args.family == "vit":
        batch = args.batch or (256 if pick_device(args.device).type == "cuda" else 16)
        rows = bench_vit(batch, args.flops_cut, args.repeats, args.device)
    else:
        rows = bench_llm(args.lengths, args.layer, args.keep, args.repeats, args.device)
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
