"""LLaVA-style LVLMs: a vision tower, a projector and a decoder (``LlavaForConditionalGeneration``).

Reuse, not a fork: the decoder is pruned by the :class:`DecoderAdapter`, the vision tower by
the :class:`EncoderAdapter`. What only this adapter knows, it adds around them:

- which prompt positions are visual (``input_ids == config.image_token_id``), text or padding,
  handed to the decoder as its segment map for each call of ``model(...)`` / ``generate``;
- for each visual token, its image (in the batch's flattened image order, which is how LLaVA
  scatters features into the prompt) and its (row, col) in that image's patch grid, plus
  lazily computed facts spatial / tower-guided methods read through ``TokenState.info``:
  ``"patch_pixels"`` (the image pixels under the token's patch), ``"vision_cls_attention"``
  and ``"vision_keys"`` (the tower's CLS attention to, and key of, each patch at LLaVA's
  feature layer);
- routing each pruner of a list by its ``target``: ``"vision"`` to the tower, ``"language"``
  to the decoder.

Pruning "before the projector" (VisionZip-style) is a reduction of the visual segment before
decoder layer 0, scored from the tower: the language model runs on, and caches, only the
kept tokens (see adapters/decoder.py for how decode steps stay in dense positions).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import TokenPruneError, UnsupportedModelError
from ..state import Segment
from .base import HookedAdapter, attention_probs
from .decoder import DecoderAdapter, find_decoder
from .encoder import EncoderAdapter, find_tower


def find_lvlm(model: nn.Module):
    """``(inner, config)`` of a LLaVA-style model: the module holding tower, projector and decoder."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and all(hasattr(m, a) for a in ("vision_tower", "multi_modal_projector", "language_model")):
            config = getattr(model, "config", None)
            if getattr(config, "image_token_id", None) is not None and hasattr(config, "vision_config"):
                return m, config
    return None


class LVLMAdapter(HookedAdapter):
    family = "LLaVA-style LVLMs (LlavaForConditionalGeneration: CLIP tower + projector + Llama-family decoder)"

    @classmethod
    def matches(cls, model) -> bool:
        return find_lvlm(model) is not None

    def __init__(self, model, pruners, **decoder_options):
        self.model = model
        self.inner, self.config = find_lvlm(model)
        vision = [p for p in pruners if p.resolved_target() == "vision"]
        language = [p for p in pruners if p.resolved_target() == "language"]
        self.vision = find_tower(self.inner.vision_tower)  # its blocks, and how to read q / k from one
        self.tower = None
        if vision:
            if self.vision is None:
                raise UnsupportedModelError(
                    f"{type(self.inner.vision_tower).__name__} vision towers cannot be pruned yet "
                    f"({', '.join(p.name for p in vision)} target the vision tower)")
            self.tower = EncoderAdapter(self.inner.vision_tower, vision)
        if find_decoder(self.inner.language_model) is None:
            raise UnsupportedModelError(f"{type(self.inner.language_model).__name__} language models are not supported")
        self.decoder = DecoderAdapter(self.inner.language_model, language, **decoder_options)
        super().__init__([], 1)  # hooks + per-thread state; the sub-adapters validated their pruners
        self.pruners = list(pruners)
        vc = self.config.vision_config
        self.grid = vc.image_size // vc.patch_size
        self.patch = vc.patch_size
        self.with_cls = getattr(self.config, "vision_feature_select_strategy", "default") == "full"
        self.per_image = self.grid * self.grid + int(self.with_cls)
        layer = self.config.vision_feature_layer
        self.feature_layer = layer if isinstance(layer, int) else layer[-1]

    # ---- attach / detach -------------------------------------------------------------
    def attach(self):
        self.hook(self.inner.register_forward_pre_hook(self._open_call, with_kwargs=True))
        self.hook(self.inner.register_forward_hook(self._close_call, always_call=True))
        # The tower may run outside the model's forward (generate encodes images first), so what
        # tower-guided methods read is stashed per thread when it runs and dropped when a call ends.
        self.hook(self.inner.vision_tower.register_forward_pre_hook(self._stash_pixels, with_kwargs=True))
        if self.vision is not None:
            # hidden_states[f] is the output of block f - 1 (f > 0) or of block L + f (f < 0)
            f, blocks = self.feature_layer, self.vision.blocks
            block = blocks[f - 1 if f > 0 else len(blocks) + f]
            self.hook(block.register_forward_pre_hook(self._stash_feature_input, with_kwargs=True))
        self.decoder.attach()
        if self.tower is not None:
            self.tower.attach()

    def detach(self):
        super().detach()
        self.decoder.detach()
        if self.tower is not None:
            self.tower.detach()

    @property
    def last_stats(self):
        stats = self.decoder.last_stats
        if stats is not None and self.tower is not None:
            stats.vision = self.tower.last_stats
        return stats

    @last_stats.setter
    def last_stats(self, value):  # HookedAdapter.__init__ sets it; the decoder's stats are the ones read
        pass

    # ---- per call --------------------------------------------------------------------
    def _open_call(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] == 0:
            return None
        mask = kwargs.get("attention_mask")
        visual = ids == self.config.image_token_id
        images = self._images_given(kwargs)
        if images is not None and int(visual.sum()) != images * self.per_image:
            raise TokenPruneError(
                f"the prompt has {int(visual.sum())} image tokens but {images} image(s) give "
                f"{images * self.per_image} features ({self.per_image} each): expand each <image> with the processor")
        segments = self.segments
        if segments is None:
            segments = torch.where(visual, int(Segment.VISUAL), int(Segment.TEXT))
            if mask is not None and mask.dim() == 2:
                segments = segments.masked_fill(~mask.bool(), int(Segment.PAD))
        self.decoder._local.segments = segments
        self.decoder.token_info = self._token_info(visual) if bool(visual.any()) else {}

    def _close_call(self, module, args, output):
        self._local.pixels = self._local.feature_input = None
        self.decoder._local.segments = None
        self.decoder.token_info = None

    def _images_given(self, kwargs) -> int | None:
        """How many images this call brings (pixels, or features encoded beforehand as generate does)."""
        if kwargs.get("pixel_values") is not None:
            return kwargs["pixel_values"].shape[0]
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        features = getattr(encoded, "pooler_output", None)
        if features is None:
            return None
        return sum(f.shape[0] for f in features) // self.per_image if isinstance(features, (list, tuple)) else None

    def _token_info(self, visual: torch.Tensor) -> dict:
        """(B, N) image / row / col of every visual token (-1 elsewhere) and lazy tower facts."""
        B, N = visual.shape
        order = visual.flatten().long().cumsum(0).view(B, N) - 1  # rank among all visual tokens of the batch
        image = torch.where(visual, order // self.per_image, -1)
        patch = order % self.per_image - int(self.with_cls)  # -1: the CLS feature ("full" strategy)
        present = visual & (patch >= 0)
        row = torch.where(present, patch // self.grid, -1)
        col = torch.where(present, patch % self.grid, -1)
        where = (image.clamp_min(0), patch.clamp_min(0), present)
        tower = {}  # both tower facts come from one projection of the feature layer's input

        def tower_fact(name):
            if not tower:
                tower.update(self._tower_facts(*where))
            return tower[name]

        return {
            "image": image, "row": row, "col": col,
            "patch_pixels": lambda: self._patch_pixels(*where),
            "vision_cls_attention": lambda: tower_fact("vision_cls_attention"),
            "vision_keys": lambda: tower_fact("vision_keys"),
        }

    def _stashed(self, name: str, image: torch.Tensor) -> tuple:
        """This thread's latest tower input / feature-layer input, and ``image`` mapped onto its rows.

        generate may encode each image once and repeat its features for beams or
        ``num_return_sequences``: then image k of the prompt batch is row k // m // E * m + k % m
        of what the tower saw (m images per row, each row repeated E times).
        """
        stash = getattr(self._local, name, None)
        if stash is None:
            raise TokenPruneError("the vision tower did not run for this call (pass pixel_values)")
        seen = (stash if torch.is_tensor(stash) else stash[1]).shape[0]
        count = int(image.max()) + 1
        if count != seen:
            rows = image.shape[0]
            if count % seen or count % rows:
                raise TokenPruneError(f"the call has {count} images but the vision tower saw {seen}")
            m, repeat = count // rows, count // seen
            image = (image // m // repeat) * m + image % m
        return stash, image

    def _stash_pixels(self, module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        self._local.pixels = pixels

    def _patch_pixels(self, image, patch, present):
        """(B, N, C*p*p): the pixels under each visual token's patch (zeros elsewhere)."""
        pixels, image = self._stashed("pixels", image)
        p = self.patch
        patches = pixels.float().unfold(2, p, p).unfold(3, p, p)  # (I, C, g, g, p, p)
        I, C = patches.shape[:2]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(I, self.grid * self.grid, C * p * p)
        return patches[image, patch] * present[..., None]

    def _stash_feature_input(self, module, args, kwargs):
        self._local.feature_input = (module, args[0] if args else kwargs.get("hidden_states"))

    def _tower_facts(self, image, patch, present) -> dict:
        """(B, N) CLS -> patch attention (head mean) and (B, N, D) keys of the tower's feature layer."""
        (block, hidden), image = self._stashed("feature_input", image)
        prefix = self.vision.prefix
        if hidden.shape[1] != self.grid * self.grid + prefix:
            raise TokenPruneError("vision-tower attention is unavailable: the tower was pruned before LLaVA's feature layer")
        _, k = self.vision.project(block, hidden, need_q=False)
        q = self.vision.project(block, hidden[:, :1])[0]  # the CLS query only
        heads, scale = self.vision.heads_and_scale(block)
        I, n, D = k.shape
        split = lambda t: t.view(I, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        every = torch.ones(1, 1, 1, n, dtype=torch.bool, device=k.device)
        cls = attention_probs(split(q), split(k), scale, every).mean(1)[:, 0, prefix:]  # (I, P)
        facts = {"vision_cls_attention": cls, "vision_keys": k[:, prefix:]}
        out = {}
        for name, fact in facts.items():
            fact = fact[image, patch]
            out[name] = torch.where(present.view(*present.shape, *([1] * (fact.dim() - 2))), fact, torch.zeros_like(fact))
        return out
