"""ShortGPT (Men et al., 2024): remove the decoder blocks that change the hidden state least.

Block Influence ``BI_i = 1 - mean_t cos(x_i(t), x_{i+1}(t))`` (block input vs output, over the
tokens of calibration text); the ``round(sparsity * L)`` blocks with the lowest BI are removed:
0.3 on a 30-block model removes 9. Removal is a ``Skip`` of every token at those blocks, at
prefill and at every decode step, so no block code is forked: the blocks run on nothing and hold
no KV cache. Block 0 is never removed (HF derives new tokens' positions from its cache; its BI
is in practice among the highest).

The scores: ``scores="smollm2-135m"`` (default) reads the BI measured on SmolLM2-135M and shipped
in ``tokenprune/zoo/weights/smollm2-135m/shortgpt.json``; a list gives one BI per block; or
``blocks`` names the removed blocks directly. Another model needs its own scores: measure them
with ``block_influence(model, texts)`` (``python -m tokenprune.methods.shortgpt`` for a zoo model).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import TokenPruneError
from ..pruner import Pruner, check_ratio, register_pruner
from ..reductions import Skip

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoo", "weights")


def shipped_scores(name: str) -> list[float]:
    path = os.path.join(WEIGHTS_DIR, name, "shortgpt.json")
    if os.sep in name or "/" in name or not os.path.isfile(path):
        names = sorted(d for d in os.listdir(WEIGHTS_DIR) if os.path.isfile(os.path.join(WEIGHTS_DIR, d, "shortgpt.json")))
        raise TokenPruneError(f"shortgpt: no shipped block-influence scores {name!r} (shipped: {', '.join(names) or 'none'}); "
                              "measure them with tokenprune.methods.shortgpt.block_influence(model, texts) "
                              "and pass scores=[...]")
    with open(path) as f:
        return [float(x) for x in json.load(f)["block_influence"]]


@register_pruner("shortgpt")
@dataclass
class ShortGPT(Pruner):
    """``sparsity``: share of blocks removed; ``scores``: shipped name or per-block BI; ``blocks``:
    explicit removed blocks (overrides the scores)."""

    sparsity: float = 0.3
    scores: str | tuple[float, ...] = "smollm2-135m"
    blocks: tuple[int, ...] | None = None
    routes_decode: ClassVar[bool] = True
    reads_previous_layer: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        check_ratio(self.name, "sparsity", self.sparsity)
        if self.blocks is not None:
            if not isinstance(self.blocks, (list, tuple)) or any(
                    isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.blocks):
                raise TokenPruneError(f"shortgpt: blocks must be a list of block indices >= 1 (block 0 stays), "
                                      f"got {self.blocks!r}")
            if len(set(self.blocks)) != len(self.blocks):
                raise TokenPruneError(f"shortgpt: blocks {list(self.blocks)} repeats a block")
            self.blocks = tuple(sorted(self.blocks))
        if isinstance(self.scores, str):
            self._bi = shipped_scores(self.scores)
        elif isinstance(self.scores, (list, tuple)) and self.scores and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in self.scores):
            self.scores = tuple(float(x) for x in self.scores)
            self._bi = list(self.scores)
        else:
            raise TokenPruneError(f"shortgpt: scores must be a shipped model name or one number per block, got {self.scores!r}")

    def removed(self, num_layers: int) -> list[int]:
        """The blocks removed on a model of ``num_layers`` blocks."""
        if self.blocks is not None:
            return list(self.blocks)
        if len(self._bi) != num_layers:
            what = f"{self.scores!r}" if isinstance(self.scores, str) else "the given scores"
            raise TokenPruneError(f"shortgpt: {what} score {len(self._bi)} blocks, but this model has {num_layers}: "
                                  "measure its own with tokenprune.methods.shortgpt.block_influence(model, texts) "
                                  "and pass scores=[...] (or blocks=[...])")
        count = int(self.sparsity * num_layers + 0.5)
        if count > num_layers - 1:
            raise TokenPruneError(f"shortgpt: sparsity {self.sparsity} removes {count} of {num_layers} blocks; "
                                  f"block 0 stays, so at most {num_layers - 1}")
        order = sorted(range(1, num_layers), key=lambda i: (self._bi[i], i))
        return sorted(order[:count])

    def layers(self) -> list[int]:
        if self.blocks is not None:
            return list(self.blocks)
        return self.removed(len(self._bi))

    def layers_on(self, num_layers: int) -> list[int]:
        return self.removed(num_layers)

    def select(self, state):
        return Skip(keep=torch.zeros_like(state.valid))


@torch.no_grad()
def block_influence(model, texts, tokenizer=None, max_tokens: int = 512) -> list[float]:
    """BI of every decoder block, ``1 - mean cos(block input, block output)`` over the tokens of
    ``texts`` (strings with ``tokenizer``, or ``(1, n)`` id tensors), each cut to ``max_tokens``."""
    from tqdm import tqdm

    from ..adapters.decoder import find_decoder

    base = find_decoder(model)
    if base is None:
        raise TokenPruneError("shortgpt: block influence needs a decoder LLM (Llama-style layers)")
    sums = torch.zeros(len(base.layers), dtype=torch.float64)
    count = 0
    seen = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            seen[i] = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).double().sum()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(base.layers)]
    try:
        for text in tqdm(texts, desc="block influence", leave=False):
            ids = tokenizer(text, return_tensors="pt").input_ids if isinstance(text, str) else torch.as_tensor(text)
            ids = ids.reshape(1, -1)[:, :max_tokens].to(next(model.parameters()).device)
            model(ids, use_cache=False)
            for i, s in seen.items():
                sums[i] += s
            count += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    return (1.0 - sums / max(count, 1)).tolist()


def main(argv=None):
    """Measure a zoo model's block influence on the calibration text and write the JSON."""
    import argparse
    import time

    from .. import zoo
    from ..evals.text import calibration_text

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", type=int, default=16, help="calibration passages")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = zoo.load(args.model)
    ids = tok(calibration_text(), return_tensors="pt").input_ids[0]
    passages = [ids[j * args.max_tokens:(j + 1) * args.max_tokens] for j in range(args.texts)]
    if passages[-1].numel() < args.max_tokens:
        raise SystemExit("not enough calibration text for that many passages")
    t0 = time.time()
    bi = block_influence(model, passages, max_tokens=args.max_tokens)
    out = {"model": args.model, "block_influence": bi,
           "order_lowest_first": sorted(range(len(bi)), key=lambda i: (bi[i], i)),
           "calibration": f"evals/text.py calibration_text(): {args.texts} passages x {args.max_tokens} tokens "
                          "(pydoc_data.topics from the end, disjoint from the held-out text)",
           "command": f"python -m tokenprune.methods.shortgpt --model {args.model} --texts {args.texts} "
                      f"--max-tokens {args.max_tokens} --out <file>",
           "seconds": round(time.time() - t0, 1)}
    text = json.dumps(out, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
