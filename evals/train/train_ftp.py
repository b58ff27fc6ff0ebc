"""Train the FTP router for SmolLM2-135M (the frozen base model is not changed).

Data: Python's documentation topics (``pydoc_data.topics``, shipped with CPython). The topics the
perplexity eval reads (``tokenprune eval --model smollm2-135m``: the first ones in sorted order,
see :func:`text_split`) are held out; of the rest, every ``CALIBRATION_EVERY``-th topic is the
calibration split (``search_ftp.py``'s fitness) and the others are the training split.

Each step draws a total sparsity in [``--min-sparsity``, ``--max-sparsity``] and a per-block
schedule around the uniform one (block 0 dense), runs the model with *soft routing* (hooks of
this script; the library's inference path uses ``Skip``): before block ``i`` the router reads the
same four features as :class:`tokenprune.methods.ftp.FTP` (computed from the previous block's
attention, with the keys of the tokens that skipped it masked) and makes the same hard decisions
(the prompt part: the lowest-logit ``round(s_i * n)`` skip; the last ``--generated`` share of each
sequence plays generated tokens: they and the last prompt token run every block, as ``ftp``'s
default; with ``--route-generated`` they are routed one by one, logit < 0 skips, as
``ftp(route_generated=True)``); a skipped token's key is masked in block ``i``
and its output is ``h + g * (block(h) - h)`` with ``g`` the hard gate whose gradient is the soft
gate's, ``sigmoid(logit)`` (straight-through). Losses:

- distillation: KL(dense || routed) of the next-token distributions where they are used: at the
  generated tail (and the last prompt token), as in generation and in the eval;
- sparsity: squared gap between the share kept by the threshold rule (logit > 0, hard value, soft
  gradient) and the target: with ``--route-generated``, the generated tokens' share over all routed
  blocks against the schedule's mean ``1 - s_i`` (the router picks the blocks where they skip, the
  calibrated threshold then hits the target share); else each block's prompt share (top-k makes
  the share exact; this only anchors the logit's scale);
- guide: binary cross-entropy towards the static attention-rank router (the tokens with the
  highest attention share on the first token skip), weight decaying linearly to 0 over the first
  ``--guide-share`` of the steps.

Writes ``ftp.safetensors``, ``metrics.json`` and a model card (``README.md``) to ``--out``.

    .venv/bin/python evals/train/train_ftp.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import tokenprune as tp  # noqa: E402
from tokenprune.methods.ftp import Router, features, load_router, skip_count  # noqa: E402

OUT_DIR = os.path.join(REPO, "tokenprune", "zoo", "weights", "smollm2-135m", "ftp")
CALIBRATION_EVERY = 6
EVAL_CONTEXT = 512  # PerplexityTask's context ...
EVAL_BLOCK = EVAL_CONTEXT + 128  # ... + scored tokens
EVAL_POOL = 64  # ... and its pool of blocks


def text_split(tokenizer) -> dict[str, list[str]]:
    """Topic keys of ``pydoc_data.topics``: ``held`` (what PerplexityTask reads), ``train``, ``calibration``.

    PerplexityTask tokenises ``held_text(chars)`` (topics in sorted order until ``chars``),
    doubling ``chars`` until it holds ``EVAL_POOL`` blocks; every topic of that text is held out.
    """
    from pydoc_data.topics import topics

    need = EVAL_POOL * EVAL_BLOCK
    chars = 4 * need
    while True:
        keys, size = [], 0
        for key in sorted(topics):
            keys.append(key)
            size += len(topics[key])
            if size >= chars:
                break
        ntok = len(tokenizer("\n".join(topics[k] for k in keys)).input_ids)
        if ntok >= need or chars >= 8_000_000:
            break
        chars *= 2
    rest = [k for k in sorted(topics) if k not in set(keys)]
    return {"held": keys, "calibration": rest[::CALIBRATION_EVERY],
            "train": [k for i, k in enumerate(rest) if i % CALIBRATION_EVERY]}


def token_blocks(tokenizer, keys: list[str], length: int) -> torch.Tensor:
    """(n, length) consecutive token blocks of the topics ``keys``."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n".join(topics[k] for k in keys), return_tensors="pt").input_ids[0]
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


class SoftRouting:
    """Soft FTP routing on a frozen Llama-style model (training only: every block runs on every token).

    ``router``: the MLP; ``schedule``: per-block sparsities (set per step); ``generated``: share of
    each sequence's tail routed one by one (threshold), the rest is the prompt (top-k).
    """

    def __init__(self, model, router: Router, generated: float = 0.2, static: bool = False,
                 route_generated: bool = False):
        self.model, self.router, self.generated, self.static = model, router, generated, static
        self.route_generated = route_generated  # else the tail and the last prompt token run every block
        self.layers = model.model.layers
        self.schedule: list[float] = [0.0] * len(self.layers)
        self.records: list[tuple] = []  # (logit, threshold-keep ST, static keep, routed mask, target) per routed block
        self.keep_rates: list[float] = []
        self._hooks = []
        self._prev = None  # (hidden entering block i-1, its rotary, its key mask)

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def reset(self):
        self.records, self.keep_rates, self._prev, self._gate = [], [], None, None
        self.generated_logits = []
        self.generated_skips = [0, 0]  # (generated token-blocks skipped, generated tokens x blocks)

    @torch.no_grad()
    def sink_share(self, i: int) -> torch.Tensor:
        """(B, n) each token's attention share on token 0 in block i-1 (mean over the router's heads;
        keys that skipped it masked)."""
        hidden, (cos, sin), key_ok = self._prev
        layer = self.layers[i - 1]
        attn = layer.self_attn
        B, n, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(B, n, -1, attn.head_dim)
        k = attn.k_proj(x).view(B, n, -1, attn.head_dim)
        heads = self.router.heads or range(q.shape[2])
        group = q.shape[2] // k.shape[2]
        q, k = q[:, :, list(heads)].transpose(1, 2), k[:, :, [h // group for h in heads]].transpose(1, 2)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = (q * attn.scaling) @ k.transpose(-1, -2)
        visible = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None] & key_ok[:, None, None, :]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).mean(1)
        return probs[:, :, 0]

    def _pre(self, i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            B, n, _ = hidden.shape
            s = self.schedule[i]
            key_ok = torch.ones(B, n, dtype=torch.bool, device=hidden.device)
            self._gate = None
            if i > 0 and s > 0:
                gate, key_ok = self._route(i, hidden, s)
                self._gate = (gate, hidden)
                causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()[None, None]
                visible = causal & key_ok[:, None, None, :]
                kwargs["attention_mask"] = torch.zeros(visible.shape, dtype=hidden.dtype).masked_fill(
                    ~visible, torch.finfo(hidden.dtype).min)
            self._prev = (hidden.detach(), kwargs["position_embeddings"], key_ok)
            return args, kwargs

        return hook

    def _route(self, i, hidden, s):
        B, n, _ = hidden.shape
        dev = hidden.device
        pos = torch.arange(n, device=dev).expand(B, n)
        routed = pos > 0  # token 0 never skips
        start = n - round(self.generated * n)
        generated = routed & (pos >= start)
        prompt = routed & ~generated
        if not self.route_generated:  # as FTP(route_generated=False): the last prompt token runs every block
            prompt &= pos < start - 1
        sink = self.sink_share(i)
        feats = features(sink, pos, prompt, s)
        logit = self.router(feats)
        # as FTP.select: round(s * n) of the row's n prompt tokens, those that always run (the first,
        # and the last unless generated tokens are routed) counted
        k = skip_count(prompt, ~generated & ~prompt, s)
        # the static attention-rank router (the guide): the highest attention shares on the sink skip
        static_skip = prompt & (lowest(-feats[..., 2], prompt) < k[:, None])
        skip = prompt & (lowest(-feats[..., 2] if self.static else logit.detach(), prompt) < k[:, None])
        if not self.route_generated:
            generated = torch.zeros_like(generated)
        elif not self.static:  # generated tokens: one by one, below the threshold (0 while training: the
            # sparsity loss sets their share over all blocks, the router where; calibrated after training)
            skip |= generated & (logit.detach() < self.router.threshold(s))
        self.generated_logits.append(logit.detach()[generated])
        self.generated_skips[0] += int((skip & generated).sum())
        soft = torch.sigmoid(logit)
        gate = torch.where(routed, (~skip).float() + soft - soft.detach(), torch.ones_like(soft))
        thr = (logit > 0).float() + soft - soft.detach()
        self.records.append((logit, thr, ~static_skip, prompt, generated, 1.0 - s))
        self.keep_rates.append(float((~skip)[routed].float().mean()))
        return gate, ~skip

    def _post(self, i):
        def hook(module, args, output):
            if self._gate is None:
                return None
            gate, h = self._gate
            out = output[0] if isinstance(output, tuple) else output
            mixed = h + gate[..., None].to(out.dtype) * (out - h)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    def losses(self):
        """(sparsity, guide). Sparsity: the generated tokens' share kept by the threshold, pooled over
        every routed block, against the schedule's (the prompt's share is exact by top-k); without
        generated tokens, each block's prompt share. Guide: towards the static rule's prompt choice."""
        gen = [(thr[g], target) for _, thr, _, _, g, target in self.records if g.any()]
        if gen:
            kept = torch.cat([k for k, _ in gen])
            target = torch.cat([torch.full_like(k, t) for k, t in gen]).mean()
            sparsity = (kept.mean() - target) ** 2
        else:
            sparsity = torch.stack([(thr[p].mean() - t) ** 2 for _, thr, _, p, _, t in self.records]).mean()
        guide = torch.stack([F.binary_cross_entropy_with_logits(lg[p], st[p].float())
                             for lg, _, st, p, _, _ in self.records]).mean()
        return sparsity, guide


THRESHOLD_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)


@torch.no_grad()
def calibrate_thresholds(model, router: Router, blocks: torch.Tensor, context: int = EVAL_CONTEXT,
                         steps: int = 5, progress: bool = False) -> tuple[list, list]:
    """``Router.thresholds`` and ``Router.static_thresholds``: for each block sparsity ``s`` of
    THRESHOLD_GRID, the keep score below which generated tokens skip so that the share ``s`` of
    their block computations is skipped.

    Measured where the eval scores: through the library (``tp.pruning``, every block >= 1 at ``s``)
    on ``blocks`` whose tokens after ``context`` are marked generated, as PerplexityTask marks its
    scored tokens (``blocks``: training text only). A token's score depends on whether it skipped
    the blocks before (its attention comes from an older state), so the share a cut realises is
    measured, not predicted: bisection over the quantiles of the scores without skipping, ``steps``
    runs per sparsity; the table is then made non-decreasing in ``s``. Static rule: the keep score
    is minus the sink share."""
    from tokenprune.evals.tasks import scored_skips
    from tokenprune.methods.ftp import FTP

    L = model.config.num_hidden_layers
    seg = torch.full(blocks[:1].shape, int(tp.Segment.TEXT))
    seg[:, context:] = int(tp.Segment.GENERATED)
    bar = tqdm(total=2 * (steps + 1) * len(THRESHOLD_GRID) * len(blocks), desc="calibrate thresholds",
               disable=not progress)
    tables, reached = {}, {False: [], True: []}  # (sparsity, share its cut skips) per rule
    for static in (False, True):
        tables[static] = []
        for s in THRESHOLD_GRID:
            pruner = FTP(sparsity=s * (L - 1) / L, checkpoint=None, static=static,  # s in every block >= 1
                         route_generated=True)
            pruner.router = router
            score = pruner.scores

            def realised(cut):
                """(share of generated token-blocks skipped, their scores) under the cut (None: none skip)."""
                table = [] if cut is None else [(0.0, cut)]
                if static:
                    router.static_thresholds = table
                else:
                    router.thresholds = table or [(0.0, float("-inf"))]
                seen = []

                def record(state, sparsity, prompt, positions):
                    out = score(state, sparsity, prompt, positions)
                    seen.append(out[state.valid & (state.segments == int(tp.Segment.GENERATED))])
                    return out

                pruner.scores = record
                skipped = 0
                with tp.pruning(model, pruner) as handle:
                    for x in blocks.split(1):
                        with handle.segments(seg):
                            model(x, use_cache=False)
                        skipped += scored_skips(handle.stats, context, x.shape[1])[0]  # what really skipped
                        bar.update(1)
                return skipped / (len(blocks) * (blocks.shape[1] - context) * (L - 1)), torch.cat(seen)

            _, base = realised(None)
            lo, hi, best = 0.0, 1.0, None
            level = s
            for _ in range(steps):
                cut = float(base.quantile(level))
                got, _ = realised(cut)
                if best is None or abs(got - s) < abs(best[1] - s):
                    best = (cut, got)
                lo, hi = (level, hi) if got < s else (lo, level)
                level = (lo + hi) / 2
            tables[static].append((s, round(best[0], 6)))
            reached[static].append((s, round(best[1], 4)))
        for k in range(1, len(tables[static])):  # non-decreasing: more sparsity never skips fewer
            x, y = tables[static][k]
            tables[static][k] = (x, max(y, tables[static][k - 1][1]))
    router.thresholds, router.static_thresholds = tables[False], tables[True]
    bar.close()
    return router.thresholds, router.static_thresholds, reached


def lowest(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, n) rank of each masked entry from the lowest score (ties: earlier first), as FTP.select ranks."""
    order = score.masked_fill(~mask, float("inf")).argsort(dim=1, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


def sample_schedule(rng: random.Random, total: float, num_layers: int, spread: float) -> list[float]:
    """Block 0 dense; the others uniform times log-normal noise, renormalised to mean ``total``."""
    w = [0.0] + [math.exp(rng.gauss(0.0, spread)) for _ in range(num_layers - 1)]
    for _ in range(5):  # renormalise, capping blocks at 0.9
        scale = total * num_layers / sum(w)
        w = [min(0.9, x * scale) for x in w]
    return w


@torch.no_grad()
def init_static(router: Router, scale: float = 4.0) -> Router:
    """Start the router at the static attention-rank rule: its logit decreases with rank + sink share
    (one path through the MLP carries it), every other weight is a tenth of its random init. Top-k
    on these logits is the static router's choice, and a threshold on them the static rule's for
    generated tokens, so training starts from it, not from chance."""
    for lin in router.net[::2]:
        lin.weight.mul_(0.1)
        lin.bias.mul_(0.1)
    first, mid, last = router.net[0], router.net[2], router.net[4]
    first.weight[0].zero_()
    # rank + sink share (both in [0, 1]) -> GELU's near-linear range: among the prompt the order is
    # the rank's (rank grows with the share), and generated tokens (rank 0.5) are ordered by the share
    first.weight[0, 1], first.weight[0, 2], first.bias[0] = 1.0, 1.0, 2.0
    mid.weight[0].zero_()
    mid.weight[0, 0], mid.bias[0] = 1.0, 0.0
    last.weight[0, 0], last.bias[0] = -scale, scale * 3.0
    return router


def kl_loss(student_logits, teacher_logits):
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def routed_nll(model, soft: SoftRouting, blocks: torch.Tensor, schedule: list[float], share: bool = False):
    """Mean next-token NLL of the routed model's generated tail (hard routing through the training
    hooks; generated tokens by the router's calibrated thresholds): the eval's scored tokens.
    ``share``: also return the share of the generated tokens' block computations skipped."""
    soft.schedule = schedule
    total, count, skipped = 0.0, 0, 0
    for x in blocks.split(1):
        soft.reset()
        start = x.shape[1] - round(soft.generated * x.shape[1]) if soft.generated > 0 else 1
        logits = model(x, use_cache=False).logits[:, start - 1:-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, start:].flatten(), reduction="sum").item()
        count += x.shape[1] - start
        skipped += soft.generated_skips[0]
    if share:
        return total / count, skipped / (count * len(schedule))
    return total / count


def library_eval(model, tok, out: str, budgets, limit: int, progress: bool, token_ids=None) -> list[dict]:
    """Perplexity of 128 tokens after a 512-token context through the library (``tp.pruning`` +
    ``Skip``), as ``tokenprune eval`` runs it: the held-out text, or the ``token_ids`` blocks."""
    from tokenprune.evals.metrics import Meter
    from tokenprune.evals.tasks import PerplexityTask

    task = PerplexityTask(model=model, tokenizer=tok, limit=limit, progress=progress, token_ids=token_ids,
                          context=EVAL_CONTEXT)
    task.setup()
    dense = task.evaluate(Meter(model, None, analytic=True, count=False))
    rows = [dict(method="dense", sparsity=0.0, perplexity=dense.quality, agreement=1.0, flops_rel=1.0,
                 scored_skipped=0.0)]
    rules = (("ftp", False, False), ("ftp static rule", True, False),
             ("ftp, every token routed", False, True), ("ftp static rule, every token routed", True, True))
    for b in budgets:
        for name, static, every in rules:
            s = task.skip_sparsity(b, not every)  # equal compute: the default spends b of the pass on the context
            config = dict(sparsity=s, checkpoint=out, static=static, route_generated=every)
            with tp.pruning(model, tp.build_pruner("ftp", **config)) as h:
                meter = Meter(model, h, analytic=True, count=False)
                r = task.evaluate(meter, h)
            rows.append(dict(method=name, sparsity=b, perplexity=r.quality,
                             agreement=float((r.predictions == dense.predictions).float().mean()),
                             flops_rel=meter.adapter_flops / meter.adapter_dense_flops,
                             scored_skipped=r.extra["scored_skipped"]))
            print(rows[-1], flush=True)
    return rows


def eval_table(rows) -> str:
    return ("| rule | sparsity | perplexity | next-token agreement | FLOPs rel. | scored tokens' blocks skipped |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(
                f"| {r['method']} | {r['sparsity']} | {r['perplexity']:.3f} | {r['agreement']:.3f} | {r['flops_rel']:.3f} "
                f"| {r['scored_skipped']:.3f} |" for r in rows))


def write_card(out, args, m):
    held = eval_table(m["eval"]) if m.get("eval") else "(no held-out evaluation in this run: `--eval-limit 0`)"
    calib = eval_table(m["calib_eval"]) if m.get("calib_eval") else "(none: `--calib-blocks 0`)"
    recalibrated = (f"Thresholds and checks redone without training ({m['calibrate_total_seconds'] / 60:.1f} min):\n"
                    f"```\n{m['calibrate_command']}\n```\n") if m.get("calibrate_command") else ""
    every = getattr(args, "route_generated", True)  # (runs before the flag existed routed the tail)
    tail = ("routed one by one (logit < 0 skips), as `ftp(route_generated=True)`" if every else
            "they and the last prompt token run every block, as `ftp`'s default (`--route-generated` routes them)")
    constraint = ("the generated tokens' share kept by logit > 0, over all blocks" if every else
                  "each block's share of prompt tokens with logit > 0, which sets the logit's scale")
    text = f"""# FTP router for SmolLM2-135M

The learned part of `tokenprune`'s FTP (`tokenprune/methods/ftp.py`): one MLP (4 inputs -> {args.hidden} -> {args.hidden} -> 1,
GELU), shared by every block, {m['parameters']} parameters ({m['file_bytes']} bytes on disk). Inputs per token: position,
attention share on the first token in the previous block (mean of query head(s) {args.heads}, through the fused
attention kernel), its rank among the prompt's tokens, the block's target sparsity. Load:
`tp.build_pruner("ftp", sparsity=0.3)` (the default checkpoint `"smollm2-135m"`); `static=True` runs the static
attention-rank rule on the same heads with its own calibrated thresholds. Trained for the 30-layer, 576-wide
SmolLM2-135M: other models get the library's error.

## Data
`pydoc_data.topics` (shipped with CPython; nothing downloaded). Held out: the {m['split']['held']} topics the perplexity
eval reads (`tokenprune eval --model smollm2-135m`). Of the other {m['split']['train'] + m['split']['calibration']} topics, every
{CALIBRATION_EVERY}th ({m['split']['calibration']}) is the calibration split (schedule search, the check below), the
{m['split']['train']} others train: {m['train_blocks']} blocks of {args.length} tokens.

## Training
```
{m['command']}
```
Base model frozen (fp32). The router starts at the static attention-rank rule (`--init {args.init}`: its
logit decreases with rank + sink share, other weights a tenth of a random init). {m['steps_done']} steps (of {args.steps} planned; `--max-minutes {args.max_minutes}`), one
{args.length}-token block per step; total sparsity uniform in [{args.min_sparsity}, {args.max_sparsity}], per-block
sparsities log-normal (sigma {args.spread}) around the uniform schedule; the last {args.generated:.0%} of each block plays
generated tokens: {tail}, the rest is the prompt (top-k). Hard routing in the forward,
soft gate `sigmoid(logit)` in the backward (straight-through); a skipped token's key is masked in its block
and its output is `h + g * (block(h) - h)`. Loss = KL(dense || routed) at the generated tail's positions (and the
last prompt token's: the predictions generation uses) + {args.sparsity_weight} x sparsity
constraint ({constraint}) + guide ({args.guide_weight} x BCE towards the static
attention-rank router's prompt choice, decaying to 0 over the first
{args.guide_share:.0%} of the steps). AdamW lr {args.lr}, seed {args.seed}, {args.threads} thread(s).
**Time: {m['train_seconds'] / 60:.1f} min training ({m['total_seconds'] / 60:.1f} min in all, model load, calibration
and the checks below included)** on a 2-core CPU, one core (other developers' jobs ran at the same time on the other core).
Final (mean of the last 20 steps): KL {m['final_kl']:.4f}, sparsity loss {m['final_sparsity']:.5f}, guide {m['final_guide']:.4f}.

## Generated tokens' thresholds
A generated token (at a decode step, or a scored token in the eval) is routed alone: it skips a block
when its keep score is below the threshold of the block's sparsity. Calibrated after training where the
eval scores: {args.threshold_blocks} training block(s) of {args.length} tokens, the last {args.generated:.0%} marked generated, through the library,
every block >= 1 at each sparsity of {list(THRESHOLD_GRID)}: the cut whose realised share of skipped generated
token-blocks is closest to the target (bisection, 5 runs per sparsity), made non-decreasing in the sparsity.
Router (logit): {m['thresholds']}. Static rule (minus the sink share): {m['static_thresholds']}.
{recalibrated}

## Checks (through the library: 512 context + 128 scored tokens, every block >= 1 routed, uniform schedule)
Sparsity: the share of the pass's token-block computations skipped; `ftp` (the default, the scored
tokens run every block) spends it on the context, at 1.25 x that share of the prompt.
Calibration split ({m['calib_blocks']} blocks):

{calib}

Held-out text (PerplexityTask, first {args.eval_limit} blocks of the seeded subset):

{held}

The comparison with ShortGPT and the other baselines is in `results/smollm2-ftp/`.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def main(argv=None, loaded=None):
    """``loaded``: an already loaded ``(model, tokenizer)`` of SmolLM2-135M (tests), else loaded here."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--length", type=int, default=EVAL_BLOCK,
                    help="tokens per training block (default: the eval's 512 context + 128 scored)")
    ap.add_argument("--heads", type=int, nargs="+", default=[1],
                    help="query heads whose attention share on the first token is the feature (their mean)")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-sparsity", type=float, default=0.1)
    ap.add_argument("--max-sparsity", type=float, default=0.5)
    ap.add_argument("--spread", type=float, default=0.5, help="sigma of the per-block log-normal schedule noise")
    ap.add_argument("--generated", type=float, default=0.2, help="tail share of a block routed as generated tokens")
    ap.add_argument("--route-generated", action="store_true",
                    help="route the generated tail too (one by one, by threshold), as ftp(route_generated=True); "
                         "default: it and the last prompt token run every block, as ftp's default")
    ap.add_argument("--sparsity-weight", type=float, default=10.0)
    ap.add_argument("--guide-weight", type=float, default=1.0)
    ap.add_argument("--guide-share", type=float, default=0.3)
    ap.add_argument("--init", choices=["static", "random"], default="static",
                    help="start from the static attention-rank rule, or from a random MLP")
    ap.add_argument("--max-minutes", type=float, default=25.0, help="stop training after this long")
    ap.add_argument("--threshold-blocks", type=int, default=2,
                    help="training blocks that calibrate the generated tokens' thresholds")
    ap.add_argument("--calib-blocks", type=int, default=4, help="calibration blocks for the NLL check (0: none)")
    ap.add_argument("--eval-limit", type=int, default=4, help="held-out perplexity blocks through the library (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--calibrate-only", action="store_true",
                    help="no training: recalibrate the thresholds of the router in --out and redo the checks")
    args = ap.parse_args(argv)
    progress = not os.environ.get("TQDM_DISABLE")
    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    torch.set_num_threads(args.threads)
    model, tok = loaded or tp.zoo.load("smollm2-135m")
    model.requires_grad_(False).eval()
    command = ".venv/bin/python evals/train/train_ftp.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    path = os.path.join(args.out, "ftp.safetensors")
    if args.calibrate_only:  # the trained router in --out, its training run's settings
        trained = json.load(open(os.path.join(args.out, "metrics.json")))
        args = argparse.Namespace(**{**trained["args"], "threads": args.threads, "out": args.out,
                                     "calib_blocks": args.calib_blocks, "eval_limit": args.eval_limit,
                                     "threshold_blocks": args.threshold_blocks, "calibrate_only": True})
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)
    L = model.config.num_hidden_layers
    split = text_split(tok)
    train = token_blocks(tok, split["train"], args.length)
    calib = token_blocks(tok, split["calibration"], EVAL_BLOCK)[: args.calib_blocks]
    order = list(range(len(train)))
    rng.shuffle(order)
    if args.calibrate_only:
        router = load_router(path)
        m = {k: v for k, v in trained.items() if k not in ("calib_eval", "eval")}
        m["calibrate_command"] = command
    else:
        router, m = train_router(args, model, rng, train, order, progress)
        m["command"] = command
    t1 = time.time()
    # training blocks, generated tail as in training (by default the eval's positions: 512 + 128)
    *_, reached = calibrate_thresholds(model, router, train[torch.tensor(order[:args.threshold_blocks])],
                                       context=args.length - round(args.generated * args.length), progress=progress)
    m["threshold_realised"] = {"router": reached[False], "static": reached[True]}
    os.makedirs(args.out, exist_ok=True)
    router.save(path, trained_on="smollm2-135m", steps=m["steps_done"], seed=args.seed)
    budgets = [0.2, 0.3, 0.4]
    calib_eval = library_eval(model, tok, path, budgets, len(calib), progress, token_ids=calib) if len(calib) else []
    results = library_eval(model, tok, path, budgets, args.eval_limit, progress) if args.eval_limit else []
    m.update(parameters=sum(p.numel() for p in router.parameters()), file_bytes=os.path.getsize(path),
             split={k: len(v) for k, v in split.items()}, train_blocks=len(train), calib_blocks=len(calib),
             thresholds=router.thresholds, static_thresholds=router.static_thresholds, calib_eval=calib_eval,
             eval=results, calibrate_seconds=time.time() - t1, args=vars(args))
    m["total_seconds" if not args.calibrate_only else "calibrate_total_seconds"] = time.time() - t0
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    write_card(args.out, args, m)
    print(json.dumps({k: v for k, v in m.items() if k not in ("args", "log")}, indent=1))


def train_router(args, model, rng, train, order, progress):
    """The training loop: (router, metrics of the run)."""
    L = model.config.num_hidden_layers
    router = Router(args.hidden, num_layers=L, hidden_size=model.config.hidden_size, heads=args.heads)
    if args.init == "static":
        init_static(router)
    opt = torch.optim.AdamW(router.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    soft = SoftRouting(model, router, generated=args.generated, route_generated=args.route_generated)
    log = []
    # distil where the model's outputs are used: the generated tail's next-token predictions (and
    # the last prompt token's); a prompt token's own prediction is never read, only its keys / values
    scored = args.length - round(args.generated * args.length) - 1 if args.generated > 0 else 0
    t1 = time.time()
    bar = tqdm(range(args.steps), desc="train ftp", disable=not progress)
    for step in bar:
        x = train[order[step % len(order)]][None]
        with torch.no_grad():
            teacher = model(x, use_cache=False).logits
        total = rng.uniform(args.min_sparsity, args.max_sparsity)
        with soft:
            soft.reset()
            soft.schedule = sample_schedule(rng, total, L, args.spread)
            logits = model(x, use_cache=False).logits
            kl = kl_loss(logits[:, scored:], teacher[:, scored:])
            sparsity, guide = soft.losses()
        w_guide = args.guide_weight * max(0.0, 1.0 - step / max(1.0, args.guide_share * args.steps))
        loss = kl + args.sparsity_weight * sparsity + w_guide * guide
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append((kl.item(), sparsity.item(), guide.item()))
        bar.set_postfix(kl=f"{kl.item():.3f}", sp=f"{sparsity.item():.4f}", guide=f"{guide.item():.3f}", s=f"{total:.2f}")
        if time.time() - t1 > args.max_minutes * 60:
            break
    router.eval().requires_grad_(False)
    tail = log[-20:]
    return router, dict(steps_done=len(log), train_seconds=time.time() - t1, log=log,
                        final_kl=sum(a for a, _, _ in tail) / len(tail),
                        final_sparsity=sum(b for _, b, _ in tail) / len(tail),
                        final_guide=sum(c for _, _, c in tail) / len(tail))


if __name__ == "__main__":
    main()
