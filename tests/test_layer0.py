"""Reductions before decoder layer 0: the language model runs on, and caches, the kept tokens only.

Methods that read no previous layer (``Pruner.reads_previous_layer = False``: random,
visionzip) may start at layer 0. Checked here on every decoder family against an independent
reference (the dense model run on the kept tokens at their original positions), through the
contract (keep-all exact, cached generate == recompute, padded batch == rows alone, remove),
the KV-cache rule, and on an LVLM with two images per prompt.
"""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokenprune as tp
from tokenprune.pruner import SegmentDropPruner

from .conftest import LLAVA_IMAGE_TOKEN, cache_bytes, llava_inputs, tiny_decoder, tiny_llava
from .test_contract import greedy, hook_count, params_of, prompt, recompute_step_logits

RULE = "can only be continued by the attachment that filled it"


@dataclass
class MergeBefore0(SegmentDropPruner):
    """Test-only: random candidates merge into the previous kept token, chosen from the input alone."""

    name = "test-merge-0"
    reads_previous_layer: ClassVar[bool] = False
    seed: int = 0

    def select(self, state):
        keep = tp.RandomDrop(layer=self.layer, keep_ratio=self.keep_ratio, seed=self.seed,
                             protect_first=self.protect_first, protect_last=self.protect_last).select(state).keep
        pos = torch.arange(keep.shape[1]).expand_as(keep)
        dst = torch.where(keep & state.valid, pos, -1).cummax(dim=1).values
        return tp.Merge(keep=keep, dst=dst, weight=state.hidden.norm(dim=-1))


MAKERS = {
    "random": lambda keep: tp.RandomDrop(layer=0, keep_ratio=keep, seed=3),
    "merge": lambda keep: MergeBefore0(layer=0, keep_ratio=keep),
    "random+fastv": lambda keep: [tp.RandomDrop(layer=0, keep_ratio=keep, seed=3), tp.FastV(layer=2, keep_ratio=keep)],
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_layer0_contract(decoder, name):
    ids = prompt()
    before, hooks = params_of(decoder), hook_count(decoder)
    with torch.no_grad():
        dense = decoder(ids).logits
        dense_seq, _ = greedy(decoder, ids)
        with tp.pruning(decoder, MAKERS[name](1.0)):
            assert torch.equal(decoder(ids).logits, dense), "keep-everything must be the dense model exactly"
            assert torch.equal(greedy(decoder, ids)[0], dense_seq)
        with tp.pruning(decoder, MAKERS[name](0.5)) as handle:
            pruned = decoder(ids).logits
            out = decoder.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)
            stats = handle.stats
            seq, logits = out.sequences, torch.stack(out.logits, 1)
            again = recompute_step_logits(decoder, handle, seq, ids.shape[1])
        after = decoder(ids).logits
    assert not torch.equal(pruned, dense)
    assert torch.allclose(logits, again, atol=1e-4, rtol=1e-4), "cached generate == recompute without a cache"
    # every layer, layer 0 included, ran on and cached the kept tokens only
    kept = stats.tokens_per_layer[0][0]
    assert kept < ids.shape[1] and stats.kept[0][0] and len(stats.kept[0][0]) == kept
    held = [layer.get_seq_length() for layer in out.past_key_values.layers]
    assert held[0] == kept + 4 - 1  # the last generated token is not fed back
    assert stats.kv_bytes == cache_bytes(out.past_key_values) < stats.dense_kv_bytes
    assert torch.equal(after, dense) and hook_count(decoder) == hooks
    assert all(torch.equal(v, before[k]) for k, v in decoder.state_dict().items())


@pytest.mark.parametrize("renumber", [False, True], ids=["orig-pos", "renumber"])
@pytest.mark.parametrize("family", ["llama-eager", "gemma3"])
def test_padded_batch_equals_rows_alone(family, renumber):
    model = tiny_decoder(family)
    a, b = prompt(24, seed=2)[0], prompt(15, seed=3)[0]
    batch = torch.zeros(2, 24, dtype=torch.long)
    batch[0], batch[1, 9:] = a, b
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :9] = 0
    with torch.no_grad(), tp.pruning(model, MAKERS["random"](0.4), renumber_positions=renumber) as handle:
        both = model(batch, attention_mask=mask).logits
        kept = handle.stats.tokens_per_layer[0]
        alone_a, alone_b = model(a[None]).logits, model(b[None]).logits
        seq, _ = greedy(model, batch, attention_mask=mask)
        seq_a, _ = greedy(model, a[None])
        seq_b, _ = greedy(model, b[None])
    assert kept[0] != kept[1], "rows keep different counts (padded and masked, not forced to one count)"
    assert torch.allclose(both[0], alone_a[0], atol=1e-5)
    assert torch.allclose(both[1, 9:], alone_b[0], atol=1e-5)
    assert torch.equal(seq[0, 24:], seq_a[0, 24:]) and torch.equal(seq[1, 24:], seq_b[0, 15:])


@pytest.mark.parametrize("family", ["llama-sdpa", "gemma3"])
def test_drop_before_layer0_is_the_dense_model_on_the_kept_tokens(family):
    """Independent reference: the dense model run on the kept tokens at their original positions,
    through prefill and cached decode; a dropped token's output is its input embedding."""
    model = tiny_decoder(family)
    ids = prompt(20)
    with torch.no_grad():
        with tp.pruning(model, tp.RandomDrop(layer=0, keep_ratio=0.4, seed=1)) as handle:
            pruned = model(ids).logits
            kept = torch.tensor(handle.stats.kept[0][0])
            seq, logits = greedy(model, ids, n=4)
        gone = [p for p in range(ids.shape[1]) if p not in kept.tolist()]
        assert 0 < len(kept) < ids.shape[1] and gone
        ref = model(ids[:, kept], position_ids=kept[None], attention_mask=torch.ones(1, len(kept))).logits
        assert torch.allclose(pruned[:, kept], ref, atol=1e-5)
        base = model.model
        exits = model.lm_head(base.norm(base.embed_tokens(ids[:, gone])))
        assert torch.allclose(pruned[:, gone], exits, atol=1e-5)
        P = ids.shape[1]
        for t in range(P, seq.shape[1]):  # decode: kept prompt tokens + generated ones, dense positions
            pos = torch.cat([kept, torch.arange(P, t)])
            x = torch.cat([ids[:, kept], seq[:, P:t]], 1)
            step = model(x, position_ids=pos[None], attention_mask=torch.ones(1, len(pos))).logits[:, -1]
            assert torch.allclose(step, logits[:, t - P], atol=1e-4, rtol=1e-4)


def test_beams_and_manual_decode_loop():
    model = tiny_decoder("llama-sdpa")
    ids = prompt(2 * 12).view(2, 12)
    with torch.no_grad():
        dense_beams = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False)
        with tp.pruning(model, tp.RandomDrop(layer=0, keep_ratio=1.0)):
            assert torch.equal(model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False), dense_beams)
        with tp.pruning(model, tp.RandomDrop(layer=0, keep_ratio=0.5, protect_last=2)) as handle:
            beams = model.generate(ids, max_new_tokens=4, num_beams=3, num_return_sequences=3, do_sample=False)
            assert beams.shape == (6, 16)
            # a hand-written loop passes neither positions nor a mask: the adapter supplies the dense ones
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            step = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
            seq = torch.cat([ids, nxt], 1)
            seg = torch.full(seq.shape, int(tp.Segment.TEXT))
            seg[:, -1] = int(tp.Segment.GENERATED)
            with handle.segments(seg):
                again = model(seq, use_cache=False).logits[:, -1]
    assert torch.allclose(step, again, atol=1e-4, rtol=1e-4)


def test_layer0_needs_a_method_that_reads_no_layer():
    model = tiny_decoder("llama-sdpa")
    ids = prompt()
    before, hooks = params_of(model), hook_count(model)
    with torch.no_grad():
        dense = model(ids).logits
    for name in ("fastv", "zero-tprune", "vflowopt", "atp"):
        with pytest.raises(tp.TokenPruneError, match="layer must be an integer >= 1"):
            tp.build_pruner(name, layer=0)
    with pytest.raises(tp.TokenPruneError, match="decoder layer 0 has none"):
        tp.prune(model, [tp.RandomDrop(layer=0), tp.ToMe(layer=0, segment="text")])  # on encoders ToMe may
    assert hook_count(model) == hooks and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_cache_pruned_before_layer0_follows_the_rule():
    """Every layer of such a cache holds the same count, so it is marked at prefill: a copy, another
    attachment, a cropped cache, or generate restarted from the whole sequence all get the rule
    (a copy used with no attachment at all is beyond reach, as for any pruned cache)."""
    import copy

    model = tiny_decoder("llama-sdpa")
    ids = prompt(20)
    mask = torch.ones(1, 21, dtype=torch.long)
    with torch.no_grad():
        with tp.pruning(model, tp.RandomDrop(layer=0, keep_ratio=0.5)) as handle:
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            twin = copy.deepcopy(out.past_key_values)
            with pytest.raises(tp.TokenPruneError, match=f"filled under another pruner .*{RULE}"):
                model(nxt, past_key_values=twin, attention_mask=mask)
            with pytest.raises(tp.TokenPruneError, match="continue a cache pruned before layer 0 with the new tokens"):
                model.generate(torch.cat([ids, nxt], 1), past_key_values=out.past_key_values, max_new_tokens=2,
                               do_sample=False)
            with pytest.raises(tp.TokenPruneError, match="continue a cache pruned before layer 0 with the new tokens"):
                model(nxt, past_key_values=out.past_key_values, attention_mask=torch.ones(1, 30, dtype=torch.long))
            # the refusals left the cache and its request as they were: the new token alone continues it
            step = model(nxt, past_key_values=out.past_key_values, attention_mask=mask,
                         position_ids=torch.tensor([[20]])).logits[:, -1]
            seg = torch.full((1, 21), int(tp.Segment.TEXT))
            seg[:, -1] = int(tp.Segment.GENERATED)
            with handle.segments(seg):
                again = model(torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
            assert torch.allclose(step, again, atol=1e-4, rtol=1e-4)
            out.past_key_values.crop(-3)
            with pytest.raises(tp.TokenPruneError, match=f"cropped or extended outside tokenprune; .*{RULE}"):
                model(nxt, past_key_values=out.past_key_values, attention_mask=mask[:, 2:])
        with tp.pruning(model, tp.RandomDrop(layer=0, keep_ratio=0.5)):
            with pytest.raises(tp.TokenPruneError, match=f"filled under another pruner .*{RULE}"):
                model(nxt, past_key_values=out.past_key_values, attention_mask=mask)
        with pytest.raises(tp.TokenPruneError, match=RULE):  # removed: the dense model refuses it too
            model(nxt, past_key_values=out.past_key_values, attention_mask=mask)


def test_lvlm_two_images_before_layer0():
    model, x = tiny_llava(), llava_inputs(images_per_prompt=2)
    with torch.no_grad():
        dense = model(**x).logits
        with tp.pruning(model, tp.VisionZip(keep_ratio=0.25)) as handle:  # layer 0: VisionZip's default
            pruned = model(**x).logits
            out = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 suppress_tokens=[LLAVA_IMAGE_TOKEN], return_dict_in_generate=True, output_logits=True)
            stats = handle.stats
            seq, logits = out.sequences, torch.stack(out.logits, 1)
            P = x["input_ids"].shape[1]
            for t in range(P, seq.shape[1]):
                mask = torch.cat([x["attention_mask"], torch.ones(2, t - P, dtype=torch.long)], 1)
                seg = torch.where(seq[:, :t] == LLAVA_IMAGE_TOKEN, int(tp.Segment.VISUAL), int(tp.Segment.TEXT))
                seg[:, P:] = int(tp.Segment.GENERATED)
                with handle.segments(seg.masked_fill(mask == 0, int(tp.Segment.PAD))):
                    step = model(input_ids=seq[:, :t], attention_mask=mask, pixel_values=x["pixel_values"],
                                 use_cache=False).logits[:, -1]
                assert torch.allclose(step, logits[:, t - P], atol=1e-4, rtol=1e-4)
    assert not torch.equal(pruned, dense)
    dense_rows = stats.dense_tokens
    # 2 images x 16 visual tokens per row, a quarter kept (dominant + contextual), from layer 0 on
    assert [r - k for r, k in zip(dense_rows, stats.tokens_per_layer[0])] == [24, 24]
    assert all(row == stats.tokens_per_layer[0] for row in stats.tokens_per_layer)
    assert stats.kv_bytes == cache_bytes(out.past_key_values)
    assert stats.merged[0] and list(stats.kept) == [0]


def test_llava_7b_accounting_before_layer0():
    """The bench's exact LLaVA-1.5-7B accounting: from layer 0, every layer caches the kept tokens,
    so the KV bytes fall by the share of the prompt pruned (-81% at 90% visual pruning, 60 text tokens)."""
    from tokenprune.evals import bench
    from tokenprune.stats import kv_bytes_per_token

    acc = bench.llava7b_accounting(["random:layer=0"], (0.9,), text=60)
    dense, row = acc["rows"]
    N, L, kept = 636, 32, 60 + 58
    per_token = kv_bytes_per_token(bench.llava(bench.LLAVA_7B, device="meta").config.text_config, 2)
    assert row["config"]["layer"] == 0 and row["tokens_per_layer"] == row["cached_keys_per_layer"] == [kept] * L
    assert row["kv_bytes"] == row["kv_bytes_adapter"] == L * kept * per_token and dense["kv_bytes"] == L * N * per_token
    assert row["kv_ratio"] == round(kept / N, 4) <= 0.2


def test_half_precision_counts_the_bytes_the_cache_holds():
    model = tiny_decoder("llama-eager").to(torch.bfloat16)  # eager: the adapter's additive decode mask in bf16
    ids = prompt()
    with torch.no_grad(), tp.pruning(model, tp.RandomDrop(layer=0, keep_ratio=0.5)) as handle:
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        again = recompute_step_logits(model, handle, out.sequences, ids.shape[1])
    assert handle.stats.kv_bytes == cache_bytes(out.past_key_values) < handle.stats.dense_kv_bytes
    assert torch.allclose(torch.stack(out.logits, 1).float(), again.float(), atol=1e-2)
