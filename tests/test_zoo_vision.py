"""The small trained vision zoo models load offline, have the advertised shapes, and are
actually trained (accuracy on real test images far above chance)."""
import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.zoo import data, vision


@pytest.fixture(scope="module")
def tiny_vit():
    return tp.zoo.load("tiny-vit")


@pytest.fixture(scope="module")
def tiny_clip():
    return tp.zoo.load("tiny-clip")


def test_registered():
    assert {"tiny-vit", "tiny-clip"} <= set(tp.zoo.names())


def test_data_helpers():
    x, y = data.fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    im, c, s = data.easy_vqa_shapes("test")
    assert im.shape == (1000, 64, 64, 3) and im.dtype == np.uint8
    assert c.max() < len(data.EASY_VQA_COLORS) and s.max() < len(data.EASY_VQA_SHAPES)
    assert len(np.unique(c * 3 + s)) == 24


def test_tiny_vit_shapes(tiny_vit):
    from transformers import ViTForImageClassification

    model, processor = tiny_vit
    assert isinstance(model, ViTForImageClassification) and not model.training
    x, _ = data.fashion_mnist("test")
    px = processor(images=vision._as_pil(x[:4]), return_tensors="pt")["pixel_values"]
    assert px.shape == (4, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=px, output_hidden_states=True)
    assert out.logits.shape == (4, 10)
    assert out.hidden_states[-1].shape == (4, 1 + 64, model.config.hidden_size)  # CLS + 64 patches
    assert model.config.num_hidden_layers >= 6
    assert model.config.id2label[7] == "sneaker"


def test_tiny_vit_accuracy(tiny_vit):
    model, processor = tiny_vit
    acc = vision.tiny_vit_accuracy(model, processor, limit=500)
    assert acc > 0.80, acc  # chance 0.10; 500 images: ~0.88, full test set: see the model card


def test_tiny_clip_shapes(tiny_clip):
    import open_clip

    model, (preprocess, tokenizer) = tiny_clip
    assert isinstance(model, open_clip.model.CLIP) and not model.training
    assert isinstance(model.visual, open_clip.transformer.VisionTransformer)
    x, _ = data.fashion_mnist("test")
    im = torch.stack([preprocess(p) for p in vision._as_pil(x[:3])])
    assert im.shape == (3, 3, 32, 32)
    tokens = tokenizer(["a photo of a sneaker", "a photo of a red circle"])
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        img = model.encode_image(im, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
    assert img.shape == (3, 64) and txt.shape == (2, 64)
    # 64 patch tokens + CLS inside the vision tower
    seen = {}
    h = model.visual.transformer.resblocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    try:
        with torch.no_grad():
            model.encode_image(im)
    finally:
        h.remove()
    assert 1 + 64 in seen["x"].shape


def test_tiny_clip_zero_shot(tiny_clip):
    model, (preprocess, tokenizer) = tiny_clip
    fm = vision.tiny_clip_zero_shot(model, preprocess, tokenizer, "fashion-mnist", limit=300)
    vqa = vision.tiny_clip_zero_shot(model, preprocess, tokenizer, "easy-vqa", limit=300)
    assert fm > 0.75, fm    # chance 0.10; 300 images: ~0.89, full test set: see the model card
    assert vqa > 0.80, vqa  # chance 1/24; 300 images: ~0.97
