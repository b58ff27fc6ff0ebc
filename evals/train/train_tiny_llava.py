"""Train ``tiny-llava``: a small LLaVA (CLIP ViT tower + MLP projector + Llama decoder) on easy-vqa.

Run from the repository root::

    .venv/bin/python evals/train/train_tiny_llava.py

Everything is offline: the tokenizer is built here from the easy-vqa vocabulary, the model
from config objects with random init, and the data comes from the ``easy-vqa`` PyPI package.
The result (safetensors model + tokenizer + processor + model card) is written to
``tokenprune/zoo/weights/tiny-llava/`` and loaded by ``tp.zoo.load("tiny-llava")``.

Model: ``LlavaForConditionalGeneration``. Images are 64x64, the CLIP vision tower uses 8x8
patches -> 64 patch tokens (+ CLS, dropped by ``vision_feature_select_strategy="default"``),
so each ``<image>`` in the prompt is expanded by ``LlavaProcessor`` into 64 ``<image>`` tokens
(``config.image_token_id``) whose embeddings are replaced by the projected patch features.

Training: LM loss on the answer word + ``</s>`` only, AdamW, warmup + cosine LR, fixed seeds.
To run the vision tower once per image instead of once per question, a batch is a group of
images together with *all* of their questions; image features are computed once and scattered
into the question sequences exactly as ``LlavaModel.forward`` does (same ``<image>``
placeholder positions, same ``masked_scatter``). Evaluation uses the public path only:
``processor(images=..., text=...)`` + ``model.generate`` (greedy, left padding) through
``tokenprune.zoo.vqa_data.vqa_accuracy``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402



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

OUT_DIR = os.path.join(REPO, "tokenprune", "zoo", "weights", "tiny-llava")

IMAGE_SIZE = 64
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


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


def build_processor(train_questions, train_answers):
    from tokenizers import pre_tokenizers
    from transformers import LlavaImageProcessor, LlavaProcessor

    pre = pre_tokenizers.Whitespace()
    words = corpus_words(pre, list(train_questions) + list(train_answers) + [build_prompt("")])
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
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=NUM_IMAGE_TOKENS, multimodal_projector_bias=True, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(cfg)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    gc.max_new_tokens, gc.do_sample = 3, False
    return model


# --------------------------------------------------------------------------- data
def load_train(processor, limit_images=None):
    """Cache everything in memory: pixel tensors per image, token ids + label start per question."""
    import easy_vqa
    from PIL import Image

    qs, ans, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    image_ids = sorted(paths)
    if limit_images:
        image_ids = image_ids[:limit_images]
    index = {iid: k for k, iid in enumerate(image_ids)}
    imgs = [Image.open(paths[i]).convert("RGB") for i in image_ids]
    pix = processor.image_processor(imgs, return_tensors="pt")["pixel_values"]  # [N,3,64,64]
    tok = processor.tokenizer
    image_tok = "<image>" * NUM_IMAGE_TOKENS
    per_image = [[] for _ in image_ids]
    for q, a, i in zip(qs, ans, ids):
        if i not in index:
            continue
        prompt = build_prompt(q).replace("<image>", image_tok)
        p_ids = tok(prompt)["input_ids"]  # with <s>
        a_ids = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        per_image[index[i]].append((p_ids + a_ids, len(p_ids)))
    return pix, per_image


def make_batches(per_image, images_per_batch, questions_per_image, rng):
    """One pass over the images (an "epoch"): batches of ``images_per_batch`` images, each with
    ``questions_per_image`` of its questions drawn without replacement (all if None)."""
    order = list(range(len(per_image)))
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


def collate(batch, pad_id):
    seqs, owners, starts = [], [], []
    for k, (_, qs) in enumerate(batch):
        for ids, start in qs:
            seqs.append(ids)
            owners.append(k)
            starts.append(start)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for r, (s, st) in enumerate(zip(seqs, starts)):  # right padding for training; generate uses
        input_ids[r, : len(s)] = torch.tensor(s)       # left padding + mask-derived position ids
        attn[r, : len(s)] = 1
        labels[r, st: len(s)] = torch.tensor(s[st:])
    return input_ids, attn, labels, torch.tensor(owners)


def forward_loss(model, pix, input_ids, attn, labels, owners):
    """Same computation as ``model(input_ids, pixel_values, ...)`` but the vision tower runs
    once per distinct image; features are then copied to each question of that image."""
    feats = model.model.get_image_features(pixel_values=pix, return_dict=True).pooler_output
    feats = torch.stack(list(feats))[owners]  # [B, 64, D]
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    out = model(inputs_embeds=embeds, attention_mask=attn, labels=labels)
    # teacher-forced accuracy of the answer word (first supervised token of each row)
    with torch.no_grad():
        first = (labels != -100).int().argmax(1)
        rows = torch.arange(len(first))
        acc = (out.logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean()
    return out.loss, acc.item()


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--images-per-batch", type=int, default=16)
    ap.add_argument("--questions-per-image", type=int, default=4,
                    help="questions per image per epoch (easy-vqa has ~9.6 per image); 0 = all")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--text-hidden", type=int, default=64)
    ap.add_argument("--text-intermediate", type=int, default=256)
    ap.add_argument("--text-layers", type=int, default=6)
    ap.add_argument("--limit-images", type=int, default=None, help="dev runs: train on the first N images")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="evaluate on a fixed subset (easy_vqa_items(limit=N, seed=0)); default: full test split")
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is fastest on a busy 2-core machine (2 threads oversubscribe when other jobs run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--bench", type=int, default=0, help="only time N training steps and exit")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    import easy_vqa

    t0 = time.time()
    tq, ta, _ = easy_vqa.get_train_questions()
    processor = build_processor(tq, ta)
    tok = processor.tokenizer
    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}, image token id {model.config.image_token_id}, params {n_params / 1e6:.2f}M")
    pix, per_image = load_train(processor, args.limit_images)
    n_q = sum(len(p) for p in per_image)
    print(f"train: {len(per_image)} images, {n_q} questions, cached in {time.time() - t0:.1f}s")

    rng = random.Random(args.seed)
    steps_per_epoch = math.ceil(len(per_image) / args.images_per_batch)
    total = int(round(args.epochs * steps_per_epoch)) if not args.bench else args.bench
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    model.train()
    t_train = time.time()
    step, ema = 0, None
    bar = tqdm(total=total, desc="train", unit="step", mininterval=10)
    while step < total:
        for b in make_batches(per_image, args.images_per_batch, args.questions_per_image, rng):
            if step >= total:
                break
            input_ids, attn, labels, owners = collate(b, tok.pad_token_id)
            loss, acc = forward_loss(model, pix[[img for img, _ in b]], input_ids, attn, labels, owners)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            cur = torch.tensor([loss.item(), acc])
            ema = cur if ema is None else 0.95 * ema + 0.05 * cur
            bar.set_postfix(loss=f"{ema[0]:.4f}", acc=f"{ema[1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if step % args.log_every == 0 or step == total:
                tqdm.write(f"step {step}/{total} loss {ema[0]:.4f} answer-acc {ema[1]:.3f} ({time.time() - t_train:.0f}s)")
            bar.update(1)
    bar.close()
    train_s = time.time() - t_train
    print(f"trained {total} steps ({total / steps_per_epoch:.2f} epochs) in {train_s:.1f}s")
    if args.bench:
        print(f"{train_s / total:.3f} s/step, epoch ~ {train_s / total * steps_per_epoch / 60:.1f} min")
        return

    model.eval()
    t_eval = time.time()
    items = easy_vqa_items("test", limit=args.eval_limit, seed=0)
    acc = vqa_accuracy(model, processor, items, batch_size=args.eval_batch, progress=True, mininterval=10)
    eval_s = time.time() - t_eval
    print(f"test accuracy {acc:.4f} on {len(items)} questions ({eval_s:.1f}s)")

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    metrics = {
        "test_accuracy": acc, "test_questions": len(items),
        "eval_split": "easy-vqa test (all)" if args.eval_limit is None else f"easy_vqa_items('test', limit={args.eval_limit}, seed=0)",
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1), "steps": total,
        "epochs": args.epochs, "train_questions": n_q, "train_images": len(per_image), "params": n_params,
        "torch": torch.__version__, "threads": args.threads,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "args": vars(args) | {"out": os.path.relpath(args.out, REPO)},
    }
    with open(os.path.join(args.out, "training_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
