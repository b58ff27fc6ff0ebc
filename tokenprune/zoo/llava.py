"""``tiny-llava``: a small LLaVA trained here on easy-vqa (weights in ``weights/tiny-llava``).

A real ``transformers.LlavaForConditionalGeneration`` (CLIP ViT vision tower -> 2-layer MLP
projector -> Llama decoder), tiny enough for CPU tests, trained by
``evals/train/train_tiny_llava.py``; see ``weights/tiny-llava/README.md`` for the model card.

Visual tokens: each 64x64 image gives 64 patch tokens (8x8 grid of 8x8 patches; the CLS token is
dropped). ``LlavaProcessor`` expands ``<image>`` in the prompt into 64 copies of the image token
(``model.config.image_token_id``), so visual positions are ``input_ids == image_token_id``, in
row-major patch order (``vqa_data.object_patches(image)`` marks the ones showing the object).
Prompts: :func:`tokenprune.zoo.vqa_data.build_prompt`; the model generates a few words before the
answer (``"blue red . no"``, see :func:`~tokenprune.zoo.vqa_data.format_answer`; greedy,
``max_new_tokens=6`` in its generation config); :func:`~tokenprune.zoo.vqa_data.parse_answer` takes
the answer word and :func:`~tokenprune.zoo.vqa_data.vqa_accuracy` scores a list of items.
"""
from __future__ import annotations

import os

from . import register

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tiny-llava")


@register("tiny-llava")
def load_tiny_llava(path: str | None = None, dtype=None):
    """Load ``(model, processor)`` offline; the model is in eval mode, the tokenizer pads left."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from ..errors import TokenPruneError

    path = path or WEIGHTS_DIR
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise TokenPruneError(
            f"tiny-llava weights not found in {path}; train them with "
            "`python evals/train/train_tiny_llava.py`")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    model.eval()
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model, processor
