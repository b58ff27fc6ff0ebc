"""Model placement: pruning a model that accelerate split between CPU and disk offload, and
fp16 / bf16 models on the CPU (stats count the bytes of the dtype the cache really holds).
"""
import pytest
import torch
from accelerate import dispatch_model, infer_auto_device_map

import tokenprune as tp

from .conftest import ENCODERS, cache_bytes, tiny_decoder, tiny_encoder
from .test_contract import ALL, ENCODER_NAMES, hook_count, make, make_visual, pixels


def padded_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 128, (2, 22), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    return ids, mask


def run(model, pruner, ids, mask, n=5):
    """Pruned greedy generate: (tokens, step logits, stats, bytes the returned cache really holds)."""
    with torch.no_grad(), tp.pruning(model, pruner) as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits, 1), handle.stats, cache_bytes(out.past_key_values)


# ---- accelerate: layers on the CPU and on disk ------------------------------------------
def placement(model):
    """Device of every parameter, and the values of those in memory (disk-offloaded ones are meta)."""
    return {k: (str(v.device), None if v.is_meta else v.clone()) for k, v in model.state_dict().items()}


def same_placement(a, b):
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and (a[k][1] is None or torch.equal(a[k][1], b[k][1]))
                                        for k in a)


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """(dispatched tiny Llama, the same weights undispatched): half the layers offloaded to disk."""
    model, plain = tiny_decoder("llama-sdpa"), tiny_decoder("llama-sdpa")
    device_map = infer_auto_device_map(model, max_memory={"cpu": 400_000, "disk": 10**9},
                                       no_split_module_classes=["LlamaDecoderLayer"])
    assert {"cpu", "disk"} <= set(device_map.values()), device_map
    dispatch_model(model, device_map, offload_dir=str(tmp_path_factory.mktemp("offload")))
    return model, plain


@pytest.mark.parametrize("name", ALL)
def test_disk_offloaded_model_prunes_like_the_plain_one(offloaded, name):
    model, plain = offloaded
    ids, mask = padded_batch()
    assert any(p.device.type == "meta" for p in model.parameters()), "some layers should live on disk"
    with torch.no_grad():
        dense = plain(ids, attention_mask=mask).logits
        assert torch.equal(model(ids, attention_mask=mask).logits, dense)
    hooks, before = hook_count(model), placement(model)
    seq, logits, stats, _ = run(model, make(name), ids, mask)
    ref_seq, ref_logits, ref_stats, _ = run(plain, make(name), ids, mask)
    assert torch.equal(seq, ref_seq), "offloading must not change the tokens"
    assert torch.allclose(logits, ref_logits, atol=1e-6, rtol=0)
    assert stats.tokens_per_layer == ref_stats.tokens_per_layer and stats.flops == ref_stats.flops < stats.dense_flops
    assert hook_count(model) == hooks and same_placement(placement(model), before), "layers stay where accelerate put them"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, dense), "remove() restores the offloaded model"


# ---- fp16 / bf16 on the CPU -------------------------------------------------------------
HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["llama-sdpa", "llama-eager", "qwen3", "gemma3"])
@pytest.mark.parametrize("name", ALL)
def test_half_precision_decoders(family, dtype, name):
    ids, mask = padded_batch()
    model, full = tiny_decoder(family).to(dtype), tiny_decoder(family)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        with tp.pruning(model, make(name, noop=True)):
            assert torch.equal(model(ids, attention_mask=mask).logits, dense), "keep-everything is dense exactly"
    seq, logits, stats, held = run(model, make(name), ids, mask)
    _, _, full_stats, full_held = run(full, make(name), ids, mask)
    assert torch.isfinite(logits).all() and seq.shape == (2, 27)
    assert stats.tokens_per_layer == full_stats.tokens_per_layer  # counts follow keep_ratio, not precision
    assert stats.kv_bytes == held, "KV bytes are the bytes the cache really holds"
    assert stats.kv_bytes * 2 == full_stats.kv_bytes == full_held
    assert stats.dense_kv_bytes * 2 == full_stats.dense_kv_bytes and stats.kv_bytes < stats.dense_kv_bytes


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ENCODERS)
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_half_precision_encoders(kind, dtype, name):
    model, forward = tiny_encoder(kind)
    model.to(dtype)
    x = pixels(2).to(dtype)
    with torch.no_grad():
        dense = forward(x)
        with tp.pruning(model, make_visual(name, noop=True)):
            assert torch.equal(forward(x), dense), "keep-everything is dense exactly"
        with tp.pruning(model, make_visual(name)) as handle:
            out = forward(x)
    counts = [row[0] for row in handle.stats.tokens_per_layer]
    assert out.dtype == dtype and out.shape == dense.shape and torch.isfinite(out).all()
    assert counts[1] < counts[0] and handle.stats.flops < handle.stats.dense_flops
