"""Soak: thousands of requests through one decoder and one encoder, pruners attached and removed.

    python -m tokenprune.evals.soak [--requests 3000] [--seed 0] [--samples 30] [--out results/soak]

Each session attaches a pruner (every registered method that runs on the family, at several
layers / keep ratios, decoders with and without renumbered positions), serves a few requests
(forward with or without a cache, greedy ``generate``, beam search, a segment override),
then removes it. Throughout it checks what a long-running server needs:

- resident memory (RSS) sampled along the run: after warm-up it must not grow beyond a small
  bound (``--rss-bound-mb``);
- nothing of a request outlives it: weak references to each request's outputs and KV cache
  are dead as soon as the caller drops them, and no per-request engine object (token state,
  stream, reductions, the decoder's request / call records) is alive between requests;
- ``remove()`` leaves no hook on any module, and the dense model gives its exact outputs again.

Tiny random models built from config dicts (the checks are about the engine, not quality).
Prints a table of RSS samples and a verdict; exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys
import time
import warnings
import weakref
from contextlib import nullcontext

import psutil
import torch
import transformers as T
from tqdm import tqdm

from .. import TokenPruneError, build_pruner, list_pruners, prune, pruning
from ..adapters import stream as stream_module
from ..reductions import Reduction
from ..state import Segment, TokenState

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=None, bos_token_id=1,
             attn_implementation="sdpa")
VIT = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
           intermediate_size=128, num_labels=10, attn_implementation="sdpa")
SETTINGS = [dict(layer=1, keep_ratio=0.5), dict(layer=2, keep_ratio=0.3), dict(layer=[1, 3], keep_ratio=0.7),
            dict(layer=2, keep_ratio=1.0), dict(layer=3, keep_ratio=0.0)]


def tiny_models(seed: int = 0):
    torch.manual_seed(seed)
    decoder = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).eval()
    decoder.generation_config.pad_token_id = 0
    encoder = T.ViTForImageClassification(T.ViTConfig(**VIT)).eval()
    return decoder, encoder


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def per_request_objects() -> dict[str, int]:
    """Engine objects that belong to one request; none may be alive between requests."""
    from ..adapters import decoder as dec

    kinds = (TokenState, stream_module.Stream, Reduction, dec.Request, dec.Call)
    alive: dict[str, int] = {}
    with warnings.catch_warnings():  # isinstance on some torch module objects warns about deprecations
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, kinds):
                alive[type(obj).__name__] = alive.get(type(obj).__name__, 0) + 1
    return alive


def pruner_pool(model, probe, segment: str, rng: random.Random):
    """Every registered method x SETTINGS that builds and runs on ``model`` (others are listed as skipped)."""
    pool, skipped = [], {}
    for name in list_pruners():
        for setting in SETTINGS:
            try:
                fields = {f.name for f in dataclasses.fields(build_pruner(name))}
                config = {k: v for k, v in {**setting, "segment": segment}.items() if k in fields}
                pruner = build_pruner(name, **config)
                with torch.no_grad(), pruning(model, pruner):
                    probe()
                pool.append(pruner)
            except TokenPruneError as e:  # made for another family (e.g. an LVLM's tower, a U-Net)
                skipped[name] = str(e)[:80]
    rng.shuffle(pool)
    return pool, {k: v for k, v in skipped.items() if all(p.name != k for p in pool)}


class Soak:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.decoder, self.encoder = tiny_models(seed)
        self.leaks: list[str] = []
        self.needed_gc = 0  # requests whose objects died only in a cycle collection (HF internals)
        self.requests = 0

    # ---- one request, checked: what the caller drops must die ---------------------------
    def expect_gone(self, refs, what):
        if any(r() is not None for r in refs):
            gc.collect()
            self.needed_gc += 1
            if any(r() is not None for r in refs):
                self.leaks.append(f"request {self.requests}: {what} still alive after the caller dropped it")

    def decoder_request(self, handle):
        B = self.rng.randint(1, 3)
        lengths = [self.rng.randint(4, 40) for _ in range(B)]
        N = max(lengths)
        ids = torch.randint(2, 128, (B, N), generator=self.gen)
        mask = torch.zeros(B, N, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, N - n:] = 1
        ids = ids.masked_fill(mask == 0, 0)
        kind = self.rng.choice(["forward", "forward-cache", "generate", "generate", "beams", "segments"])
        with torch.no_grad():
            if kind in ("forward", "forward-cache"):
                out = self.decoder(ids, attention_mask=mask, use_cache=kind == "forward-cache")
                refs = [weakref.ref(out.logits)] + ([weakref.ref(out.past_key_values)] if out.past_key_values else [])
            elif kind == "beams":
                out = self.decoder.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False,
                                            return_dict_in_generate=True)
                refs = [weakref.ref(out.sequences), weakref.ref(out.past_key_values)]
            else:
                segments = None
                if kind == "segments":  # a marked visual span, as an LVLM would hand over
                    segments = torch.where(mask.bool(), int(Segment.TEXT), int(Segment.PAD))
                    segments[:, N - min(lengths) + 1: N - 2] = int(Segment.VISUAL)
                with handle.segments(segments) if segments is not None else nullcontext():
                    out = self.decoder.generate(ids, attention_mask=mask, max_new_tokens=self.rng.randint(1, 4),
                                                do_sample=False, return_dict_in_generate=True)
                refs = [weakref.ref(out.sequences), weakref.ref(out.past_key_values)]
        del out
        self.expect_gone(refs, f"decoder {kind} output / KV cache")

    def encoder_request(self):
        x = torch.randn(self.rng.randint(1, 4), 3, 32, 32, generator=self.gen)
        with torch.no_grad():
            out = self.encoder(x)
        refs = [weakref.ref(out.logits)]
        del out
        self.expect_gone(refs, "encoder output")

    # ---- sessions: attach, serve a few requests, remove ----------------------------------
    def session(self, model, pool, request, renumber: bool):
        pruner = self.rng.choice(pool)
        options = dict(renumber_positions=renumber) if model is self.decoder else {}
        if self.rng.random() < 0.5:
            handle = prune(model, pruner, **options)
            try:
                for _ in range(self.rng.randint(1, 8)):
                    request(handle)
                    self.requests += 1
            finally:
                handle.remove()
        else:
            with pruning(model, pruner, **options) as handle:
                for _ in range(self.rng.randint(1, 8)):
                    request(handle)
                    self.requests += 1

    def run(self, total: int, samples: int, progress: bool = True):
        dec_ids = torch.randint(2, 128, (2, 24), generator=self.gen)
        pixels = torch.randn(2, 3, 32, 32, generator=self.gen)
        with torch.no_grad():
            dense_dec, dense_enc = self.decoder(dec_ids).logits, self.encoder(pixels).logits
        hooks = hook_count(self.decoder), hook_count(self.encoder)
        dec_pool, dec_skipped = pruner_pool(self.decoder, lambda: self.decoder(dec_ids), "text", self.rng)
        enc_pool, enc_skipped = pruner_pool(self.encoder, lambda: self.encoder(pixels), "visual", self.rng)
        gc.collect()  # from here on, a per-request object alive between requests is a leak or a cycle of ours
        every = max(1, total // samples)
        rows, next_sample = [], 0
        bar = tqdm(total=total, desc="soak", disable=not progress, unit="req")
        start = time.perf_counter()
        while self.requests < total:
            before = self.requests
            if self.rng.random() < 0.7:
                self.session(self.decoder, dec_pool, self.decoder_request, renumber=self.rng.random() < 0.3)
            else:
                self.session(self.encoder, enc_pool, lambda handle: self.encoder_request(), renumber=False)
            if (hook_count(self.decoder), hook_count(self.encoder)) != hooks:
                self.leaks.append(f"request {self.requests}: hooks left after remove()")
            bar.update(self.requests - before)
            if self.requests >= next_sample:
                alive = per_request_objects()
                if alive:
                    self.leaks.append(f"request {self.requests}: per-request objects alive between requests: {alive}")
                rows.append((self.requests, rss_mb()))
                next_sample += every
        bar.close()
        rows.append((self.requests, rss_mb()))
        with torch.no_grad():
            restored = torch.equal(self.decoder(dec_ids).logits, dense_dec) and \
                torch.equal(self.encoder(pixels).logits, dense_enc)
        if not restored:
            self.leaks.append("the dense models' outputs changed after the soak")
        return dict(rows=rows, seconds=time.perf_counter() - start, decoder_pool=len(dec_pool),
                    encoder_pool=len(enc_pool), skipped={**dec_skipped, **enc_skipped}, leaks=self.leaks,
                    needed_gc=self.needed_gc, requests=self.requests)


def verdict(result: dict, rss_bound_mb: float, warmup: float = 0.2) -> tuple[bool, str]:
    """Pass when nothing leaked and RSS after warm-up grew by less than ``rss_bound_mb``."""
    rows = result["rows"]
    after_warmup = [mb for n, mb in rows if n >= warmup * result["requests"]]
    growth = max(after_warmup) - after_warmup[0]
    ok = not result["leaks"] and growth <= rss_bound_mb
    text = (f"{'PASS' if ok else 'FAIL'}: {result['requests']} requests in {result['seconds']:.0f} s; "
            f"RSS {rows[0][1]:.1f} MB at the first sample, {after_warmup[0]:.1f} MB after warm-up "
            f"({int(warmup * 100)}% of requests), max {max(after_warmup):.1f} MB, end {rows[-1][1]:.1f} MB: "
            f"growth after warm-up {growth:.1f} MB (bound {rss_bound_mb:g} MB); "
            f"{len(result['leaks'])} leak(s); hooks left after remove(): "
            f"{sum('hooks left' in x for x in result['leaks'])}")
    return ok, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--samples", type=int, default=30, help="RSS samples along the run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-bound-mb", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="folder for soak.json and rss.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = Soak(args.seed).run(args.requests, args.samples)
    print(f"pruners in rotation: {result['decoder_pool']} decoder configs, {result['encoder_pool']} encoder configs "
          f"(every registered method x {len(SETTINGS)} settings that runs on the family)")
    for name, why in sorted(result["skipped"].items()):
        print(f"  not in rotation: {name}: {why}")
    print("\n| requests | RSS MB |\n|---|---|")
    for n, mb in result["rows"]:
        print(f"| {n} | {mb:.1f} |")
    for leak in result["leaks"][:20]:
        print("LEAK:", leak)
    print(f"\nrequests whose objects needed a cycle collection to die: {result['needed_gc']}")
    ok, text = verdict(result, args.rss_bound_mb)
    print(text)
    if args.out:
        save(result, ok, text, args)
    return 0 if ok else 1


def save(result: dict, ok: bool, text: str, args):
    import json
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    command = "python -m tokenprune.evals.soak " + " ".join(sys.argv[1:])
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump({"command": command, "pass": ok, "verdict": text, **result}, f, indent=1)
    n, mb = zip(*result["rows"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(n, mb, marker=".")
    ax.axvline(0.2 * result["requests"], color="gray", ls=":", label="end of warm-up")
    base = next(m for k, m in result["rows"] if k >= 0.2 * result["requests"])
    ax.axhspan(base, base + args.rss_bound_mb, color="green", alpha=0.08, label="allowed growth")
    ax.set_xlabel("requests served")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(f"soak: {result['requests']} requests, {'PASS' if ok else 'FAIL'}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "rss.png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
