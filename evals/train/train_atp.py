"""Train the ATP-LLaVA threshold head for ``tiny-llava`` (the frozen base model is not changed).

Data: easy-vqa TRAIN questions (PyPI ``easy-vqa``; ``--kinds`` adds the position / size questions
derived from the images, as tiny-llava is trained); the answer tokens are the dense model's own
greedy answer (``vqa_data.format_answer`` text + ``</s>``) on the items it answers correctly.
Each step draws an ATP layer schedule and a budget (``keep_ratio``, log-uniform), runs the
model with soft masks (``tokenprune.methods.atp.SoftMasks``: attention-key weights, no token is
dropped) and minimises  LM loss on the answer tokens + ``budget_weight`` x budget loss (squared
gap between each row's kept share and the layer's target; the hard share inference will keep, with
the soft masks' gradient, straight-through). Writes ``atp.safetensors``,
``metrics.json`` and a model card to ``--out``.

    .venv/bin/python evals/train/train_atp.py --kinds easy-vqa position size
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
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import tokenprune as tp  # noqa: E402
from tokenprune.methods.atp import ATPHead, SoftMasks  # noqa: E402
from tokenprune.zoo.vqa_data import KINDS, build_prompt, easy_vqa_items, parse_answer, vqa_accuracy  # noqa: E402

OUT_DIR = os.path.join(REPO, "tokenprune", "zoo", "weights", "tiny-llava", "atp")
SCHEDULES = [(1,), (2,), (3,), (1, 3), (2, 4), (1, 2), (2, 3)]


def dense_answers(model, processor, items, batch_size, progress):
    """(prompt ids, answer ids incl. </s>, pixel values) for the items the dense model answers right."""
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    out = []
    for s in tqdm(range(0, len(items), batch_size), desc="dense answers", disable=not progress):
        chunk = items[s: s + batch_size]
        x = processor(images=[c[0] for c in chunk], text=[build_prompt(c[1]) for c in chunk],
                      return_tensors="pt", padding=True)
        with torch.inference_mode():
            seq = model.generate(**x, do_sample=False)
        new = seq[:, x["input_ids"].shape[1]:]
        for b, (_, _, answer) in enumerate(chunk):
            ids = new[b].tolist()
            ids = ids[: ids.index(eos) + 1] if eos in ids else ids
            if parse_answer(tok.decode(ids, skip_special_tokens=True)) != answer or ids[-1:] != [eos]:
                continue
            prompt = x["input_ids"][b][x["attention_mask"][b].bool()]
            out.append((prompt, torch.tensor(ids), x["pixel_values"][b]))
    return out


def collate(examples, pad_id):
    """Left-padded prompt + answer; labels only on the answer tokens."""
    seqs = [torch.cat([p, a]) for p, a, _ in examples]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for r, ((p, a, _), s) in enumerate(zip(examples, seqs)):
        ids[r, L - len(s):], mask[r, L - len(s):] = s, 1
        labels[r, L - len(a):] = a
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.stack([e[2] for e in examples])), labels


def lm_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def write_card(out, args, m):
    rows = "\n".join(f"| {r['layer']} | {r['keep_ratio']} | {r['accuracy']:.4f} | {r['kept_visual']:.3f} |"
                     for r in m["eval"])
    text = f"""# ATP-LLaVA threshold head for tiny-llava

The learned part of `tokenprune`'s ATP-LLaVA (`tokenprune/methods/atp.py`): one small MLP
(7 score statistics -> 32 -> 2: the redundancy-threshold offset and the spatial threshold),
shared by every ATP layer (it reads the layer's depth and budget). {m['parameters']} parameters.
Load: `tp.build_pruner("atp", checkpoint="tiny-llava", layer=..., keep_ratio=...)` (the default
checkpoint). Trained for the 6-layer `tiny-llava` decoder; other depths get the library's error.

## Data
easy-vqa TRAIN split (PyPI `easy-vqa`, nothing downloaded), question kinds {', '.join(args.kinds)}
(`easy_vqa_items("train", limit={args.train_items}, seed={args.seed}, kinds=...)`): {m['train_items']} questions,
of which the {m['train_used']} the frozen dense tiny-llava answers correctly; the answer tokens are its own
greedy answer text + `</s>`. Test questions are never used in training.

## Training
```
{m['command']}
```
Base model frozen. {m['steps_done']} steps (of {args.steps} planned; `--max-minutes {args.max_minutes}`) of {args.batch} prompts; each step draws an ATP schedule from
{[list(s) for s in SCHEDULES]} and a budget `keep_ratio` log-uniform in [{args.min_keep}, {args.max_keep}];
soft masks `sigmoid((score - theta) * {args.tau})` act as attention-key weights in every later layer.
Loss = LM cross-entropy on the answer tokens + {args.budget_weight} x mean squared gap between each row's kept share
(hard count, soft gradient: straight-through) and its layer target (`keep_ratio ** (1 / #layers)`). AdamW lr {args.lr}, seed {args.seed}, {args.threads} thread(s).
**Time: {m['train_seconds'] / 60:.1f} min training ({m['total_seconds'] / 60:.1f} min with data prep and the check below)**
on a 2-core CPU (run under the shared heavy-job lock; other developers' tests may have run at the same time).
Final LM loss {m['final_lm']:.4f}, budget loss {m['final_budget']:.5f} (means of the last 50 steps).

## Result (hard masks, `generate`)
easy-vqa TEST, the seeded subset `easy_vqa_items("test", limit={m['eval_items']}, seed=0, kinds={tuple(args.kinds)})`:
dense accuracy {m['dense_accuracy']:.4f}. `kept visual` = mean share of each prompt's visual tokens entering the last layer.

| layer | keep_ratio | accuracy | kept visual |
|---|---|---|---|
{rows}

The full comparison with the baselines is in `results/tiny-llava/` (`tokenprune eval --model tiny-llava`).
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def kept_visual(model, processor, items, pruner, batch_size=64):
    """Mean share of each prompt's visual tokens that reach the last decoder layer."""
    shares = []
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        x = processor(images=[c[0] for c in chunk], text=[build_prompt(c[1]) for c in chunk],
                      return_tensors="pt", padding=True)
        with torch.inference_mode(), tp.pruning(model, pruner) as h:
            model(**x)
        visual = (x["input_ids"] == model.config.image_token_id).sum(1)
        dense = torch.tensor(h.stats.tokens_per_layer[0])
        shares += (1 - (dense - torch.tensor(h.stats.tokens_per_layer[-1])) / visual).tolist()
    return sum(shares) / len(shares)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tau", type=float, default=10.0)
    ap.add_argument("--budget-weight", type=float, default=5.0)
    ap.add_argument("--max-minutes", type=float, default=18.0, help="stop training early after this long")
    ap.add_argument("--min-keep", type=float, default=0.02)
    ap.add_argument("--max-keep", type=float, default=0.6)
    ap.add_argument("--train-items", type=int, default=4000)
    ap.add_argument("--eval-items", type=int, default=1000)
    ap.add_argument("--eval-layers", default="[[2,4],[1],[2],[1,3]]", help="JSON list of schedules checked at the end")
    ap.add_argument("--eval-keep", default="[0.25]", help="JSON list of keep ratios checked at the end")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--kinds", nargs="+", default=["easy-vqa"], choices=KINDS,
                    help="question kinds to train and check on (vqa_data.easy_vqa_items); default easy-vqa")
    args = ap.parse_args()
    progress = not os.environ.get("TQDM_DISABLE")
    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    torch.set_num_threads(args.threads)
    model, processor = tp.zoo.load("tiny-llava")
    model.requires_grad_(False).eval()
    layers = model.model.language_model.layers
    items = easy_vqa_items("train", limit=args.train_items, seed=args.seed, kinds=args.kinds)
    data = dense_answers(model, processor, items, 64, progress)
    head = ATPHead(num_layers=len(layers))
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    log = []
    t1 = time.time()
    bar = tqdm(range(args.steps), desc="train atp", disable=not progress)
    for step in bar:
        batch, labels = collate(rng.sample(data, min(args.batch, len(data))), processor.tokenizer.pad_token_id)
        keep = math.exp(rng.uniform(math.log(args.min_keep), math.log(args.max_keep)))
        pruner = tp.ATP(layer=rng.choice(SCHEDULES), keep_ratio=keep, checkpoint=None)
        pruner.head = head
        with tp.pruning(model, pruner), SoftMasks([pruner], layers, tau=args.tau) as soft:
            lm = lm_loss(model(**batch).logits, labels)
            budget = soft.budget_loss()
        loss = lm + args.budget_weight * budget
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append((lm.item(), budget.item()))
        if time.time() - t1 > args.max_minutes * 60:
            break
        if step % 10 == 0:
            bar.set_postfix(lm=f"{lm.item():.3f}", budget=f"{budget.item():.4f}", keep=f"{keep:.2f}")
    train_seconds = time.time() - t1
    head.eval().requires_grad_(False)
    os.makedirs(args.out, exist_ok=True)
    head.save(os.path.join(args.out, "atp.safetensors"), trained_on="tiny-llava", steps=len(log), seed=args.seed)

    test = easy_vqa_items("test", limit=args.eval_items, seed=0, kinds=args.kinds)
    results = []
    dense = vqa_accuracy(model, processor, test, progress=progress)
    for layer in json.loads(args.eval_layers):
        for keep in json.loads(args.eval_keep):
            pruner = tp.ATP(layer=layer, keep_ratio=keep, checkpoint=args.out)
            with tp.pruning(model, pruner):
                acc = vqa_accuracy(model, processor, test, progress=progress)
            results.append(dict(layer=layer, keep_ratio=keep, accuracy=acc,
                                kept_visual=kept_visual(model, processor, test, pruner)))
            print(results[-1], flush=True)
    tail = log[-50:]
    m = dict(command=".venv/bin/python evals/train/train_atp.py " + shlex.join(sys.argv[1:]),
             parameters=sum(p.numel() for p in head.parameters()), train_items=len(items), train_used=len(data),
             steps_done=len(log), train_seconds=train_seconds, total_seconds=time.time() - t0,
             final_lm=sum(a for a, _ in tail) / len(tail), final_budget=sum(b for _, b in tail) / len(tail),
             eval_items=len(test), dense_accuracy=dense, eval=results, args=vars(args))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    write_card(args.out, args, m)
    print(json.dumps({k: v for k, v in m.items() if k != "args"}, indent=1))


if __name__ == "__main__":
    main()
