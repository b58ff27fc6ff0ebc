"""A short soak (the full one: ``python -m tokenprune.evals.soak``) and the leak checks it rests on."""
import gc
import weakref

import pytest
import torch

import tokenprune as tp
from tokenprune.evals.soak import Soak, hook_count, per_request_objects, verdict

from .conftest import tiny_decoder, tiny_encoder


def test_short_soak_leaks_nothing():
    result = Soak(seed=1).run(total=240, samples=6, progress=False)
    assert result["leaks"] == []
    assert result["decoder_pool"] >= 4 * 3 and result["encoder_pool"] >= 4 * 3  # fastv, random, tome, zero-tprune
    assert result["needed_gc"] == 0, "request outputs and caches die without a cycle collection"
    ok, text = verdict(result, rss_bound_mb=48)  # loose: a short run samples allocator noise, not a trend
    assert ok, text


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("name", ["fastv", "tome", "zero-tprune"])
def test_request_state_dies_without_the_garbage_collector(no_gc, name):
    """Per-request engine objects are freed by reference counting alone: no cycle keeps a
    prefill's hidden states alive until the next GC pass."""
    decoder, (encoder, forward) = tiny_decoder("llama-sdpa"), tiny_encoder("vit-sdpa")
    ids = torch.randint(2, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with tp.pruning(decoder, tp.build_pruner(name, layer=2, segment="text")):
            out = decoder.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            refs = [weakref.ref(out.past_key_values), weakref.ref(out.sequences)]
            del out
            assert all(r() is None for r in refs) and per_request_objects() == {}
        with tp.pruning(encoder, tp.build_pruner(name, layer=[1, 2], segment="visual", protect_first=0,
                                                 protect_last=0)):
            forward(torch.randn(2, 3, 32, 32))
            assert per_request_objects() == {}


def test_remove_leaves_no_hooks_after_many_attachments():
    decoder = tiny_decoder("qwen3")
    hooks = hook_count(decoder)
    ids = torch.randint(2, 128, (1, 16))
    with torch.no_grad():
        dense = decoder(ids).logits
        for i in range(50):
            handle = tp.prune(decoder, [tp.FastV(layer=1 + i % 3, keep_ratio=0.5), tp.RandomDrop(layer=3, seed=i)])
            decoder(ids)
            handle.remove()
    assert hook_count(decoder) == hooks
    with torch.no_grad():
        assert torch.equal(decoder(ids).logits, dense)
