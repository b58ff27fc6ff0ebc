"""ToMe inside the block (between attention and MLP), its schedules and its FLOPs."""
import pytest
import torch
import transformers as T

import tokenprune as tp
from tokenprune.methods.tome import bipartite_merge

from .conftest import VIT


def vit_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = {k: v for k, v in VIT.items() if k != "num_labels"}
    return T.ViTModel(T.ViTConfig(**{**config, **overrides}, attn_implementation="eager"), add_pooling_layer=False).eval()


def pixels(batch=2, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def tome_reference(model, x, merge_at: int, r: int):
    """ToMe's block written out by hand on HF ViT layers: x + attn, merge with this block's keys, + MLP."""
    h = model.embeddings(x)
    B, n, _ = h.shape
    valid = torch.ones(B, n, dtype=torch.bool)
    candidates = valid.clone()
    candidates[:, 0] = False  # CLS
    bias, kept = None, torch.arange(n).expand(B, n)
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        y = layer.layernorm_before(h)
        h = h + attn(y, bias)[0]
        if i == merge_at:
            k = attn.k_proj(y).view(B, n, attn.num_attention_heads, -1).mean(2)
            merge = bipartite_merge(k, candidates, torch.full((B,), r), valid, None)
            slots = merge.keep.nonzero(as_tuple=True)[1].view(B, -1)
            h = _combine(merge, h)
            h = h.gather(1, slots[..., None].expand(-1, -1, h.shape[-1]))
            sizes = merge.keep.float().scatter_add(1, merge.dst.clamp_min(0), (merge.dst >= 0).float()).gather(1, slots)
            bias, kept = sizes.log()[:, None, None, :], slots
        h = h + layer.mlp(layer.layernorm_after(h))
    return model.layernorm(h), kept


def _combine(merge, h):
    from tokenprune.state import TokenState

    B, n, _ = h.shape
    st = TokenState(0, 1, h, torch.arange(n).expand(B, n), torch.ones(B, n, dtype=torch.bool), torch.zeros(B, n))
    return merge.combine(st)


def test_inside_block_merge_is_tomes_block():
    model, x = vit_model(), pixels()
    expected, kept = tome_reference(model, x, merge_at=1, r=6)
    with torch.no_grad(), tp.pruning(model, tp.ToMe(layer=1, r=6)) as handle:
        out = model(x).last_hidden_state
    assert [row[0] for row in handle.stats.tokens_per_layer] == [65, 59, 59, 59]  # block 1's MLP on 59 tokens
    got = out.gather(1, kept[..., None].expand(-1, -1, out.shape[-1]))
    assert torch.allclose(got, expected, atol=1e-5)


def test_inside_and_between_are_different_placements():
    model, x = vit_model(), pixels()
    with torch.no_grad():
        with tp.pruning(model, tp.ToMe(layer=1, r=6)):
            inside = model(x).last_hidden_state
        with tp.pruning(model, tp.ToMe(layer=1, r=6, inside_block=False)) as handle:
            between = model(x).last_hidden_state
    assert [row[0] for row in handle.stats.tokens_per_layer] == [65, 59, 59, 59]
    assert not torch.allclose(inside, between)


def test_constant_and_listed_r_schedules():
    model, x = vit_model(), pixels(1)
    with torch.no_grad():
        with tp.pruning(model, tp.ToMe(layer=[0, 1, 2, 3], r=5)) as h:
            model(x)
        assert [row[0] for row in h.stats.tokens_per_layer] == [60, 55, 50, 45]
        with tp.pruning(model, tp.ToMe(layer=[0, 2, 3], r=[9, 4, 0])) as h:
            model(x)
        assert [row[0] for row in h.stats.tokens_per_layer] == [56, 56, 52, 52]
        with tp.pruning(model, tp.ToMe(layer=[1, 2], keep_ratio=0.75)) as h:  # geometric: 64 -> 48 -> 36 patches
            model(x)
        assert [row[0] for row in h.stats.tokens_per_layer] == [65, 49, 37, 37]
        with tp.pruning(model, tp.ToMe(layer=[0], r=1000)) as h:  # at most |A| = half the patches
            model(x)
        assert [row[0] for row in h.stats.tokens_per_layer] == [33, 33, 33, 33]


@pytest.mark.parametrize("config,message", [
    (dict(r=-1), "r must be a non-negative integer"),
    (dict(layer=[1, 2], r=[3]), "r lists 1 values for the 2 layers"),
    (dict(layer=0, inside_block=False), "layer must be an integer >= 1"),
    (dict(inside_block="yes"), "inside_block must be true or false"),
])
def test_bad_tome_configs(config, message):
    with pytest.raises(tp.TokenPruneError, match=message):
        tp.build_pruner("tome", **config)


def test_similarity_is_only_a_times_b():
    """Keys where only A x B pairs are similar: merges follow them, and a B-only row merges nothing."""
    keys = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 1], [-1, 1]]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    merge = bipartite_merge(keys, valid, torch.tensor([2]), valid, None)
    # A = slots 0, 2, 4; B = 1, 3, 5: 0 -> 1 and 2 -> 3 are identical pairs
    assert merge.keep.tolist() == [[False, True, False, True, True, True]]
    assert merge.dst[0, [0, 2]].tolist() == [1, 3]
    only_b = torch.tensor([[False, True, False, True, False, True]])
    assert bipartite_merge(keys, only_b, torch.tensor([2]), valid, None).keep.all()


def test_deit_small_flops_at_constant_r8_are_the_analytic_block_flops():
    """DeiT-S (198 tokens, width 384, MLP 1536, 12 blocks), r=8 in every block: attention at the
    block's full count, MLP at the merged count."""
    torch.manual_seed(0)
    config = T.DeiTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                          image_size=224, patch_size=16)
    model = T.DeiTModel(config, add_pooling_layer=False).eval()
    D, M = 384, 1536

    def attention(n):
        return 2 * n * 4 * D * D + 4 * n * n * D  # q, k, v, o projections + q k^T and p v

    def mlp(n):
        return 2 * n * 2 * D * M

    with torch.no_grad(), tp.pruning(model, tp.ToMe(layer=list(range(12)), r=8)) as handle:
        model(pixels(1, 224))
    stats = handle.stats
    counts = [198 - 8 * i for i in range(13)]
    assert [row[0] for row in stats.tokens_per_layer] == counts[1:]
    assert stats.flops == sum(attention(counts[i]) + mlp(counts[i + 1]) for i in range(12))
    assert stats.dense_flops == 12 * (attention(198) + mlp(198))


def test_a_pruner_reads_the_block_a_merge_or_drop_before_it_already_reduced():
    """ToMe inside block 1, then Zero-TPrune before layer 2 reads block 1's attention on the merged set;
    two pruners before one layer: the second scores what the first kept."""
    model, x = vit_model(), pixels()
    visual = dict(segment="visual", protect_first=0, protect_last=0)
    for pruners, counts in [
        ([tp.ToMe(layer=1, r=6), tp.ZeroTPrune(layer=2, keep_ratio=0.5)], [65, 59, 30, 30]),
        ([tp.RandomDrop(layer=2, keep_ratio=0.5, **visual), tp.ZeroTPrune(layer=2, keep_ratio=0.5)], [65, 65, 17, 17]),
    ]:
        with torch.no_grad(), tp.pruning(model, pruners) as handle:
            out = model(x).last_hidden_state
        assert [row[0] for row in handle.stats.tokens_per_layer] == counts and torch.isfinite(out).all()
