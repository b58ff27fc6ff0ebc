"""The trained tiny-llava zoo model: offline load, batched left-padded generate, real accuracy."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("easy_vqa")

import tokenprune as tp  # noqa: E402
from tokenprune.zoo.llava import WEIGHTS_DIR  # noqa: E402  (importing it registers "tiny-llava")
from tokenprune.zoo.vqa_data import (  # noqa: E402
    EASY_VQA_ANSWERS, build_prompt, easy_vqa_items, format_answer, parse_answer, vqa_accuracy,
)


@pytest.fixture(scope="module")
def tiny_llava():
    return tp.zoo.load("tiny-llava")


def test_loads_offline_in_eval_mode(tiny_llava):
    model, processor = tiny_llava
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert not model.training
    assert processor.tokenizer.padding_side == "left"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert "tiny-llava" in tp.zoo.names() and WEIGHTS_DIR.endswith("tiny-llava")


def test_image_tokens_expanded(tiny_llava):
    model, processor = tiny_llava
    (img, q, _), = easy_vqa_items("test", limit=1)
    inputs = processor(images=[img], text=[build_prompt(q)], return_tensors="pt")
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_img == model.config.image_seq_length == 64
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)


def test_batched_generate_left_padding_matches_single(tiny_llava):
    model, processor = tiny_llava
    items = easy_vqa_items("test", limit=6, seed=1)
    prompts = [build_prompt(q) for _, q, _ in items]
    batch = processor(images=[i for i, _, _ in items], text=prompts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 1).all(), "prompts must be left padded"
    assert (mask == 0).any(), "test needs prompts of different lengths"
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False)  # generation config: up to 6 tokens
    batched = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for (img, q, _), got in zip(items, batched):
        single = processor(images=[img], text=[build_prompt(q)], return_tensors="pt")
        with torch.inference_mode():
            o = model.generate(**single, do_sample=False)
        want = processor.tokenizer.decode(o[0, single["input_ids"].shape[1]:], skip_special_tokens=True)
        assert got.strip() == want.strip()
        assert parse_answer(got) in EASY_VQA_ANSWERS


def test_answer_format_round_trip():
    assert format_answer("is there a blue shape?", "red", "circle", "no") == "blue red . no"
    assert format_answer("is no rectangle present?", "red", "circle", "yes") == "not rectangle circle . yes"
    assert format_answer("what color is the shape?", "red", "circle", "red") == "red"
    assert parse_answer("not rectangle circle. yes") == "yes"


def test_accuracy_well_above_chance(tiny_llava):
    model, processor = tiny_llava
    items = easy_vqa_items("test", limit=128, seed=0)
    acc = vqa_accuracy(model, processor, items, batch_size=64)
    # chance: ~50% on yes/no (74% of questions), 1/3 on shapes, 1/8 on colors -> ~0.43
    assert acc >= 0.85, acc


def test_answers_where_the_shape_is_and_how_large(tiny_llava):
    """The shipped model is trained on the position / size questions derived from the image masks too;
    left / right needs each visual token's column (its tower was trained to keep it, see the card)."""
    from tokenprune.zoo.vqa_data import kind_of

    model, processor = tiny_llava
    items = easy_vqa_items("test", limit=96, seed=0, kinds=("position", "size"))
    _, preds = vqa_accuracy(model, processor, items, batch_size=96, return_predictions=True)
    groups = {"left/right": [], "top/bottom": [], "size": []}
    for (_, q, a), p in zip(items, preds):
        groups["size" if kind_of(q) == "size" else "left/right" if "left" in q else "top/bottom"].append(p == a)
    for name, hits in groups.items():
        assert len(hits) >= 15 and sum(hits) / len(hits) >= 0.85, (name, sum(hits), len(hits))
