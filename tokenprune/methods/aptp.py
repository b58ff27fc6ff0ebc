"""APTP: adaptive prompt-tailored pruning of a text-to-image U-Net (Ganjdanesh et al., 2024).

A router (:mod:`.aptp_router`) reads each prompt's frozen text-encoder states (the U-Net call's
``encoder_hidden_states``) and picks one of ``K`` architecture codes; a code keeps some
attention heads and feed-forward channels in every transformer block of the U-Net. Easy
prompts can go to narrow codes, hard ones to wide codes.

The speed is real: when the pruner is attached (``tp.prune(pipe, tp.build_pruner("aptp"))``)
the U-Net adapter slices every code once into smaller copies of the transformer blocks' parts
(an *expert* per code: the kept heads' and channels' weights copied, as ``slice_unet`` does
for a whole U-Net). Each U-Net call groups its rows by code; every block part runs each group
through that code's copy and puts the rows back in order (the convolutions, which APTP does
not prune, run once on the whole batch). The unconditional rows of classifier-free guidance
take the code of their prompt (the prompted row with the same noisy input; with a negative
prompt, the wider of the two rows' codes: see ``APTP.route``), so guidance subtracts two outputs
of one expert. A code whose depth gate drops a block has that block's attn1 / attn2 / ff
removed in its expert. ``handle.stats.codes`` lists the code of every row.

``checkpoint``: a shipped testbed name (``"tiny-t2i"``), or a path to a trained router (a
folder holding ``aptp.safetensors`` + ``config.json``, or that file). The router is trained
for one U-Net layout; attaching it to a U-Net of other widths raises before anything is hooked.
``code``: run every row on this code (a static expert of the codebook; None: route).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import TokenPruneError
from ..pruner import Pruner, register_pruner
from .aptp_router import CONFIG, FILE, VERSION, APTPRouter
from .checkpoints import WEIGHTS_DIR, is_name, shipped

LAYOUT_KEYS = ("heads", "head_dim", "channels", "dim", "context_dim")


def layout_of(units: list[dict]) -> list[dict]:
    """Per transformer block, the widths a router is trained for, read from the weight views of
    ``adapters.unet.width_units`` (heads: to_q / to_k / to_v / to_out of attn1, then of attn2)."""
    out = []
    for u in units:
        heads, head_dim, dim = u["heads"][0].shape
        context_dim = u["heads"][5].shape[-1] if len(u["heads"]) > 4 else 0
        out.append(dict(heads=heads, head_dim=head_dim, channels=u["channels"][0].shape[0], dim=dim,
                        context_dim=context_dim))
    return out


def checkpoint_folder(checkpoint: str) -> str:
    """A shipped testbed name's router folder, or a path (folder or its ``aptp.safetensors``)."""
    own = os.path.join(WEIGHTS_DIR, checkpoint, "aptp")
    if is_name(checkpoint) and os.path.isfile(os.path.join(own, FILE)):
        return own
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or "."
    if not (os.path.isfile(os.path.join(folder, FILE)) and os.path.isfile(os.path.join(folder, CONFIG))):
        raise TokenPruneError(f"aptp: no router {checkpoint!r}: give a folder holding {FILE} and {CONFIG} "
                              f"or a shipped testbed name ({', '.join(shipped('aptp', FILE)) or 'none shipped'})")
    return folder


@lru_cache(maxsize=8)
def load_router(folder: str) -> APTPRouter:
    from safetensors.torch import load_file

    try:
        with open(os.path.join(folder, CONFIG)) as f:
            config = json.load(f)
        tensors = load_file(os.path.join(folder, FILE))
    except Exception as e:  # not JSON / not safetensors
        raise TokenPruneError(f"aptp: cannot read the router in {folder}: {e}") from None
    if config.get("method") != "aptp" or config.get("version") != VERSION:
        raise TokenPruneError(f"aptp: {folder} is not an APTP router of version {VERSION} "
                              f"(method={config.get('method')!r}, version={config.get('version')!r})")
    keys = ("layout", "num_codes", "text_dim", "hidden", "channel_group", "temperature", "offset", "tokens", "context",
            "depth_offset")
    try:
        router = APTPRouter(**{k: config[k] for k in keys})
        router.load_state_dict(tensors)
        router.trained = bool(config.get("trained", True))
    except (KeyError, ValueError, RuntimeError) as e:
        raise TokenPruneError(f"aptp: {folder} does not hold a valid router: {e}") from None
    return router.eval().requires_grad_(False)


@register_pruner("aptp")
@dataclass
class APTP(Pruner):
    """``checkpoint``: shipped testbed name or path of a trained router; ``code``: force one code."""

    checkpoint: str | None = "tiny-t2i"
    code: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.checkpoint is None:
            raise TokenPruneError("aptp needs a trained router: checkpoint='tiny-t2i' or a path "
                                  "(train one with evals/train/train_aptp.py)")
        if not isinstance(self.checkpoint, str):
            raise TokenPruneError(f"aptp: checkpoint must be a testbed name or a path, got {self.checkpoint!r}")
        self.router = load_router(os.path.abspath(checkpoint_folder(self.checkpoint)))
        if self.code is not None and (isinstance(self.code, bool) or not isinstance(self.code, int)
                                      or not 0 <= self.code < self.router.num_codes):
            raise TokenPruneError(f"aptp: code must be None or an integer in 0..{self.router.num_codes - 1}, "
                                  f"got {self.code!r}")

    def layers(self) -> list[int]:
        return []  # no token reduction: the blocks get narrower (``experts``, ``route``)

    def select(self, state):
        return None

    # ---- the width-pruning protocol of the U-Net adapter (``experts`` + ``route``) -----------
    def experts(self, units: list[dict]) -> list[dict]:
        """Per code, the heads and feed-forward channels it keeps in each transformer block, for a
        U-Net whose blocks' weights are ``units`` (see ``adapters.unet.width_units``); raises if
        the router was trained for other widths."""
        trained = [{k: b[k] for k in LAYOUT_KEYS} for b in self.router.config["layout"]]
        given = layout_of(units)
        if trained != given:
            i = next((i for i, (a, b) in enumerate(zip(trained, given)) if a != b), min(len(trained), len(given)))
            raise TokenPruneError(
                f"aptp: router {self.checkpoint!r} was trained for a U-Net with {len(trained)} transformer blocks "
                f"({trained[i] if i < len(trained) else 'none'} at block {i}); this U-Net has {len(given)} "
                f"({given[i] if i < len(given) else 'none'} there)")
        out = []
        for k in range(self.router.num_codes):
            heads, channels = self.router.code_masks(k)
            out.append({"heads": heads, "channels": channels})
        return out

    @torch.no_grad()
    def route(self, context: torch.Tensor, mask: torch.Tensor | None = None,
              sample: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) code of each row of a U-Net call from its text states ``context`` (B, L, D).

        Classifier-free guidance pairs: when the two halves of the call's noisy ``sample`` are
        bit-identical (diffusers and tiny-t2i run ``cat([x, x])``), row i and row i + B/2 are
        one image's two guidance rows and must run on one expert, or guidance would subtract two
        different models' outputs. The pair takes the prompted row's code when the other row is
        the unconditional (empty) prompt, else (a negative prompt: the call cannot tell which
        row is the prompt) the wider of the two rows' codes, so a prompt never runs narrower
        than its own code.
        """
        B = context.shape[0]
        if self.code is not None:
            return torch.full((B,), self.code, dtype=torch.long)
        dim = self.router.config["text_dim"]
        if context.dim() != 3 or context.shape[-1] != dim:
            raise TokenPruneError(f"aptp: the router reads text states of width {dim}; this call's "
                                  f"encoder_hidden_states have shape {tuple(context.shape)}")
        context = context.detach().float().cpu()  # the router is small: it runs on the CPU
        mask = mask.detach().cpu() if mask is not None and mask.dim() == 2 else None  # not an additive bias
        codes = self.router.nearest(self.router(context, mask))
        h = B // 2
        if sample is None or B % 2 or not torch.equal(sample[:h], sample[h:]):
            return codes
        null = self.router.is_null(context, mask)
        a, b = codes[:h], codes[h:]
        shares = torch.tensor(self.code_shares())
        wider = torch.where(shares[a] >= shares[b], a, b)
        pair = torch.where(null[h:] & ~null[:h], a, torch.where(null[:h] & ~null[h:], b, wider))
        return torch.cat([pair, pair])

    def code_shares(self) -> list[float]:
        """Per code, the share of the transformer blocks' prunable MACs it keeps (trained resolution)."""
        if not hasattr(self, "_shares"):
            self._shares = [self.router.kept_share(k) for k in range(self.router.num_codes)]
        return self._shares
