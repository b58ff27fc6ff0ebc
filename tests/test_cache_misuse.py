"""Pruned KV caches used wrongly get the library's error with the rule, before attention runs.

The rule (README "Reliability"): a cache filled under a pruner can only be continued by the
attachment that filled it. Dense caches stay usable everywhere.
"""
import pytest
import torch

import tokenprune as tp

from .conftest import tiny_decoder

RULE = "can only be continued by the attachment that filled it"


def prompt(length=20, seed=1):
    return torch.randint(2, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def prefill(model, ids):
    """One cached forward: (cache, next token, attention mask for the next step)."""
    out = model(ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    return out.past_key_values, nxt, torch.ones(1, ids.shape[1] + 1, dtype=torch.long)


def step(model, cache, nxt, mask):
    return model(nxt, past_key_values=cache, attention_mask=mask, use_cache=True).logits


@pytest.fixture(params=["llama-sdpa", "llama-eager", "qwen3", "gemma3"])
def model(request):
    return tiny_decoder(request.param)


def test_pruned_cache_after_remove_raises_the_rule(model):
    ids = prompt()
    with torch.no_grad():
        dense = model(ids).logits
        with tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)):
            cache, nxt, mask = prefill(model, ids)
        counts = {layer.get_seq_length() for layer in cache.layers}
        assert len(counts) == 2, "the pruner should have left layers with different key counts"
        with pytest.raises(tp.TokenPruneError, match=f"pruner that has been removed; .*{RULE}"):
            step(model, cache, nxt, mask)
        with pytest.raises(tp.TokenPruneError, match=RULE):
            model.generate(torch.cat([ids, nxt], 1), past_key_values=cache, max_new_tokens=2, do_sample=False)
        assert torch.equal(model(ids).logits, dense), "the model is untouched by the refused calls"


@pytest.mark.parametrize("other", [tp.RandomDrop(layer=1, keep_ratio=0.5), tp.FastV(layer=2, keep_ratio=0.5),
                                   tp.FastV(layer=2, keep_ratio=1.0)], ids=["random", "same-config", "keep-all"])
def test_pruned_cache_under_another_attachment_raises_the_rule(model, other):
    ids = prompt()
    with torch.no_grad():
        with tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)):
            cache, nxt, mask = prefill(model, ids)
        with tp.pruning(model, other):
            with pytest.raises(tp.TokenPruneError, match=f"filled under another pruner .*{RULE}"):
                step(model, cache, nxt, mask)
            fresh = model(ids).logits  # the attachment keeps working after the refusal
        with tp.pruning(model, other):
            assert torch.equal(model(ids).logits, fresh)


def test_cache_cropped_outside_tokenprune_raises(model):
    ids = prompt()
    with torch.no_grad(), tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)):
        cache, nxt, mask = prefill(model, ids)
        cache.crop(-5)  # drops the last 5 keys of every layer
        with pytest.raises(tp.TokenPruneError, match=f"cropped or extended outside tokenprune; .*{RULE}"):
            step(model, cache, nxt, mask[:, :16])


def test_dense_cache_continues_under_a_pruner_and_after_remove(model):
    """Caches with even layers are no misuse: a dense prefix runs dense, a keep-all cache stays valid."""
    ids = prompt()
    with torch.no_grad():
        cache, nxt, mask = prefill(model, ids)
        reference = step(model, prefill(model, ids)[0], nxt, mask)
        with tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)):
            assert torch.equal(step(model, cache, nxt, mask), reference)
        with tp.pruning(model, tp.FastV(layer=2, keep_ratio=1.0)):
            kept_all, _, _ = prefill(model, ids)
        assert torch.equal(step(model, kept_all, nxt, mask), reference)


def test_pruned_cache_continues_under_its_own_attachment(model):
    ids = prompt()
    with torch.no_grad(), tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)) as handle:
        cache, nxt, mask = prefill(model, ids)
        first = step(model, cache, nxt, mask)
        seg = torch.full((1, ids.shape[1] + 1), int(tp.Segment.TEXT))
        seg[:, -1] = int(tp.Segment.GENERATED)
        with handle.segments(seg):
            recomputed = model(torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1:]
    assert torch.allclose(first, recomputed, atol=1e-4, rtol=1e-4)


def test_pruned_cache_continued_with_other_rows_raises(model):
    ids = torch.cat([prompt(seed=1), prompt(seed=2)])
    with torch.no_grad(), tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)):
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with pytest.raises(tp.TokenPruneError, match="has 1 rows but its pruned KV cache holds 2"):
            step(model, out.past_key_values, nxt[:1], torch.ones(1, ids.shape[1] + 1, dtype=torch.long))
        assert step(model, out.past_key_values, nxt, torch.ones(2, ids.shape[1] + 1, dtype=torch.long)).shape[0] == 2


def test_lvlm_pruned_cache_follows_the_rule():
    """The LVLM adapter prunes through the decoder adapter, so its caches follow the same rule."""
    from .conftest import llava_inputs, tiny_llava

    model, x = tiny_llava(), llava_inputs()
    pruner = tp.FastV(layer=2, keep_ratio=0.4, segment="visual", protect_first=0, protect_last=0)
    mask = torch.cat([x["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        with tp.pruning(model, pruner):
            out = model(**x, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with tp.pruning(model, tp.RandomDrop(layer=1, segment="visual")):
            with pytest.raises(tp.TokenPruneError, match=f"filled under another pruner .*{RULE}"):
                model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values)
        with pytest.raises(tp.TokenPruneError, match=f"pruner that has been removed; .*{RULE}"):
            model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values)
