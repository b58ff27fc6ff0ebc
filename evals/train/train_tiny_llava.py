"""Train ``tiny-llava``: a small LLaVA (CLIP ViT tower + MLP projector + Llama decoder) on easy-vqa.

Run from the repository root (about 10 min on 1 CPU thread of a busy 2-core machine)::

    .venv/bin/python evals/train/train_tiny_llava.py

Everything is offline: the tokenizer is built here from the easy-vqa vocabulary, the model
from config objects with random init, and the data comes from the ``easy-vqa`` PyPI package.
The result (safetensors model + tokenizer + processor + model card) is written to
``tokenprune/zoo/weights/tiny-llava/`` and loaded by ``tp.zoo.load("tiny-llava")``.

``--kinds easy-vqa position size --out DIR`` also trains on questions derived from each image's
object mask (``vqa_data.derived_questions``: left/right, top/bottom, small/large), a harder
pruning testbed: their answers need where the object's tokens are and how many, which keeping a
few salient tokens does not give. The default (easy-vqa alone) reproduces the shipped model.

Model: ``LlavaForConditionalGeneration``. Images are 64x64, the CLIP vision tower uses 8x8
patches -> 64 patch tokens (+ CLS, dropped by ``vision_feature_select_strategy="default"``),
so each ``<image>`` in the prompt is expanded by ``LlavaProcessor`` into 64 ``<image>`` tokens
(``config.image_token_id``) whose embeddings are replaced by the projected patch features.

Two stages, like LLaVA (a pretrained, frozen vision encoder, then VQA tuning):

1. *Vision pretraining* (stands in for CLIP pretraining, which we cannot download): the CLIP
   vision tower + a throw-away linear head learn to label every patch token with
   background / (color, shape) of the object. Patch foreground masks come from the pixels
   (the background is one flat color); the image's color and shape are read off the package's
   own question/answer pairs. Learning shape only through the LM loss was hopeless on this
   budget (color was learned in one pass, shape stayed at chance), and per-patch targets keep
   the information local to the object's tokens, which is what makes the model a meaningful
   visual-token-pruning testbed (background tokens carry little, object tokens carry the answer).
2. *VQA tuning*: vision tower frozen (its features cached, with and without horizontal flip),
   projector + Llama decoder trained with the LM loss on the generated answer text only
   (``vqa_data.format_answer``: "is there a blue shape?" -> "blue red . no"; "what color ...?" ->
   "red"), i.e. a few words of reasoning before yes/no answers. Trained to emit the bare yes/no
   word, the decoder learned the yes/no prior of each question form and never compared the
   asked color/shape with the one it sees (tried: 6x64 and 4x128 decoders, balanced sampling,
   tied embeddings); with both values written next to each other the comparison is learned
   in a few hundred steps. The shared prompt prefix ``<s> user : <image> x 64`` runs through
   the decoder once per image and its KV cache is shared by that image's questions; features
   are scattered into the ``<image>`` positions exactly as ``LlavaModel.forward`` does (the
   training forward is checked against ``model(input_ids, pixel_values)`` before and after).

AdamW, warmup + cosine LR, fixed seeds, tqdm progress. Evaluation uses the public path only:
``processor(images=..., text=...)`` + ``model.generate`` (greedy, left padding) through
``tokenprune.zoo.vqa_data.vqa_accuracy``, on the full easy-vqa test split by default.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(REPO, "tokenprune", "zoo", "weights", "tiny-llava")


def _load_vqa_data():
    """``tokenprune/zoo/vqa_data.py`` loaded by path: the prompt format and the evaluation must be
    the library's, but importing ``tokenprune.zoo`` would import every zoo loader (open_clip,
    diffusers, ...) that this script does not need."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_tiny_llava_vqa_data", os.path.join(REPO, "tokenprune", "zoo", "vqa_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


vqa_data = _load_vqa_data()
build_prompt, easy_vqa_items, vqa_accuracy = vqa_data.build_prompt, vqa_data.easy_vqa_items, vqa_data.vqa_accuracy
format_answer = vqa_data.format_answer

IMAGE_SIZE = 64
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
NUM_IMAGE_TOKENS = GRID ** 2  # 64

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
COLORS, SHAPES = vqa_data.EASY_VQA_COLORS, vqa_data.EASY_VQA_SHAPES
N_CLASSES = len(COLORS) * len(SHAPES)


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(words):
    """Word-level fast tokenizer over ``words`` (+ special tokens), lower-cased, left padding."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in sorted(set(words)):
        if w not in vocab:
            vocab[w] = len(vocab)
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+  -> "shape?" = "shape", "?"
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
        model_input_names=["input_ids", "attention_mask"])
    return tok


def corpus_words(tok_pre, texts):
    out = set()
    for t in texts:
        out.update(w for w, _ in tok_pre.pre_tokenize_str(t.lower()))
    return out


def derived_texts(kinds):
    """The words of the derived question kinds (``vqa_data.DERIVED_QUESTIONS``) for the vocabulary."""
    return [q + " " + " ".join(answers) for k in kinds for q, answers in vqa_data.DERIVED_QUESTIONS.get(k, [])]


def build_processor(train_questions, train_answers, extra_texts=()):
    from tokenizers import pre_tokenizers
    from transformers import LlavaImageProcessor, LlavaProcessor

    pre = pre_tokenizers.Whitespace()
    words = corpus_words(pre, list(train_questions) + list(train_answers) + [build_prompt(""), "not ."]
                         + list(extra_texts))
    tok = build_tokenizer(words)
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>")
    return processor


# --------------------------------------------------------------------------- model
def build_model(tok, args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
        hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers, num_attention_heads=4, hidden_act="quick_gelu",
        projection_dim=args.vision_hidden)
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.text_hidden, intermediate_size=args.text_intermediate,
        num_hidden_layers=args.text_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=args.tie,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=NUM_IMAGE_TOKENS, multimodal_projector_bias=True, tie_word_embeddings=args.tie)
    model = LlavaForConditionalGeneration(cfg)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    gc.max_new_tokens, gc.do_sample = 6, False
    return model


# --------------------------------------------------------------------------- data
def image_labels(qs, ans, ids):
    """Per image id, its (color, shape) class ``color * 3 + shape`` read off the package's Q/A:
    "what is the color of the circle?" -> red gives both; "is there a red shape?" -> yes gives
    red; negated statements ("is no rectangle present?" -> yes) are skipped. Images whose
    positive Q/A never name both are left out (458 of 4,000 train images)."""
    color, shape = {}, {}
    for q, a, i in zip(qs, ans, ids):
        words = q.rstrip("?").split()
        negated = "not" in words or "no" in words
        if a in ("yes", "no") and (a == "yes") == negated:
            continue  # says what is *not* in the image
        for w in words + [a]:
            if w in COLORS:
                color[i] = COLORS.index(w)
            elif w in SHAPES:
                shape[i] = SHAPES.index(w)
    return {i: color[i] * len(SHAPES) + shape[i] for i in color if i in shape}


def patch_labels(images_uint8, classes):
    """Per-patch targets ``[N, 64]``: 0 = background (< 2% object pixels), class + 1 = object
    (>= 10%), -1 = ignored (thin object edges, or an object of unknown class). Object pixels
    differ from the flat background color (the corner pixel) by more than 40 in some channel."""
    x = images_uint8.astype(np.int16)
    fg = np.abs(x - x[:, :1, :1, :]).max(-1) > 40  # [N, 64, 64]
    frac = torch.from_numpy(fg.reshape(-1, GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean((2, 4)).reshape(len(x), -1))
    lab = torch.full(frac.shape, -1, dtype=torch.long)
    lab[frac < 0.02] = 0
    obj = (frac >= 0.1) & (classes[:, None] >= 0)
    lab[obj] = (classes[:, None] + 1).expand_as(lab)[obj]
    return lab


def load_train(processor, limit_images=None, kinds=("easy-vqa",)):
    """Cache everything in memory: pixel tensors and patch targets per image, token ids + answer
    start per question. ``kinds``: question kinds of ``vqa_data.easy_vqa_items``; the derived ones
    (position, size) are asked of every image, labelled or not (their answer is the bare word)."""
    import easy_vqa
    from PIL import Image

    qs, ans, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    image_ids = sorted(paths)[:limit_images] if limit_images else sorted(paths)
    index = {iid: k for k, iid in enumerate(image_ids)}
    imgs = [Image.open(paths[i]).convert("RGB") for i in image_ids]
    pix = processor.image_processor(imgs, return_tensors="pt")["pixel_values"]  # [N,3,64,64] in [-1, 1]
    cls_of = image_labels(qs, ans, ids)
    classes = torch.tensor([cls_of.get(i, -1) for i in image_ids])
    plab = patch_labels(np.stack([np.asarray(im) for im in imgs]), classes)
    tok = processor.tokenizer
    image_tok = "<image>" * NUM_IMAGE_TOKENS
    prefix = tok(build_prompt("").split("<image>")[0] + image_tok)["input_ids"]  # <s> user : <image> x 64
    per_image = [[] for _ in image_ids]

    def add(k, q, target):
        prompt = build_prompt(q).replace("<image>", image_tok)
        p_ids = tok(prompt)["input_ids"]  # with <s>
        a_ids = tok(" " + target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert p_ids[: len(prefix)] == prefix, (prompt, prefix)
        assert tok.unk_token_id not in p_ids + a_ids, f"words outside the vocabulary: {q!r} -> {target!r}"
        per_image[k].append((p_ids + a_ids, len(p_ids)))

    for k, im in enumerate(imgs):
        for kind in kinds:
            if kind != "easy-vqa":
                for q, a in vqa_data.derived_questions(im, kind):
                    add(k, q, a)
    for q, a, i in zip(qs, ans, ids):
        if "easy-vqa" not in kinds:
            break
        if i not in index or i not in cls_of:
            continue  # VQA targets need the image's color + shape (see format_answer)
        add(index[i], q, format_answer(q, COLORS[cls_of[i] // len(SHAPES)], SHAPES[cls_of[i] % len(SHAPES)], a))
    return pix, plab, per_image, int((classes >= 0).sum()), torch.tensor([prefix])


def hflip_labels(lab):
    return lab.view(-1, GRID, GRID).flip(-1).reshape(lab.shape)


def make_batches(per_image, images_per_batch, questions_per_image, rng):
    """One pass over the images (an "epoch"): batches of ``images_per_batch`` images, each with
    ``questions_per_image`` of its questions drawn without replacement (all if 0). The natural
    question mix is kept: re-balancing yes/no answers made the yes/no logic *harder* to learn."""
    order = [k for k in range(len(per_image)) if per_image[k]]
    rng.shuffle(order)
    batches = []
    for s in range(0, len(order), images_per_batch):
        b = []
        for img in order[s: s + images_per_batch]:
            qs = per_image[img]
            if questions_per_image and len(qs) > questions_per_image:
                qs = rng.sample(qs, questions_per_image)
            b.append((img, qs))
        batches.append(b)
    return batches


def collate(batch, pad_id, prefix_len):
    """Question suffixes of a batch, right-padded: every sequence starts with the same
    ``prefix_len`` tokens (``<s> user : <image> x 64``), which the LM runs once per image."""
    seqs, owners, starts = [], [], []
    for k, (_, qs) in enumerate(batch):
        for ids, start in qs:
            seqs.append(ids[prefix_len:])
            owners.append(k)
            starts.append(start - prefix_len)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for r, (s, st) in enumerate(zip(seqs, starts)):  # right padding for training; generate uses
        input_ids[r, : len(s)] = torch.tensor(s)       # left padding + mask-derived position ids
        attn[r, : len(s)] = 1
        labels[r, st: len(s)] = torch.tensor(s[st:])
    return input_ids, attn, labels, torch.tensor(owners)


# --------------------------------------------------------------------------- training
def cosine_schedule(opt, warmup, total):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def vision_features(model, pix):
    """The vision-tower output LLaVA feeds its projector (``vision_feature_layer``, CLS dropped)."""
    hs = model.model.vision_tower(pix, output_hidden_states=True).hidden_states
    return hs[model.config.vision_feature_layer][:, 1:]


def train_vision(model, pix, plab, args, gen):
    """Stage 1: per-patch background / (color, shape) classification with a throw-away head.

    ``args.patch_position``: a second throw-away head also reads each patch's own (row, col) off its
    feature, as real CLIP features carry position. Without it the decoder found rows from the token
    order but told left from right only at 66% (the column is not in the order)."""
    vt = model.model.vision_tower
    head = torch.nn.Linear(model.config.vision_config.hidden_size, N_CLASSES + 1)
    pos_head = torch.nn.Linear(model.config.vision_config.hidden_size, 2 * GRID) if args.patch_position else None
    slot = torch.arange(NUM_IMAGE_TOKENS)
    rows, cols = slot // GRID, slot % GRID  # the slot's cell: fixed whether or not the image is flipped
    params = list(vt.parameters()) + list(head.parameters()) + (list(pos_head.parameters()) if pos_head else [])
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.05)
    bs = args.vision_batch
    steps_per_epoch = len(pix) // bs
    total = int(round(args.vision_epochs * steps_per_epoch))
    sched = cosine_schedule(opt, max(1, total // 10), total)
    model.train()
    step, ema = 0, None
    bar = tqdm(total=total, desc="stage 1 (vision)", unit="step", mininterval=10)
    while step < total:
        perm = torch.randperm(len(pix), generator=gen)
        for s in range(0, steps_per_epoch * bs, bs):
            if step >= total:
                break
            idx = perm[s: s + bs]
            x, y = pix[idx], plab[idx]
            if torch.rand((), generator=gen) < 0.5:  # horizontal flip, labels flipped with it
                x, y = x.flip(-1), hflip_labels(y)
            feats = vision_features(model, x)
            logits = head(feats)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, N_CLASSES + 1), y.reshape(-1), ignore_index=-1)
            if pos_head is not None:
                pl = pos_head(feats)
                loss = loss + torch.nn.functional.cross_entropy(pl[..., :GRID].reshape(-1, GRID), rows.repeat(len(x))) \
                    + torch.nn.functional.cross_entropy(pl[..., GRID:].reshape(-1, GRID), cols.repeat(len(x)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                ok = y >= 0
                acc = (logits.argmax(-1)[ok] == y[ok]).float().mean().item()
            cur = torch.tensor([loss.item(), acc])
            ema = cur if ema is None else 0.95 * ema + 0.05 * cur
            bar.set_postfix(loss=f"{ema[0]:.4f}", patch_acc=f"{ema[1]:.3f}", refresh=False)
            if step % args.log_every == 0 or step == total:
                tqdm.write(f"stage 1 step {step}/{total} loss {ema[0]:.4f} patch-acc(train) {ema[1]:.3f}")
            bar.update(1)
    bar.close()
    return total


def forward_lm(model, feats, prefix_ids, input_ids, attn, labels, owners):
    """``model(input_ids, pixel_values, ...)`` restricted to the question part, computed cheaply.

    ``feats`` are the (cached, frozen) vision-tower features of the batch's images
    [n_images, 64, D_vision]. The shared prompt prefix ``<s> user : <image> x 64`` (``prefix_ids``)
    runs through the decoder once per image (projected features scattered into the ``<image>``
    positions as ``LlavaModel.forward`` does); its KV cache is then indexed per question
    (``owners``: question -> image) and the question suffixes (``input_ids``, right-padded) run on
    top. Causal attention makes this exact; :func:`check_equivalence` verifies it against
    ``model(...)``. Returns (logits of the suffix, mean CE over answer tokens, answer accuracy)."""
    from transformers import DynamicCache

    lm = model.model.language_model
    n_img, P = len(feats), prefix_ids.shape[-1]
    img = model.model.multi_modal_projector(feats)  # [n_img, 64, D_text]
    ids = prefix_ids.expand(n_img, P)
    embeds = model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, img.to(embeds.dtype))
    cache = DynamicCache(config=lm.config)
    lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        layer.batch_select_indices(owners)
    B, S = input_ids.shape
    full_mask = torch.cat([torch.ones(B, P, dtype=attn.dtype), attn], 1)
    pos = torch.arange(P, P + S).expand(B, S)
    h = lm(input_ids=input_ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache,
           use_cache=True).last_hidden_state
    logits = model.lm_head(h)
    # logits at suffix position t predict token t+1; the first answer token is predicted from the
    # last prompt token, which is always in the suffix
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    with torch.no_grad():  # teacher-forced accuracy of the answer word (the one before </s>)
        last = (labels != -100).int().cumsum(1).argmax(1)  # position of </s>
        rows = torch.arange(B)
        acc = (logits[rows, last - 2].argmax(-1) == labels[rows, last - 1]).float().mean()
    return logits, loss, acc.item()


def check_equivalence(model, processor, pix, per_image, prefix_ids):
    """The training forward must equal the public ``model(input_ids, pixel_values)`` forward."""
    model.eval()
    ks = [k for k in range(len(per_image)) if per_image[k]][:2]
    b = [(k, per_image[k][:3]) for k in ks]
    input_ids, attn, labels, owners = collate(b, processor.tokenizer.pad_token_id, prefix_ids.shape[-1])
    full, full_mask = [], []
    for r in range(len(owners)):
        full.append(torch.cat([prefix_ids[0], input_ids[r]]))
        full_mask.append(torch.cat([torch.ones(prefix_ids.shape[-1], dtype=torch.long), attn[r]]))
    with torch.no_grad():
        ref = model(input_ids=torch.stack(full), pixel_values=pix[ks][owners],
                    attention_mask=torch.stack(full_mask)).logits
        got, _, _ = forward_lm(model, vision_features(model, pix[ks]), prefix_ids, input_ids, attn, labels, owners)
    ref = ref[:, prefix_ids.shape[-1]:]
    err = ((ref - got).abs() * attn[..., None]).max().item()
    assert err < 1e-4, f"training forward differs from model(...): {err}"


def train_lm(model, feats, prefix_ids, per_image, tok, args, rng, gen):
    """Stage 2: projector + Llama decoder on the answer tokens; vision tower frozen."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(sum(1 for q in per_image if q) / args.images_per_batch)
    total = int(round(args.epochs * steps_per_epoch))
    sched = cosine_schedule(opt, args.warmup, total)
    model.train()
    step, ema = 0, None
    bar = tqdm(total=total, desc="stage 2 (VQA)", unit="step", mininterval=10)
    while step < total:
        for b in make_batches(per_image, args.images_per_batch, args.questions_per_image, rng):
            if step >= total:
                break
            input_ids, attn, labels, owners = collate(b, tok.pad_token_id, prefix_ids.shape[-1])
            imgs = torch.tensor([img for img, _ in b])
            flip = (torch.rand(len(imgs), generator=gen) < 0.5).long() if args.hflip else torch.zeros_like(imgs)
            _, loss, acc = forward_lm(model, feats[flip, imgs], prefix_ids, input_ids, attn, labels, owners)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            cur = torch.tensor([loss.item(), acc])
            ema = cur if ema is None else 0.95 * ema + 0.05 * cur
            bar.set_postfix(loss=f"{ema[0]:.4f}", acc=f"{ema[1]:.3f}", refresh=False)
            if step % args.log_every == 0 or step == total:
                tqdm.write(f"stage 2 step {step}/{total} loss {ema[0]:.4f} "
                           f"answer-acc(train, teacher-forced) {ema[1]:.3f} lr {sched.get_last_lr()[0]:.2e}")
            bar.update(1)
    bar.close()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(True)
    return total, steps_per_epoch


def locality_check(model, processor, items, seed=0):
    """Accuracy with some visual tokens hidden (attention mask 0): none / the object's / as many
    random background ones / all background / all. Shows the answer lives in the object tokens."""
    gen = torch.Generator().manual_seed(seed)
    tok = processor.tokenizer
    tok.padding_side = "left"
    res, n_obj = {}, []
    for mode in ("none", "object", "background_same_count", "all_background", "all"):
        correct = 0
        for s in range(0, len(items), 125):
            chunk = items[s: s + 125]
            x = processor(images=[c[0] for c in chunk], text=[build_prompt(c[1]) for c in chunk],
                          return_tensors="pt", padding=True)
            for r, (im, _, _) in enumerate(chunk):
                pos = (x["input_ids"][r] == model.config.image_token_id).nonzero()[:, 0]
                obj = torch.from_numpy(vqa_data.object_patches(im))
                if mode == "none":
                    n_obj.append(int(obj.sum()))
                bg = pos[~obj]
                drop = {"none": pos[:0], "object": pos[obj], "all_background": bg, "all": pos,
                        "background_same_count": bg[torch.randperm(len(bg), generator=gen)[: int(obj.sum())]]}[mode]
                x["attention_mask"][r, drop] = 0
            with torch.inference_mode():
                out = model.generate(**x, max_new_tokens=6, do_sample=False)
            texts = tok.batch_decode(out[:, x["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(vqa_data.parse_answer(t) == c[2] for t, c in zip(texts, chunk))
        res[mode] = correct / len(items)
    res["n"] = len(items)
    res["object_tokens_mean"] = sum(n_obj) / len(n_obj)
    return res


def by_type(items, preds):
    """Accuracy per question type: color / shape / yes-no (+ the derived kinds: position, size)."""
    acc = {}
    for (_, q, a), p in zip(items, preds):
        k = vqa_data.kind_of(q)
        if k == "easy-vqa":
            k = "color" if a in COLORS else "shape" if a in SHAPES else "yes/no"
        elif k == "position":
            k = "position left/right" if "left" in q else "position top/bottom"
        c, n = acc.get(k, (0, 0))
        acc[k] = (c + (p == a), n + 1)
    return ", ".join(f"{k} {100 * c / n:.1f}% (n={n})" for k, (c, n) in sorted(acc.items()))


# --------------------------------------------------------------------------- model card
def write_model_card(out, model, processor, m):
    cfg = model.config
    n_example = len(processor(text=build_prompt("what color is the shape?"), images=np.zeros((64, 64, 3), np.uint8))["input_ids"][0])
    v, t = cfg.vision_config, cfg.text_config
    size_mb = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**20
    pv = sum(p.numel() for p in model.model.vision_tower.parameters())
    pp = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    pt = m["params"] - pv - pp
    kinds_note = ""
    if m["args"]["kinds"] != ["easy-vqa"]:
        lo, hi = vqa_data.size_thresholds()
        kinds_note = f"""

**Question kinds: {", ".join(m["args"]["kinds"])}** (`vqa_data.easy_vqa_items(..., kinds=...)`), trained and
evaluated on. Besides the package's questions (chance above is for those only) the model answers questions
derived from each image's object mask (`vqa_data.derived_questions`), one bare word each (chance 50%):
"is the shape on the left or on the right?" / "is the shape at the top or at the bottom?" (mask
centroid; none within {vqa_data.POSITION_MARGIN:g} px of the middle line) and "is the shape small or large?" (object
area below {lo:g} / above {hi:g} pixels, the terciles of the train images; the middle third gets no question).
They need where the object's tokens sit and how many there are, not only what one of them shows.
Horizontal-flip augmentation in stage 2: {"on" if m["args"]["hflip"] else "off (it would swap left and right)"}."""
    pos_note = ("" if not m["args"].get("patch_position") else " A second throw-away head reads each patch's "
                "own (row, col) in the 8x8 grid off its feature (`--patch-position`, on with `--kinds position`), "
                "as real CLIP features carry position. Trained without it (`--no-patch-position`, otherwise the "
                "same command), the decoder told top from bottom (the token order gives the row) but left from "
                "right only at 66% (`--eval-only` on that model).")
    flip_note = ("random horizontal flips (label-preserving for every easy-vqa question; triangles stay upright)"
                 if m["args"]["hflip"] else "no flips (they would swap left and right)")
    eval_cmd = f"; re-evaluated by `{m['eval_command']}`" if m.get("eval_command") else ""
    locality_note = "" if m["args"]["kinds"] == ["easy-vqa"] else """
Hidden this way the tokens are gone from decoder layer 0 on. Trained with the position and size
questions, the decoder also reads the background tokens (where the object is and how large it is,
relative to the whole grid), and it breaks when most of the visual tokens are missing from layer 0:
with only the object's tokens visible, the easy-vqa answers fall to the number above (the model
trained on easy-vqa alone kept 93.9%). Pruning from decoder layer 1 on, after layer 0 has seen every
token, keeps far more (`results/tiny-llava/`).
"""
    card = f"""# tiny-llava

A small LLaVA trained from scratch on CPU on the easy-vqa data that the `easy-vqa` PyPI package
ships; the visual-token-pruning testbed of `tokenprune` (FastV, ATP-LLaVA, VFlowOpt).
It is a stock `transformers.LlavaForConditionalGeneration` + `LlavaProcessor`: load with
`tp.zoo.load("tiny-llava")` (offline) or `LlavaForConditionalGeneration.from_pretrained(<this folder>)`.

## Architecture ({m["params"] / 1e6:.2f} M parameters, `model.safetensors` {size_mb:.1f} MB, float32)

| part | config |
|---|---|
| vision tower | `CLIPVisionModel`: {v.image_size}x{v.image_size} RGB input, patch {v.patch_size} -> {(v.image_size // v.patch_size) ** 2} patches + CLS, hidden {v.hidden_size}, {v.num_hidden_layers} layers, {v.num_attention_heads} heads, MLP {v.intermediate_size} ({pv / 1e6:.2f} M) |
| projector | `LlavaMultiModalProjector`: Linear {v.hidden_size}->{t.hidden_size}, GELU, Linear {t.hidden_size}->{t.hidden_size} ({pp / 1e6:.3f} M) |
| language model | `LlamaForCausalLM` architecture: hidden {t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads} heads ({t.num_key_value_heads} KV heads), MLP {t.intermediate_size}, RoPE, vocab {t.vocab_size}, LM head {"tied to" if cfg.tie_word_embeddings else "separate from"} the input embedding ({pt / 1e6:.2f} M) |
| feature selection | `vision_feature_layer={cfg.vision_feature_layer}` (last encoder layer), `vision_feature_select_strategy="{cfg.vision_feature_select_strategy}"` (CLS dropped) |

**Visual tokens:** {cfg.image_seq_length} per image, one per 8x8 patch, row-major over the 8x8 grid.
The processor expands `<image>` in the prompt into {cfg.image_seq_length} copies of token id
**{cfg.image_token_id}** (`<image>`, `config.image_token_id`); the model replaces their embeddings with
the projected patch features, so `input_ids == config.image_token_id` marks the visual tokens.
A prompt is `<s> user : <image>x{cfg.image_seq_length} <question words> ? assistant :`; visual tokens
start at position 3; e.g. "what color is the shape?" gives {n_example} tokens (1 BOS + 2 + {cfg.image_seq_length} visual + 8).

**Tokenizer:** word-level (`tokenizers` `WordLevel`, lower-casing, `Whitespace` pre-tokenizer) over
the easy-vqa question/answer words plus the prompt words; specials `<pad>`=0 `<unk>`=1 `<s>`=2
`</s>`=3 `<image>`={cfg.image_token_id}; BOS is prepended automatically; padding side is left.
**Image processor:** `LlavaImageProcessor`, resize/crop to 64x64, scale to [0, 1], normalize with
mean = std = 0.5 (so pixels are in [-1, 1]).

## Prompt and answers

`tokenprune.zoo.vqa_data.build_prompt(q)` = `"USER: <image>\\n{{q}} ASSISTANT:"`. The model then
generates `tokenprune.zoo.vqa_data.format_answer(...)` followed by `</s>`:

| question | generated | answer |
|---|---|---|
| what color is the shape? | `red` | red |
| what shape is in the image? | `circle` | circle |
| is there a blue shape? | `blue red . no` | no |
| does the image not contain a circle? | `not circle circle . no` | no |

i.e. for yes/no questions: [`not` if the question is negated] the asked-for color/shape, the
color/shape it sees, `.`, the answer. `tokenprune.zoo.vqa_data.parse_answer` takes the last word.
`generation_config` is greedy with `max_new_tokens=6` (the longest answer is 5 words + `</s>`).
Why: see Training, stage 2. Every answer depends on the visual tokens (the seen value is
read from them), so pruning the object's tokens breaks answers, pruning background does not.

## Data

easy-vqa (PyPI `easy-vqa`): 64x64 images of one colored shape (circle / rectangle / triangle,
8 colors) on a light background. Train split: 4,000 images, 38,575 questions; all images are used for
vision pretraining, the {m["vqa_train_images"]} images whose color + shape the package's Q/A names (needed for the
answer text) and their {m["train_questions"]} questions for VQA tuning. Test split: 1,000 images, 9,673
questions, never used in training. Nothing is downloaded.

## Training

```
{m["command"]}
```

From random init (seed {m["args"]["seed"]}), two stages, like LLaVA's frozen pretrained encoder + tuning:

1. **Vision pretraining** ({m["stage1_steps"]} steps, {m["args"]["vision_epochs"]:g} passes, batch {m["args"]["vision_batch"]},
   AdamW lr {m["args"]["vision_lr"]}, wd 0.05, 10% warmup + cosine): the CLIP tower + a throw-away linear head
   label every patch token background / (color, shape) of the object (25 classes). Patch targets:
   object pixels = differ from the flat background (corner pixel) by > 40 in a channel; a patch
   is background below 2% object pixels, object at >= 10%, ignored in between; the image's
   color + shape is read off the package's own Q/A ({m["labeled_images"]} of {m["train_images"]} images get both; the
   others train on background patches only). Random horizontal flips.{pos_note} This stands in for CLIP
   pretraining (nothing can be downloaded). Through the LM loss alone the from-scratch ViT
   learned color in one pass but stayed at chance on shape for many; per-patch targets also
   keep the answer *local to the object's tokens*, so background tokens are prunable and object
   tokens are not - what a visual-token-pruning testbed needs.
2. **VQA tuning** ({m["steps"]} steps, {m["args"]["epochs"]:g} passes over the images): vision tower frozen
   (features cached, plain and flipped), projector + decoder trained with next-token
   cross-entropy on the generated answer text and `</s>` only (see above); a batch = {m["args"]["images_per_batch"]} images x
   {m["args"]["questions_per_image"]} of their questions (drawn without replacement each pass), {flip_note}. AdamW lr {m["args"]["lr"]},
   betas (0.9, 0.98), wd {m["args"]["weight_decay"]}, {m["args"]["warmup"]} warmup steps + cosine, grad-clip 1.0. Cached
   features are scattered into the `<image>` positions exactly as `LlavaModel.forward` does (the
   script checks its training forward against `model(input_ids, pixel_values)`); the shared
   prefix `<s> user : <image> x 64` runs once per image and its KV cache serves that image's
   questions. Trained to emit the bare yes/no word, small decoders (6 layers x 64, 4 x 128;
   also with yes/no-balanced sampling or tied embeddings) learned only the yes/no prior of each
   question form and never compared the asked value with the seen one; with both values
   written next to each other the comparison is learned in a few hundred steps.

Train time: **{m["train_seconds"] / 60:.1f} min** (stage 1 {m["stage1_seconds"] / 60:.1f} min) on {m["threads"]} CPU thread
of a 2-core machine shared with other jobs (torch {m["torch"]}); whole script incl. data loading and
evaluation {m["total_seconds"] / 60:.1f} min.

## Evaluation

**Test accuracy: {100 * m["test_accuracy"]:.2f}%** exact match on {m["eval_split"]} ({m["test_questions"]} questions{eval_cmd}),
greedy `model.generate` (`max_new_tokens=6`) through `LlavaProcessor` with left padding
(`tokenprune.zoo.vqa_data.vqa_accuracy`, batch {m["args"]["eval_batch"]}); the last generated word
(`parse_answer`) vs the dataset answer.

By question type: {m["by_type"]}.

Chance level is about 43% (yes/no questions are 74% of the test split).{kinds_note}

**Where the information sits** (`easy_vqa_items("test", limit=1000, seed=0)`, {m["locality"]["n"]} questions; visual tokens
hidden from the decoder by zeroing their attention-mask entries, which `generate` also turns into
renumbered positions - a crude stand-in for pruning): object tokens are the patches with any object pixel
(`vqa_data.object_patches`, {m["locality"]["object_tokens_mean"]:.1f} of 64 per image on average).

| visual tokens hidden | accuracy |
|---|---|
| none | {100 * m["locality"]["none"]:.1f}% |
| the object's tokens | {100 * m["locality"]["object"]:.1f}% |
| as many random background tokens | {100 * m["locality"]["background_same_count"]:.1f}% |
| all background tokens (only the object's kept) | {100 * m["locality"]["all_background"]:.1f}% |
| all 64 | {100 * m["locality"]["all"]:.1f}% |
{locality_note}
Trained here; quality numbers on this model are real measurements, not random-weight numbers.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


# --------------------------------------------------------------------------- evaluation
def evaluate(model, processor, args):
    t_eval = time.time()
    items = easy_vqa_items("test", limit=args.eval_limit, seed=0, kinds=args.kinds)
    acc, preds = vqa_accuracy(model, processor, items, batch_size=args.eval_batch, return_predictions=True,
                              progress=True, mininterval=10)
    eval_s = time.time() - t_eval
    print(f"test accuracy {acc:.4f} on {len(items)} questions ({eval_s:.1f}s): {by_type(items, preds)}")
    locality = locality_check(model, processor, easy_vqa_items("test", limit=1000, seed=0))
    print(f"visual-token locality: {locality}")
    return items, acc, preds, eval_s, locality


def evaluate_saved(args):
    """``--eval-only``: the saved model's evaluation and card again, its training record unchanged."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = os.path.join(args.out, "training_metrics.json")
    with open(path) as f:
        m = json.load(f)
    args.kinds = m["args"]["kinds"]
    if args.eval_limit is None:
        args.eval_limit = m["args"]["eval_limit"]
    model = LlavaForConditionalGeneration.from_pretrained(args.out, local_files_only=True).eval()
    processor = LlavaProcessor.from_pretrained(args.out, local_files_only=True)
    items, acc, preds, eval_s, locality = evaluate(model, processor, args)
    exe = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else "python"
    m.update(test_accuracy=acc, test_questions=len(items), by_type=by_type(items, preds), eval_seconds=round(eval_s, 1),
             locality=locality, eval_command=" ".join([exe, os.path.relpath(os.path.abspath(sys.argv[0]), REPO)]
                                                      + sys.argv[1:]))
    with open(path, "w") as f:
        json.dump(m, f, indent=2)
    write_model_card(args.out, model, processor, m)
    print(json.dumps(m, indent=2))


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vision-epochs", type=float, default=4.0, help="stage 1: passes over the train images")
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument("--vision-batch", type=int, default=32)
    ap.add_argument("--vision-from", default=None,
                    help="dev runs: skip stage 1 and copy the vision tower of a saved tiny-llava folder")
    ap.add_argument("--epochs", type=float, default=3.0, help="stage 2: passes over the train images")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--images-per-batch", type=int, default=16)
    ap.add_argument("--questions-per-image", type=int, default=4,
                    help="stage 2: questions per image per pass (easy-vqa has ~9.6 per image); 0 = all")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--no-hflip", dest="hflip", action="store_false", help="disable horizontal-flip augmentation")
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--text-hidden", type=int, default=128)
    ap.add_argument("--text-intermediate", type=int, default=384)
    ap.add_argument("--text-layers", type=int, default=6)
    ap.add_argument("--untie", dest="tie", action="store_false",
                    help="separate input embedding and LM head (default: tied, as in small LLMs such as SmolLM2)")
    ap.add_argument("--limit-images", type=int, default=None, help="dev runs: train on the first N images")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="evaluate on a fixed subset (easy_vqa_items(limit=N, seed=0)); default: full test split")
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is fastest on a busy 2-core machine (2 threads oversubscribe when other jobs run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--kinds", nargs="+", default=["easy-vqa"], choices=vqa_data.KINDS,
                    help="question kinds to train and evaluate on (vqa_data.easy_vqa_items); the derived "
                         "position / size questions need the layout of the visual tokens. Default: easy-vqa")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: evaluate the model saved in --out again and rewrite its metrics' "
                         "evaluation and its card (the training record is kept)")
    ap.add_argument("--patch-position", action=argparse.BooleanOptionalAction, default=None,
                    help="stage 1 also trains each patch feature to give its (row, col); default: on with "
                         "--kinds position (left/right needs the column, which the token order does not give)")
    args = ap.parse_args()
    args.kinds = list(vqa_data._check_kinds(args.kinds))
    if args.patch_position is None:
        args.patch_position = "position" in args.kinds
    if "position" in args.kinds and args.hflip:
        print("--kinds position: horizontal flips would swap left/right answers; training without them")
        args.hflip = False

    t0 = time.time()
    torch.set_num_threads(args.threads)
    if args.eval_only:
        return evaluate_saved(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    import easy_vqa

    tq, ta, _ = easy_vqa.get_train_questions()
    processor = build_processor(tq, ta, derived_texts(args.kinds))
    tok = processor.tokenizer
    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}, image token id {model.config.image_token_id}, params {n_params / 1e6:.2f}M")
    pix, plab, per_image, n_labeled, prefix_ids = load_train(processor, args.limit_images, args.kinds)
    n_q = sum(len(p) for p in per_image)
    print(f"train: {len(per_image)} images ({n_labeled} with a color+shape label), {n_q} questions, "
          f"cached in {time.time() - t0:.1f}s")
    check_equivalence(model, processor, pix, per_image, prefix_ids)

    t_train = time.time()
    if args.vision_from:
        from transformers import LlavaForConditionalGeneration

        src = LlavaForConditionalGeneration.from_pretrained(args.vision_from, local_files_only=True)
        model.model.vision_tower.load_state_dict(src.model.vision_tower.state_dict())
        steps1 = 0
    else:
        steps1 = train_vision(model, pix, plab, args, gen)
    t_stage1 = time.time() - t_train
    print(f"stage 1: {steps1} steps in {t_stage1:.1f}s")

    model.eval()
    with torch.no_grad():  # frozen vision features, plain and horizontally flipped: [2, N, 64, D]
        feats = torch.stack([torch.cat([vision_features(model, x[s: s + 256]) for s in range(0, len(x), 256)])
                             for x in (pix, pix.flip(-1))])
    steps2, steps_per_epoch = train_lm(model, feats, prefix_ids, per_image, tok, args, rng, gen)
    train_s = time.time() - t_train
    print(f"stage 2: {steps2} steps; training total {train_s:.1f}s")
    check_equivalence(model, processor, pix, per_image, prefix_ids)

    model.eval()
    items, acc, preds, eval_s, locality = evaluate(model, processor, args)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    os.chmod(os.path.join(args.out, "model.safetensors"), 0o644)  # written 0600; it ships as package data
    processor.save_pretrained(args.out)
    exe = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else "python"
    metrics = {
        "test_accuracy": acc, "test_questions": len(items), "by_type": by_type(items, preds),
        "eval_split": (("the full easy-vqa test split" if args.eval_limit is None
                        else f"easy_vqa_items('test', limit={args.eval_limit}, seed=0)") if args.kinds == ["easy-vqa"]
                       else f"easy_vqa_items('test', limit={args.eval_limit}, seed=0, kinds={tuple(args.kinds)})"),
        "kinds": args.kinds,
        "stage1_seconds": round(t_stage1, 1), "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "stage1_steps": steps1, "steps": steps2, "train_questions": n_q, "train_images": len(per_image),
        "vqa_train_images": sum(1 for q in per_image if q),
        "labeled_images": n_labeled, "params": n_params, "torch": torch.__version__, "threads": args.threads,
        "command": " ".join([exe, os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:]),
        "args": vars(args) | {"out": os.path.relpath(args.out, REPO)},
        "locality": locality, "total_seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(args.out, "training_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    write_model_card(args.out, model, processor, metrics)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
