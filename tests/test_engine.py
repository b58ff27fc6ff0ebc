"""The engine's parts on their own: reductions, token state, attention scores, stats."""
import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenprune as tp
from tokenprune.reductions import rectangular, top_k_mask
from tokenprune.stats import decoder_layer_flops

from .conftest import tiny_decoder, tiny_encoder


def state(valid, segments=None, hidden=None):
    valid = torch.tensor(valid, dtype=torch.bool)
    B, n = valid.shape
    seg = torch.where(valid, int(tp.Segment.TEXT), int(tp.Segment.PAD)) if segments is None else torch.tensor(segments)
    hidden = torch.randn(B, n, 3) if hidden is None else hidden
    return tp.TokenState(2, 4, hidden, torch.arange(n).expand(B, n), valid, seg)


def test_rectangular_fills_short_rows_with_padding_first():
    keep = torch.tensor([[1, 1, 1, 0, 1], [0, 0, 1, 0, 1]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    slots, slot_valid = rectangular(keep, valid)
    assert slots.tolist() == [[0, 1, 2, 4], [0, 2, 3, 4]]  # row 1: pad slot 0 first, then latest dropped
    assert slot_valid.tolist() == [[True] * 4, [False, True, False, True]]


def test_top_k_mask_counts_and_breaks_ties_by_position():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.9, 0.1]])
    cand = torch.tensor([[True, True, True, False, True]])
    assert top_k_mask(scores, cand, 0.5).tolist() == [[True, True, False, False, False]]  # round(2.0)
    assert top_k_mask(scores, cand, 0.0).sum() == 0 and top_k_mask(scores, cand, 1.0).sum() == 4


def test_candidates_protect_prompt_ends_and_skip_padding():
    st = state([[0, 0, 1, 1, 1, 1, 1, 1]])
    assert st.candidates("text", protect_first=1, protect_last=2).tolist() == [[0, 0, 0, 1, 1, 1, 0, 0]]
    assert st.last_content_slot().tolist() == [7]
    with pytest.raises(tp.TokenPruneError, match="no 'visual' tokens"):
        st.candidates("visual")


def test_merge_averages_into_destination_and_redirects():
    h = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    st = state([[1, 1, 1, 1]], hidden=h)
    keep = torch.tensor([[True, False, True, False]])
    m = tp.Merge(keep=keep, dst=torch.tensor([[-1, 0, -1, 2]]), weight=torch.tensor([[1.0, 3.0, 1.0, 1.0]]))
    merged = m.combine(st)
    assert merged[0, :, 0].tolist() == [2.5, 3.0, 6.0, 7.0]  # (1*1 + 3*3)/4, (5 + 7)/2
    assert m.redirect().tolist() == [[-1, 0, -1, 2]]


def test_noop_detection_ignores_padding():
    st = state([[0, 1, 1]])
    assert tp.Drop(keep=torch.tensor([[False, True, True]])).is_noop(st)
    assert not tp.Drop(keep=torch.tensor([[False, True, False]])).is_noop(st)


def test_pruner_round_trip_and_registry():
    for name in tp.list_pruners():
        configs = [{}]  # every method builds from its defaults
        if {"layer", "keep_ratio"} <= {f.name for f in dataclasses.fields(tp.pruner._REGISTRY[name])}:
            configs.append(dict(layer=3, keep_ratio=0.25))
        for config in configs:
            p = tp.build_pruner(name, **config)
            assert tp.build_pruner(**json.loads(json.dumps(p.to_dict()))) == p
            assert p.to_dict()["name"] == name
    assert tp.FastV(layer=2, keep_ratio=0.5) == tp.build_pruner("fastv", layer=2, keep_ratio=0.5)


def test_attention_scores_match_eager_attention_weights():
    """Scores recomputed from q/k projections equal what eager attention returns."""
    model = tiny_decoder("llama-eager")
    ids = torch.randint(2, 128, (2, 12))
    got = {}

    class Spy(tp.FastV):
        def select(self, st):
            got["scores"] = st.attention(torch.tensor([[11], [7]]))
            return None

    with torch.no_grad():
        ref = model(ids, output_attentions=True).attentions[1]  # layer 1 = the one before layer 2
        with tp.pruning(model, Spy(layer=2)):
            model(ids)
    assert torch.allclose(got["scores"][0, :, 0], ref[0, :, 11], atol=1e-6)
    assert torch.allclose(got["scores"][1, :, 0], ref[1, :, 7], atol=1e-6)
    assert model.config._attn_implementation == "eager"


def test_encoder_reads_attention_and_keys_of_the_running_block():
    """ViT: a pruner before layer 2 sees block 1's own attention and keys, captured, not recomputed."""
    model, _ = tiny_encoder("vit-eager")
    x = torch.randn(2, 3, 32, 32)
    got, k_calls = {}, []

    class Spy(tp.ZeroTPrune):
        def select(self, st):
            got["attention"], got["keys"] = st.attention(), st.keys()
            return super().select(st)

    attention = model.vit.layers[1].attention
    probe = attention.k_proj.register_forward_hook(lambda *a: k_calls.append(1))
    with torch.no_grad():
        ref = model(x, output_attentions=True).attentions[1]
        hidden = model(x, output_hidden_states=True).hidden_states[1]  # block 1's input
        keys = attention.k_proj(model.vit.layers[1].layernorm_before(hidden)).view(2, 65, 4, 16).transpose(1, 2)
        k_calls.clear()
        with tp.pruning(model, Spy(layer=2, keep_ratio=0.5)):
            model(x)
    probe.remove()
    assert torch.allclose(got["attention"], ref, atol=1e-6)
    assert torch.allclose(got["keys"], keys, atol=1e-6)
    assert len(k_calls) == 1, "block 1's key projection must run once (captured, not recomputed)"


def test_sdpa_model_stays_sdpa_while_pruning():
    model = tiny_decoder("llama-sdpa")
    with torch.no_grad(), tp.pruning(model, tp.FastV(layer=2)):
        model(torch.randint(2, 128, (1, 16)))
        assert model.config._attn_implementation == "sdpa"


def test_flop_formula_matches_flop_counter():
    # eager: flop_counter has no formula for the CPU SDPA kernel, but counts eager's matmuls
    model = tiny_decoder("llama-eager")
    layer = model.model.layers[1]
    x = torch.randn(1, 20, 64)
    rope = model.model.rotary_emb(x, torch.arange(20)[None])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x, attention_mask=None, position_embeddings=rope)
    assert counter.get_total_flops() == decoder_layer_flops(model.config, 20, 20)


def test_stats_count_tokens_flops_and_kv():
    model = tiny_decoder("llama-sdpa")
    ids = torch.randint(2, 128, (1, 25))
    with torch.no_grad(), tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)) as h:
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        s = h.stats
    assert s.dense_tokens == [25]
    assert [r[0] for r in s.tokens_per_layer] == [25, 25, 15, 15]  # 20 candidates, 10 dropped
    cfg = model.config
    dense = 4 * decoder_layer_flops(cfg, 25, 25) + sum(4 * decoder_layer_flops(cfg, 1, 26 + t) for t in range(2))
    pruned = 2 * decoder_layer_flops(cfg, 25, 25) + 2 * decoder_layer_flops(cfg, 15, 15) + sum(
        2 * decoder_layer_flops(cfg, 1, 26 + t) + 2 * decoder_layer_flops(cfg, 1, 16 + t) for t in range(2)
    )
    assert (s.dense_flops, s.flops) == (dense, pruned)
    per_token = 2 * 2 * 16 * 4  # k and v, 2 kv heads x 16 dims, float32
    assert s.dense_kv_bytes == 4 * 27 * per_token and s.kv_bytes == (2 * 27 + 2 * 17) * per_token


def test_summary_reports_kv_only_for_models_with_a_cache():
    assert "KV" not in tp.Stats(flops=1, dense_flops=2).summary()  # encoders, U-Nets
    assert "KV 1.00 MiB vs 2.00 MiB (50.0%)" in tp.Stats(kv_bytes=2**20, dense_kv_bytes=2**21).summary()


def test_concurrent_requests_on_one_model_do_not_share_state():
    """Call state is per thread (e.g. a Gradio server): parallel requests match serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_decoder("llama-sdpa")
    prompts = [torch.randint(2, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 17, 25, 33)]
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad(), tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)):
        serial = [model.generate(p, **gen) for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda p: model.generate(p, **gen), prompts * 2))
    for i, out in enumerate(parallel):
        assert torch.equal(out, serial[i % 4])


def test_weighted_pagerank_is_the_power_iteration_in_any_chunking():
    from tokenprune.methods.zero_tprune import weighted_pagerank

    attn = torch.rand(5, 3, 7, 7).softmax(-1)
    init = torch.rand(5, 7).softmax(-1)
    ref = init[:, None, :].expand(-1, 3, -1)
    for _ in range(4):
        ref = torch.einsum("bhij,bhi->bhj", attn, ref)
    assert torch.allclose(weighted_pagerank(attn, init, 4), ref, atol=1e-6)
    assert torch.allclose(weighted_pagerank(attn, init, 4, chunk=2 * 3 * 49), ref, atol=1e-6)  # 3 chunks
    chain = torch.tensor([[0.9, 0.1], [0.5, 0.5]])[None, None]  # stationary distribution (5/6, 1/6)
    s = weighted_pagerank(chain, torch.tensor([[0.5, 0.5]]), 60)
    assert torch.allclose(s[0, 0], torch.tensor([5 / 6, 1 / 6]), atol=1e-5)


@pytest.mark.parametrize("kind", ["vit-sdpa", "open_clip"])
def test_encoder_block_flops_match_flop_counter(kind):
    from tokenprune.adapters.encoder import block_flops, find_tower
    from tokenprune.evals.metrics import count_flops

    model, _ = tiny_encoder(kind)
    block = find_tower(model).blocks[1]
    x = torch.randn(3, 29, 64)
    with torch.no_grad():
        assert count_flops(lambda: block(x)) == 3 * block_flops(block, 29, 64)
