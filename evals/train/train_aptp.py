"""Train APTP's router and architecture codes for ``tiny-t2i``; write them with a model card.

    .venv/bin/python evals/train/train_aptp.py --threads 1

Frozen: the MiniLM text encoder and the dense tiny-t2i U-Net (the teacher). Trained: the
hypernetwork (Bi-GRU over the prompt's token states -> one logit per gate) and ``K``
architecture codes (gate logits). Gates: per transformer block its heads and feed-forward
channel groups (width) and the block itself (depth). The student is the same U-Net with each
row's gates applied as multipliers on its attention heads (inputs of ``to_out``), feed-forward
channels (input of the output projection) and on the outputs of attn1 / attn2 / ff (depth),
0 / 1 forward with the soft gate's gradient (straight-through), so the trained forward is
exactly what the sliced expert computes. Each step:

1. a batch of training images with captions (color + shape, plus size / position words where
   the testbed labels them, see ``--kinds``);
2. for the first ``--pretrain-steps`` each prompt runs on its own architecture vector (the
   reference's hypernetwork pre-training, where prompts learn different sizes); then the codes
   are initialised from those vectors (captions sorted by kept share, cut into K groups) and
   each prompt runs on the code Sinkhorn optimal transport assigns it (balanced: each code gets
   about B / K prompts; eps 0.05, 3 iterations) over the cosine of MAC-weighted gate
   probabilities;
3. each prompt's row and its unconditional row (the empty prompt, as classifier-free guidance
   runs it at inference on the same expert) go through the student with Gumbel-sigmoid gates
   (temperature 0.4, offset 2);
4. loss = denoising (v-prediction, tiny-t2i's weights) + distillation to the dense U-Net's
   output + resource ``|log(r / p)| + |log(r' / p)|`` (r: the batch's mean kept share of the
   transformer blocks' MACs under the step's Gumbel gates, r' under the noise-free gates, the
   experts that run at inference; p: ``--budget``; on the batch mean as the reference applies it) + the reference's std and max terms (``-std``
   and ``1 - max`` of the batch's shares: without them nothing lets the sizes differ, and the
   codes end up one size) + contrastive
   (each prompt's architecture vector against the K codes, its OT code as the positive).

The U-Net's weights are not fine-tuned (the reference fine-tunes the pruned U-Net jointly;
on this CPU the experts stay exact slices of the shipped dense weights, so the checkpoint holds
only the router and the codes, and attaching it needs no other weights).
At the end: every prompt's code, the MACs of each code's sliced U-Net (``flop_counter``), and
dense vs APTP faithfulness through the public ``tp.pruning(pipe, aptp)`` path; all go into the
model card ``README.md`` next to ``aptp.safetensors`` and ``config.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter

import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(REPO, "tokenprune", "zoo", "weights", "tiny-t2i", "aptp")


# --------------------------------------------------------------------------- data

def training_captions(t2i, x, s, c, kinds, g):
    """One caption per image, of a kind drawn among ``kinds`` that the image supports (a size or
    side word only where the testbed's labels give one); returns (captions, kind per image)."""
    n = len(x)
    labels = t2i.attribute_labels(x / 2 + 0.5, s) if hasattr(t2i, "attribute_labels") else None
    caps, got = [], []
    pick = torch.rand(n, 4, generator=g)
    for i in range(n):
        color, shape = t2i.COLORS[int(c[i])], t2i.SHAPES[int(s[i])]
        size = sides = None
        if labels is not None:
            z = int(labels["size"][i])
            size = t2i.SIZES[z] if z >= 0 else None
            sides = [("left", "right")[int(labels["horizontal"][i])]] if labels["horizontal"][i] >= 0 else []
            sides += [("top", "bottom")[int(labels["vertical"][i])]] if labels["vertical"][i] >= 0 else []
        ok = [k for k in kinds if k == "color-shape" or (k == "size" and size) or (k == "position" and sides)
              or (k == "size-position" and size and sides)]
        kind = ok[int(pick[i, 0] * len(ok))] if ok else "color-shape"
        side = sides[int(pick[i, 1] * len(sides))] if sides and "position" in kind else None
        caps.append(t2i.caption(color, shape, size if "size" in kind else None, side) if kind != "color-shape"
                    else t2i.caption(color, shape))
        got.append(kind)
    return caps, got


def prompt_kind(t2i, prompt):
    return t2i.prompt_kind(prompt) if hasattr(t2i, "prompt_kind") else "color-shape"


# --------------------------------------------------------------------------- gates on the student

class Gates:
    """Per-row gates on a U-Net's heads and feed-forward channels, as input multipliers of the
    output projections (what slicing those units away computes when a gate is 0), and per-row
    depth gates on each block's attn1 / attn2 / ff outputs (0: the part adds nothing, as the
    adapter's removed part)."""

    def __init__(self, unet, router):
        from tokenprune.adapters.unet import transformer_blocks

        self.value = None  # (B, D)
        self.hooks = []
        g = router.config["channel_group"]
        start = 0
        for block, layout in zip(transformer_blocks(unet), router.config["layout"]):
            h, hd, groups = layout["heads"], layout["head_dim"], layout["channels"] // g
            heads, chans, depth = (slice(start, start + h), slice(start + h, start + h + groups),
                                   slice(start + h + groups, start + h + groups + 1))
            start += h + groups + 1
            for attn in (block.attn1, block.attn2):
                if attn is not None:
                    self.hooks.append(attn.to_out[0].register_forward_pre_hook(self._scale(heads, hd)))
                    self.hooks.append(attn.register_forward_hook(self._depth(depth)))
            self.hooks.append(block.ff.net[2].register_forward_pre_hook(self._scale(chans, g)))
            self.hooks.append(block.ff.register_forward_hook(self._depth(depth)))

    def _scale(self, part, repeat):
        def hook(module, args):
            x = args[0]
            gate = self.value[:, part].repeat_interleave(repeat, dim=1)  # (B, units * repeat)
            return (x * gate.view(gate.shape[0], *([1] * (x.dim() - 2)), -1).to(x.dtype),)

        return hook

    def _depth(self, part):
        def hook(module, args, out):
            gate = self.value[:, part]  # (B, 1)
            return out * gate.view(gate.shape[0], *([1] * (out.dim() - 1))).to(out.dtype)

        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def block_tokens(unet, size: int) -> list[int]:
    """Spatial tokens of each transformer block at a ``size`` x ``size`` input."""
    from tokenprune.adapters.unet import transformer_blocks

    seen, hooks = [], []
    for b in transformer_blocks(unet):
        hooks.append(b.register_forward_pre_hook(
            lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True))
    try:
        with torch.no_grad():
            unet(torch.zeros(1, unet.config.in_channels, size, size), 10,
                 encoder_hidden_states=torch.zeros(1, 4, unet.config.cross_attention_dim))
    finally:
        for h in hooks:
            h.remove()
    return seen


# --------------------------------------------------------------------------- training

@torch.no_grad()
def init_codes(router, emb, mask, log):
    """After the hypernetwork's pre-training: the training captions sorted by the MAC share of
    their own (noise-free) gates, cut into K equal groups; code k = the mean gate logits of
    group k (code 0 the widest), so the codes start as different sizes the prompts asked for."""
    logits = router(emb, mask)
    share = router.share(router.gates(logits, noise=False))
    order = share.argsort(descending=True)
    for k, rows in enumerate(order.tensor_split(router.num_codes)):
        router.codes[k] = logits[rows].mean(0)
    log(f"hypernetwork pre-trained: caption shares {share.min():.3f}..{share.max():.3f} (mean {share.mean():.3f}); "
        f"codes start at {[round(router.kept_share(k), 3) for k in range(router.num_codes)]}")


def train(args, t2i, pipe, log):
    from diffusers import DDPMScheduler

    from tokenprune.adapters.unet import transformer_blocks, width_units
    from tokenprune.methods.aptp import layout_of
    from tokenprune.methods.aptp_router import APTPRouter, sinkhorn

    teacher = pipe.unet.eval().requires_grad_(False)
    import copy

    student = copy.deepcopy(teacher).requires_grad_(False)
    sched = DDPMScheduler.from_config(t2i._ddpm_config())
    acp = sched.alphas_cumprod
    snr = acp / (1 - acp)
    weight = (snr + 1).clamp(max=5.0) / (snr + 1)  # tiny-t2i's v-prediction loss weights

    x, s, c = t2i.easy_vqa_32("train")
    if args.limit_images:
        x, s, c = x[: args.limit_images], s[: args.limit_images], c[: args.limit_images]
    g = torch.Generator().manual_seed(args.seed)
    captions, kinds = training_captions(t2i, x, s, c, args.kinds, g)
    log(f"captions: {dict(Counter(kinds))} (e.g. {captions[:3]})")
    table = sorted(set(captions))
    emb, mask = t2i.encode_text(pipe.text_encoder, pipe.tokenizer, table + [""])
    row = {p: i for i, p in enumerate(table)}
    cap_idx = torch.tensor([row[p] for p in captions])
    null = len(table)

    layout = layout_of(width_units(transformer_blocks(teacher)))
    torch.manual_seed(args.seed)
    router = APTPRouter(layout, num_codes=args.codes, text_dim=emb.shape[-1], hidden=args.hidden,
                        channel_group=args.channel_group, tokens=block_tokens(teacher, t2i.IMAGE_SIZE),
                        context=int(mask.sum(1).float().mean().round()))
    with torch.no_grad():
        router.null.copy_(router.pooled(emb[null:], mask[null:])[0])
    gates = Gates(student, router)
    opt = torch.optim.Adam([{"params": [router.codes], "lr": args.code_lr},
                            {"params": [p for n, p in router.named_parameters() if n != "codes"], "lr": args.lr}])
    perm, pos = torch.randperm(len(x), generator=g), 0
    hist = []
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="aptp", unit="step", mininterval=10)
    for step in bar:
        if step == args.pretrain_steps:
            init_codes(router, emb[:null], mask[:null], log)
        if pos + args.batch > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos: pos + args.batch]
        pos += args.batch
        B = len(idx)
        ctx, m = emb[cap_idx[idx]], mask[cap_idx[idx]]
        logits = router(ctx, m)
        if step < args.pretrain_steps:  # the hypernetwork's own gates per prompt (no codes yet)
            used = logits
            contrast = torch.zeros(())
            assign = torch.zeros(B, dtype=torch.long)
        else:
            sim = router.similarity(logits)
            with torch.no_grad():
                assign = sinkhorn(sim, args.sinkhorn_eps, args.sinkhorn_iters).argmax(1)
            used = router.codes[assign]
            contrast = torch.nn.functional.cross_entropy(sim / args.contrast_temp, assign)
        gate = router.gates(used, generator=g)  # (B, D) 0/1 forward, soft gradient
        noisy = router.share(gate)  # (B,) kept share of the transformer blocks' MACs in this step
        # the same for the noise-free gates, what runs at inference (straight-through): the Gumbel
        # noise switches off more gates than it switches on once most are on, so a budget on the
        # noisy gates alone lets the experts overshoot it (0.60 instead of 0.50 in a trial run)
        share = router.share(router.gates(used, noise=False))
        clean = router.share(router.gates(used, noise=False, hard=False))
        x0 = x[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        both_ctx = torch.cat([ctx, emb[null:].expand(B, -1, -1)[:, : ctx.shape[1]]])
        both_mask = torch.cat([m, mask[null:].expand(B, -1)[:, : ctx.shape[1]]])
        xt2, t2 = torch.cat([xt, xt]), torch.cat([t, t])
        with torch.no_grad():
            target = teacher(xt2, t2, encoder_hidden_states=both_ctx, encoder_attention_mask=both_mask).sample
        gates.value = torch.cat([gate, gate])
        pred = student(xt2, t2, encoder_hidden_states=both_ctx, encoder_attention_mask=both_mask).sample
        v = sched.get_velocity(x0, noise, t)
        denoise = (weight[t] * (pred[:B] - v).pow(2).mean((1, 2, 3))).mean()
        distill = (pred - target).pow(2).mean()
        r = share.mean()
        # on the batch mean, as the reference: of the gates this step ran and of the noise-free ones
        # (the first alone overshoots at inference, the second alone let every prompt settle on
        # one size in a trial run)
        resource = (noisy.mean() / args.budget).log().abs() + (r / args.budget).log().abs()
        # the reference's std and max losses (on noise-free soft shares: the noise would make them
        # push random draws apart instead of prompts): sizes may differ, some prompt keeps much
        spread = -clean.std() if B > 1 and bool(clean.detach().std() > 0) else torch.zeros(())  # 0 / 0 grad
        widest = 1 - clean.max()
        loss = (args.w_denoise * denoise + args.w_distill * distill + args.w_resource * resource
                + args.w_std * spread + args.w_max * widest + args.w_contrast * contrast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(dict(loss=loss.item(), denoise=denoise.item(), distill=distill.item(), r=r.item(),
                         std=share.std().item() if B > 1 else 0.0, contrast=contrast.item(),
                         codes=torch.bincount(assign, minlength=args.codes).tolist()))
        if step % 10 == 0:
            last = hist[-20:]
            bar.set_postfix(distill=f"{sum(h['distill'] for h in last) / len(last):.4f}",
                            r=f"{sum(h['r'] for h in last) / len(last):.3f}",
                            std=f"{sum(h['std'] for h in last) / len(last):.3f}",
                            contrast=f"{sum(h['contrast'] for h in last) / len(last):.2f}", refresh=False)
        if step >= args.pretrain_steps and (step - args.pretrain_steps) % 100 == 99:
            log(f"step {step + 1}: codes keep {[round(router.kept_share(k), 3) for k in range(args.codes)]}")
    bar.close()
    gates.remove()
    seconds = time.time() - t0
    tail = hist[-50:]
    summary = {k: round(sum(h[k] for h in tail) / len(tail), 5) for k in ("loss", "denoise", "distill", "r", "std", "contrast")}
    log(f"trained {args.steps} steps in {seconds / 60:.1f} min; last 50 steps: {summary}")
    return router.eval(), dict(seconds=round(seconds, 1), last50=summary, captions=dict(Counter(kinds)))


# --------------------------------------------------------------------------- evaluation

def faithful(t2i, images, prompts, judge) -> torch.Tensor:
    """(N,) bool per image: what ``t2i.judge_images`` counts as faithful (judged shape and color,
    and the measured size / side where the prompt names them), for any subset of prompts."""
    _, s_pred, c_pred = t2i._judge_batches(judge, images.float() * 2 - 1)
    want = [t2i.parse_prompt(p) for p in prompts]
    ok = torch.tensor([judge.colors[int(c)] == t2i.COLORS[w[0]] and judge.shapes[int(s)] == t2i.SHAPES[w[1]]
                       for s, c, w in zip(s_pred, c_pred, want)])
    if hasattr(t2i, "attributes_ok"):
        size_ok, _, side_ok, _ = t2i.attributes_ok(images, prompts)
        ok &= size_ok & side_ok
    return ok


def evaluate(args, t2i, pipe, judge, folder, log):
    """Routing of every prompt, MACs per code, dense vs APTP quality through tp.pruning."""
    import tokenprune as tp
    from tokenprune.adapters.unet import transformer_blocks, width_units
    from tokenprune.evals.metrics import flop_counter

    aptp = tp.APTP(checkpoint=folder)
    kinds = [k for k in args.kinds]
    prompts = t2i.all_prompts(tuple(kinds)) if hasattr(t2i, "KINDS") else t2i.all_prompts()
    ctx, mask = t2i.encode_text(pipe.text_encoder, pipe.tokenizer, prompts)
    codes = aptp.route(ctx, mask).tolist()
    routing = {p: k for p, k in zip(prompts, codes)}

    unet = pipe.unet
    experts = aptp.experts(width_units(transformer_blocks(unet)))
    x = torch.zeros(1, unet.config.in_channels, t2i.IMAGE_SIZE, t2i.IMAGE_SIZE)
    c1, _ = t2i.encode_text(pipe.text_encoder, pipe.tokenizer, ["a red circle"])

    def flops(pruner=None):  # one image through the U-Net, with code k's expert swapped in when given
        with torch.no_grad(), flop_counter() as fc:
            if pruner is None:
                unet(x, 10, encoder_hidden_states=c1)
            else:
                with tp.pruning(unet, pruner):
                    unet(x, 10, encoder_hidden_states=c1)
        return fc

    names = {f"{type(unet).__name__}.{n}" for n, m in unet.named_modules() if m in transformer_blocks(unet)}
    fc = flops()
    dense = fc.get_total_flops()
    in_blocks = sum(sum(v.values()) for k, v in fc.get_flop_counts().items() if k in names)
    per_code = []
    for k, e in enumerate(experts):
        f = flops(tp.APTP(checkpoint=folder, code=k)).get_total_flops()
        per_code.append(dict(code=k, unet_flops=f, unet_ratio=round(f / dense, 4),
                             transformer_share=round(aptp.code_shares()[k], 4),
                             heads=[int(h.sum()) for h in e["heads"].values()],
                             channels=[int(ch.sum()) for ch in e["channels"].values()],
                             dropped_blocks=aptp.router.dropped_blocks(k),
                             prompts=sum(1 for v in codes if v == k)))
    log(f"dense U-Net {dense / 1e6:.1f} MFLOPs per image; codes: {per_code}")

    eval_prompts = t2i.eval_prompts(args.eval_n, tuple(kinds)) if hasattr(t2i, "KINDS") else t2i.eval_prompts(args.eval_n)
    quality = {}
    for name, ctx_mgr in (("dense", None), ("aptp", aptp)):
        t0 = time.time()
        if ctx_mgr is None:
            res = t2i.t2i_scores(pipe, eval_prompts, judge, num_inference_steps=args.eval_steps, return_images=True,
                                 progress=True, mininterval=10)
        else:
            with tp.pruning(pipe, ctx_mgr) as h:
                res = t2i.t2i_scores(pipe, eval_prompts, judge, num_inference_steps=args.eval_steps,
                                     return_images=True, progress=True, mininterval=10)
        images = res.pop("images")
        res["seconds"] = round(time.time() - t0, 1)
        ok = faithful(t2i, images, eval_prompts, judge)
        res["by_code"] = {k: round(float(ok[torch.tensor([routing[p] == k for p in eval_prompts])].float().mean()), 4)
                          for k in range(len(experts)) if any(routing[p] == k for p in eval_prompts)}
        quality[name] = res
        log(f"{name}: {res}")
    mean_unet = sum(per_code[routing[p]]["unet_ratio"] for p in eval_prompts) / len(eval_prompts)
    mean_tf = sum(per_code[routing[p]]["transformer_share"] for p in eval_prompts) / len(eval_prompts)
    return dict(routing=routing, per_code=per_code, dense_unet_flops=dense, blocks_share=round(in_blocks / dense, 4),
                quality=quality,
                mean_unet_ratio=round(mean_unet, 4), mean_transformer_ratio=round(mean_tf, 4),
                eval_n=len(eval_prompts))


# --------------------------------------------------------------------------- card

def kind_table(t2i, routing, shares):
    """Rows: prompt kind; columns: prompts per code and the kind's mean kept transformer MACs."""
    kinds = {}
    for p, k in routing.items():
        kinds.setdefault(prompt_kind(t2i, p), Counter())[k] += 1
    lines = ["| prompt kind | prompts | " + " | ".join(f"code {k} ({s:.3f})" for k, s in enumerate(shares))
             + " | mean transformer MACs kept |", "|---|---|" + "---|" * (len(shares) + 1)]
    for kind, cnt in kinds.items():
        n = sum(cnt.values())
        mean = sum(shares[k] * c for k, c in cnt.items()) / n
        lines.append(f"| {kind} | {n} | " + " | ".join(str(cnt.get(k, 0)) for k in range(len(shares))) + f" | {mean:.3f} |")
    return "\n".join(lines)


def routing_table(t2i, routing, num_codes):
    """Rows: prompt kind x shape (and size / side where the kind has them); columns: codes."""
    groups = {}
    for p, k in routing.items():
        a = t2i.parse_attributes(p) if hasattr(t2i, "parse_attributes") else {"shape": t2i.SHAPES[t2i.parse_prompt(p)[1]]}
        key = (prompt_kind(t2i, p), a["shape"])
        groups.setdefault(key, Counter())[k] += 1
    lines = ["| prompt kind | shape | " + " | ".join(f"code {k}" for k in range(num_codes)) + " |",
             "|---|---|" + "---|" * num_codes]
    for (kind, shape), cnt in sorted(groups.items()):
        lines.append(f"| {kind} | {shape} | " + " | ".join(str(cnt.get(k, 0)) for k in range(num_codes)) + " |")
    colors = {}
    for p, k in routing.items():
        colors.setdefault(t2i.COLORS[t2i.parse_prompt(p)[0]], Counter())[k] += 1
    lines += ["", "By color:", "", "| color | " + " | ".join(f"code {k}" for k in range(num_codes)) + " |",
              "|---|" + "---|" * num_codes]
    lines += [f"| {c} | " + " | ".join(str(cnt.get(k, 0)) for k in range(num_codes)) + " |" for c, cnt in colors.items()]
    return "\n".join(lines)


def write_card(folder, info, t2i):
    a = argparse.Namespace(**info["args"])
    ev = info["eval"]
    code_rows = "\n".join(
        f"| {c['code']} | {c['transformer_share']:.3f} | {c['unet_ratio']:.3f} | {c['unet_flops'] / 1e6:.1f} | "
        f"{c['heads']} | {c['channels']} | {c.get('dropped_blocks') or '-'} | {c['prompts']} | "
        f"{ev['quality']['dense']['by_code'].get(c['code'], float('nan')):.3f} | "
        f"{ev['quality']['aptp']['by_code'].get(c['code'], float('nan')):.3f} |"
        for c in ev["per_code"])
    qd, qa = ev["quality"]["dense"], ev["quality"]["aptp"]
    kinds_rows = ""
    if qd.get("kinds"):
        kinds_rows = "\n".join(f"| {k} | {qd['kinds'][k]:.3f} | {qa['kinds'].get(k, float('nan')):.3f} |" for k in qd["kinds"])
        kinds_rows = "\n\nPer prompt kind (faithfulness):\n\n| kind | dense | APTP |\n|---|---|---|\n" + kinds_rows
    card = f"""# APTP router for tiny-t2i

Adaptive prompt-tailored pruning (Ganjdanesh et al., 2024) of the `tiny-t2i` U-Net: a router
reads a prompt's frozen MiniLM token states and sends it to one of {a.codes} architecture codes;
each code keeps some attention heads and feed-forward channels of the U-Net's 7 transformer
blocks (width gates) and may drop whole blocks (depth gates), and becomes a really smaller copy
of those layers when attached. Loaded by
`tp.build_pruner("aptp")` (checkpoint `"tiny-t2i"`, the default); code in
`tokenprune/methods/aptp.py` and `aptp_router.py`.

Files: `aptp.safetensors` (hypernetwork: Bi-GRU 384 -> 2x{a.hidden}, LayerNorm, one linear head per
gate group; the {a.codes} x {info['num_gates']} code logits: per block its heads, feed-forward channel groups
and one depth gate; MACs per gate; the empty prompt's pooled state), `config.json` (router version 2,
U-Net layout it fits, gate groups, training settings), this card.

## Training

    {info['command']}

Seed {a.seed}. {a.steps} steps x {a.batch} prompts (each with its unconditional row: {2 * a.batch}
U-Net rows), frozen teacher = the dense U-Net, gates of channel groups of {a.channel_group},
single heads and whole blocks (depth), Gumbel-sigmoid temperature 0.4 / offset 2, straight-through
0/1 gates. The first {a.pretrain_steps} steps train the hypernetwork's own gates per prompt (the
reference's hypernetwork pre-training); then the codes start as the mean gate logits of the
training captions cut into {a.codes} groups by the MAC share their own gates keep (code 0 the widest),
and each prompt runs on the code Sinkhorn assigns it (eps {a.sinkhorn_eps} / {a.sinkhorn_iters} iterations).
Adam (codes lr {a.code_lr}, hypernetwork lr {a.lr}). Loss = {a.w_denoise} x denoising + {a.w_distill} x
distillation + {a.w_resource} x (|log(r / p)| + |log(r' / p)|), r the batch's mean kept share under the
step's Gumbel gates, r' under the noise-free gates that run at inference (on the batch mean, as the
reference) + {a.w_std} x (-std) + {a.w_max} x (1 - max) of the batch's
shares (the reference's std and max losses, which let sizes differ) + {a.w_contrast} x contrastive (temperature {a.contrast_temp}), budget
**p = {a.budget}** of the transformer blocks' MACs. Prompt kinds: {', '.join(a.kinds)} (captions drawn: {info['train']['captions']}).
The U-Net's weights are not fine-tuned: each expert is an exact slice of the dense weights
(trained against `tiny-t2i/unet/diffusion_pytorch_model.safetensors` with sha256 `{info['unet_sha256']}...`).
Training {info['train']['seconds'] / 60:.1f} min, whole run {info['total_minutes']:.1f} min on {info['machine']}.
Last 50 steps: {info['train']['last50']}.

## What the codes are

The dense U-Net costs {ev['dense_unet_flops'] / 1e6:.1f} MFLOPs per image (32x32, `flop_counter`); its 7
transformer blocks are {ev['blocks_share']:.1%} of that, the rest is convolutions (not pruned).
Per code: the kept share of the transformer blocks' MACs, the whole U-Net's FLOPs with the
code's expert (`flop_counter`, one image), heads / feed-forward channels kept per block
(of 4 heads; 128 or 256 channels; blocks in module order: down 16x16, down 8x8, mid 8x8, up 8x8
twice, up 16x16 twice), the blocks it drops whole, how many of the {len(ev['routing'])} prompts of the listed
kinds it gets, and faithfulness of dense and APTP images on the evaluation prompts routed to it.

| code | transformer MACs kept | U-Net FLOPs ratio | MFLOPs | heads per block | ff channels per block | dropped blocks | prompts | dense faithful | APTP faithful |
|---|---|---|---|---|---|---|---|---|---|
{code_rows}

## What the router learned (every prompt of the kinds above -> code)

Per prompt kind (code columns: the code's kept share of the transformer MACs):

{kind_table(t2i, ev['routing'], [c['transformer_share'] for c in ev['per_code']])}

Per kind and shape:

{routing_table(t2i, ev['routing'], a.codes)}

## Quality (`t2i_scores`, {ev['eval_n']} prompts, DDIM {a.eval_steps} steps, guidance 1.5, same noise)

| | faithfulness | Frechet | mean transformer MACs | mean U-Net FLOPs | time |
|---|---|---|---|---|---|
| dense | {qd['faithfulness']:.3f} | {qd['frechet']:.2f} | 1.000 | 1.000 | {qd['seconds']:.0f} s |
| APTP (routed) | {qa['faithfulness']:.3f} | {qa['frechet']:.2f} | {ev['mean_transformer_ratio']:.3f} | {ev['mean_unet_ratio']:.3f} | {qa['seconds']:.0f} s |{kinds_rows}

The timings share the CPU with other jobs (not a speed benchmark; see `evals/bench_unet.py`).
"""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)


# --------------------------------------------------------------------------- main

def unet_fingerprint(t2i) -> str:
    """First 16 hex digits of the sha256 of the tiny-t2i U-Net weights the router was trained on."""
    import hashlib

    with open(t2i.WEIGHTS_DIR / "unet" / "diffusion_pytorch_model.safetensors", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16, help="prompts per step (each also runs unconditionally)")
    ap.add_argument("--codes", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.5, help="target share of the transformer blocks' MACs")
    ap.add_argument("--kinds", nargs="+", default=None,
                    help="prompt kinds to caption with (default: every kind the testbed has)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--channel-group", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--code-lr", type=float, default=0.05)
    ap.add_argument("--w-denoise", type=float, default=1.0)
    ap.add_argument("--w-distill", type=float, default=10.0)
    ap.add_argument("--w-resource", type=float, default=1.0)
    ap.add_argument("--w-contrast", type=float, default=0.1)
    ap.add_argument("--w-std", type=float, default=0.05,
                    help="weight of -std of the batch's MAC shares (reference: 0.1 next to a resource weight of 2)")
    ap.add_argument("--w-max", type=float, default=0.05, help="weight of 1 - max of the batch's MAC shares (same)")
    ap.add_argument("--pretrain-steps", type=int, default=150,
                    help="first steps train the hypernetwork's own gates per prompt, before the codes exist")
    ap.add_argument("--contrast-temp", type=float, default=0.1)
    ap.add_argument("--sinkhorn-eps", type=float, default=0.05)
    ap.add_argument("--sinkhorn-iters", type=int, default=3)
    ap.add_argument("--eval-n", type=int, default=96, help="prompts for the dense vs APTP quality rows (0: skip)")
    ap.add_argument("--eval-steps", type=int, default=25, help="DDIM steps of the quality rows")
    ap.add_argument("--limit-images", type=int, default=0, help="train on the first N images only (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    def log(msg):
        tqdm.write(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}")

    import tokenprune as tp
    from tokenprune.zoo import t2i

    if args.kinds is None:
        args.kinds = list(getattr(t2i, "KINDS", ("color-shape",)))
    pipe, judge = tp.zoo.load("tiny-t2i")
    router, tinfo = train(args, t2i, pipe, log)
    num_gates = router.codes.shape[1]
    unet_sha = unet_fingerprint(t2i)
    router.save(args.out, trained_for="tiny-t2i", unet_sha256=unet_sha, budget=args.budget, kinds=args.kinds,
                steps=args.steps)
    from tokenprune.methods.aptp import load_router

    load_router.cache_clear()
    info = dict(args=vars(args), train=tinfo, num_gates=num_gates, unet_sha256=unet_sha,
                command=".venv/bin/python evals/train/train_aptp.py" + (" " + " ".join(sys.argv[1:] if argv is None else argv)),
                machine=f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), torch.set_num_threads({args.threads}), "
                        f"torch {torch.__version__}")
    if args.eval_n:
        ev = evaluate(args, t2i, pipe, judge, os.path.abspath(args.out), log)
        info["eval"] = ev
    info["total_minutes"] = round((time.time() - t_start) / 60, 2)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(info, f, indent=1)
    if args.eval_n:
        write_card(args.out, info, t2i)
    log(f"done in {info['total_minutes']:.1f} min -> {args.out}")


if __name__ == "__main__":
    main()
