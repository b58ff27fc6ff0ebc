"""Small vision models trained here on package-shipped data (see each model card).

* ``tiny-vit``: ``transformers.ViTForImageClassification`` (DeiT-style, CLS token, 6 layers,
  hidden 128, 32x32 input / 4x4 patches = 64 patch tokens) trained on Fashion-MNIST.
* ``tiny-clip``: ``open_clip.model.CLIP`` (ViT image tower with 64 patch tokens + CLS, small
  text transformer) trained contrastively on captioned Fashion-MNIST + easy-vqa images.

Weights live in ``tokenprune/zoo/weights/<name>/`` (safetensors + config + README.md model
card); training scripts are ``evals/train/train_tiny_vit.py`` / ``train_tiny_clip.py``.
Nothing here touches the network.

The ``*_accuracy`` helpers run the public path (processor -> ``model(...)`` /
``encode_image``), so they measure whatever pruning is attached to the model at the time.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import TokenPruneError
from . import register

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def weights_dir(name: str) -> Path:
    d = WEIGHTS_DIR / name
    if not d.is_dir():
        raise TokenPruneError(f"zoo weights for {name!r} not found at {d}; "
                              f"retrain with evals/train/train_{name.replace('-', '_')}.py")
    return d


@register("tiny-vit")
def load_tiny_vit(attn_implementation: str = "sdpa"):
    """Returns ``(model, processor)``.

    ``model`` is a ``transformers.ViTForImageClassification`` in eval mode (float32; labels in
    ``model.config.id2label``: the 10 Fashion-MNIST classes). ``processor`` is a
    ``transformers.ViTImageProcessor``: ``processor(images=[PIL images or HxWx3 uint8 arrays],
    return_tensors="pt")["pixel_values"]`` gives ``[N, 3, 32, 32]`` (grayscale is replicated to
    RGB, resized bilinearly to 32x32, normalised). Pass 2-D grayscale numpy arrays as PIL images
    (``PIL.Image.fromarray(a)``) -- the processor cannot tell their channel axis.
    """
    from transformers import ViTForImageClassification, ViTImageProcessor

    d = weights_dir("tiny-vit")
    model = ViTForImageClassification.from_pretrained(
        d, local_files_only=True, attn_implementation=attn_implementation)
    processor = ViTImageProcessor.from_pretrained(d, local_files_only=True)
    return model.eval(), processor


@register("tiny-clip")
def load_tiny_clip():
    """Returns ``(model, (preprocess, tokenizer))``.

    ``model`` is an ``open_clip.model.CLIP`` in eval mode (float32; ``model.visual`` is an
    ``open_clip`` ``VisionTransformer`` with 64 patch tokens + CLS). ``preprocess`` is open_clip's
    eval transform (PIL image -> ``[3, 32, 32]`` tensor); ``tokenizer`` is open_clip's
    ``SimpleTokenizer`` (context length 16; list of strings -> ``[N, 16]`` long tensor).
    Typical use::

        img = model.encode_image(torch.stack([preprocess(im) for im in pil_images]), normalize=True)
        txt = model.encode_text(tokenizer(["a photo of a sneaker", "a photo of a red circle"]), normalize=True)
        probs = (100 * img @ txt.T).softmax(-1)

    The same folder also loads with open_clip alone:
    ``open_clip.create_model_and_transforms("local-dir:" + str(weights_dir("tiny-clip")))``.
    """
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover
        raise TokenPruneError("tiny-clip needs open_clip: pip install open_clip_torch") from e

    spec = "local-dir:" + str(weights_dir("tiny-clip"))
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    tokenizer = open_clip.get_tokenizer(spec)
    return model.eval(), (preprocess, tokenizer)


def _as_pil(images):
    from PIL import Image

    return [Image.fromarray(a) for a in images]


def tiny_vit_accuracy(model, processor, limit: int | None = None, batch_size: int = 250) -> float:
    """Top-1 accuracy of a tiny-vit model on the Fashion-MNIST test split (first ``limit``)."""
    import torch

    from .data import fashion_mnist

    images, labels = fashion_mnist("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            px = processor(images=_as_pil(images[i: i + batch_size]), return_tensors="pt")["pixel_values"]
            pred = model(pixel_values=px).logits.argmax(-1)
            correct += int((pred == torch.tensor(labels[i: i + batch_size])).sum())
    return correct / len(images)


def tiny_clip_zero_shot(model, preprocess, tokenizer, dataset: str = "fashion-mnist",
                        limit: int | None = None, template: str = "a photo of a {}",
                        batch_size: int = 250) -> float:
    """Zero-shot accuracy of a tiny-clip model on a test split.

    ``dataset`` is ``"fashion-mnist"`` (10 classes) or ``"easy-vqa"`` (24 color+shape classes,
    e.g. "red circle"). Each image goes to the class whose ``template.format(name)`` text
    embedding is most similar to its image embedding.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from . import data

    if dataset == "fashion-mnist":
        images, labels = data.fashion_mnist("test")
        names = data.FASHION_MNIST_CLASSES
    elif dataset == "easy-vqa":
        images, colors, shapes = data.easy_vqa_shapes("test")
        labels = colors * len(data.EASY_VQA_SHAPES) + shapes
        names = data.EASY_VQA_CLASSES
    else:
        raise ValueError(f"dataset must be 'fashion-mnist' or 'easy-vqa', got {dataset!r}")
    if limit:
        images, labels = images[:limit], labels[:limit]
    correct = 0
    with torch.no_grad():
        txt = F.normalize(model.encode_text(tokenizer([template.format(n) for n in names])), dim=-1)
        for i in range(0, len(images), batch_size):
            x = torch.stack([preprocess(im) for im in _as_pil(images[i: i + batch_size])])
            img = F.normalize(model.encode_image(x), dim=-1)
            pred = (img @ txt.T).argmax(-1)
            correct += int((pred == torch.tensor(np.asarray(labels[i: i + batch_size]))).sum())
    return correct / len(images)
