"""unet-static (static width pruning of a U-Net's transformer blocks) and the adapter's width
mechanism it shares with routed experts (APTP): real smaller layers while attached, the
original ones back on remove()."""
import copy
from dataclasses import dataclass

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.unet_static import l1_norms

from .conftest import tiny_decoder
from .test_unet import hook_count, inputs, params_of, run, tiny_sd_pipeline, tiny_unet

pytest.importorskip("diffusers")
from tokenprune.adapters.unet import transformer_blocks, width_units  # noqa: E402


def blocks_of(unet):
    return transformer_blocks(unet)


def gated(unet, heads: dict, channels: dict):
    """The full U-Net with the dropped heads' / channels' contributions zeroed (a part keeping
    nothing loses its output bias too): what a sliced expert must compute."""
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        for i, b in enumerate(blocks_of(ref)):
            if i in heads:
                for attn in (b.attn1, b.attn2):
                    d = attn.inner_dim // attn.heads
                    attn.to_out[0].weight[:, ~heads[i].repeat_interleave(d)] = 0
                    if not heads[i].any():
                        attn.to_out[0].bias.zero_()
            if i in channels:
                b.ff.net[2].weight[:, ~channels[i]] = 0
                if not channels[i].any():
                    b.ff.net[2].bias.zero_()
    return ref


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_static_slices_for_real_and_restores_exactly():
    unet = tiny_unet()
    x, t, ctx = inputs()
    before, hooks, size = params_of(unet), hook_count(unet), n_params(unet)
    dense = run(unet, x, t, ctx)
    with tp.pruning(unet, tp.build_pruner("unet-static", keep=1.0)) as handle:
        assert torch.equal(run(unet, x, t, ctx), dense) and n_params(unet) == size
    with tp.pruning(unet, tp.build_pruner("unet-static", keep=0.5)) as handle:
        from tokenprune.evals.metrics import flop_counter

        with flop_counter() as small:
            pruned = run(unet, x, t, ctx)
        stats = handle.stats
        alone = torch.cat([run(unet, x[i: i + 1], t, ctx[i: i + 1]) for i in range(len(x))])
        assert n_params(unet) < size  # smaller layers, not zero gates
        widths = [(b.attn1.heads, b.ff.net[2].in_features) for b in blocks_of(unet)]
    with flop_counter() as full:
        after = run(unet, x, t, ctx)
    assert pruned.shape == dense.shape and not torch.allclose(pruned, dense, atol=1e-3)
    assert torch.allclose(alone, pruned, atol=1e-5)
    full_widths = [(b.attn1.heads, b.ff.net[2].in_features) for b in blocks_of(unet)]
    assert widths == [(h // 2, c // 2) for h, c in full_widths]
    assert stats.flops_ratio == pytest.approx(0.5, abs=0.01)  # keep is the transformer blocks' MACs ratio
    assert small.get_total_flops() < full.get_total_flops()
    assert torch.equal(after, dense) and hook_count(unet) == hooks and n_params(unet) == size
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_static_keeps_the_largest_l1_units_and_equals_the_gated_model():
    unet = tiny_unet(seed=3)
    x, t, ctx = inputs(2)
    units_heads, units_channels = {}, {}
    for i, b in enumerate(blocks_of(unet)):
        norms = sum(attn.to_out[0].weight.abs().view(-1, attn.heads, attn.inner_dim // attn.heads).sum(dim=(0, 2))
                    + sum(lin.weight.abs().view(attn.heads, -1).sum(1) for lin in (attn.to_q, attn.to_k, attn.to_v))
                    for attn in (b.attn1, b.attn2))
        units_heads[i] = norms >= norms.sort(descending=True).values[round(0.5 * len(norms)) - 1]
        inner = b.ff.net[2].in_features
        cn = b.ff.net[0].proj.weight.abs().sum(1).view(-1, inner).sum(0) + b.ff.net[2].weight.abs().sum(0)
        units_channels[i] = cn >= cn.sort(descending=True).values[round(0.5 * inner) - 1]
    ref = run(gated(unet, units_heads, units_channels), x, t, ctx)
    with tp.pruning(unet, tp.build_pruner("unet-static", keep=0.5)):
        out = run(unet, x, t, ctx)
    assert torch.allclose(out, ref, atol=1e-5)


def test_static_blocks_and_parts_and_pipeline(tmp_path):
    unet = tiny_unet()
    x, t, ctx = inputs(2)
    with tp.pruning(unet, tp.build_pruner("unet-static", keep=0.25, blocks=[1], heads=False)) as h:
        run(unet, x, t, ctx)
        widths = [(b.attn1.heads, b.ff.net[2].in_features) for b in blocks_of(unet)]
    assert [w[0] for w in widths] == [b.attn1.heads for b in blocks_of(unet)]  # heads untouched
    assert [w[1] for w in widths] == [b.ff.net[2].in_features // (4 if i == 1 else 1) for i, b in enumerate(blocks_of(unet))]
    assert h.stats.flops < h.stats.dense_flops
    pipe = tiny_sd_pipeline(tmp_path)

    def sample():
        return pipe(["a red cat", "two dogs"], num_images_per_prompt=2, guidance_scale=5.0, num_inference_steps=2,
                    height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="pt").images

    dense = sample()
    with tp.pruning(pipe, tp.build_pruner("unet-static", keep=0.6)) as handle:
        pruned = sample()
        assert len(handle.stats.tokens_per_layer[0]) == 8 and handle.stats.flops < handle.stats.dense_flops
    assert pruned.shape == dense.shape and not torch.equal(pruned, dense)
    assert torch.equal(sample(), dense)


def test_bad_static_configs_raise_before_the_model_is_touched():
    for bad in (dict(keep=0.0), dict(keep=1.5), dict(keep="half"), dict(blocks=[-1]), dict(blocks=[]),
                dict(heads="yes"), dict(ratio=0.5)):
        with pytest.raises(tp.TokenPruneError):
            tp.build_pruner("unet-static", **bad)
    unet = tiny_unet()
    x, t, ctx = inputs(2)
    before, hooks, dense = params_of(unet), hook_count(unet), run(unet, x, t, ctx)
    with pytest.raises(tp.TokenPruneError, match="block 4 is beyond the model"):
        tp.prune(unet, tp.build_pruner("unet-static", blocks=[0, 4]))
    with pytest.raises(tp.TokenPruneError, match="one width-pruning method"):
        tp.prune(unet, [tp.build_pruner("unet-static"), tp.build_pruner("unet-static", keep=0.3)])
    assert hook_count(unet) == hooks and torch.equal(run(unet, x, t, ctx), dense)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


# ---- several experts, rows routed by code (the mechanism APTP uses) ---------------------------
@dataclass
class TwoExperts(tp.Pruner):
    """Test-only: expert 0 = half of every block (by L1), expert 1 drops block 1's attention and
    block 3's feed-forward entirely (depth) and a quarter of block 0's heads; rows go by the sign
    of their context's first entry."""

    name = "test-experts"
    codes: tuple[int, ...] | None = None  # fixed codes per row instead (route checks)

    def layers(self):
        return []

    def select(self, state):
        return None

    def experts(self, units):
        half = {"heads": {}, "channels": {}}
        for i, u in enumerate(units):
            for name in ("heads", "channels"):
                n = l1_norms(u[name])
                half[name][i] = n >= n.median()
        h0 = len(l1_norms(units[0]["heads"]))
        c3 = len(l1_norms(units[3]["channels"]))
        h1 = len(l1_norms(units[1]["heads"]))
        other = {"heads": {0: torch.arange(h0) % 4 != 1, 1: torch.zeros(h1, dtype=torch.bool)},
                 "channels": {3: torch.zeros(c3, dtype=torch.bool)}}
        return [half, other]

    def route(self, context, mask=None, sample=None):
        if self.codes is not None:
            return torch.tensor(self.codes)
        return (context[:, 0, 0] > 0).long()


def test_routed_experts_equal_each_expert_alone():
    unet = tiny_unet()
    x, t, ctx = inputs(4, seed=2)
    ctx[:, 0, 0] = torch.tensor([1.0, -1.0, -1.0, 1.0])  # rows 0, 3 -> expert 1; rows 1, 2 -> expert 0
    before, hooks, dense = params_of(unet), hook_count(unet), run(unet, x, t, ctx)
    pruner = TwoExperts()
    with tp.pruning(unet, pruner) as handle:
        out = run(unet, x, t, ctx)
        stats = handle.stats
        ones = run(unet, x[[0]], t, ctx[[0]])  # a single expert per call
    masks = pruner.experts(width_units(blocks_of(unet)))
    refs = [run(gated(unet, m["heads"], m["channels"]), x, t, ctx) for m in masks]
    code = torch.tensor([1, 0, 0, 1])
    expected = torch.where(code[:, None, None, None] == 1, refs[1], refs[0])
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(ones, refs[1][[0]], atol=1e-5)
    assert not torch.allclose(refs[0], refs[1], atol=1e-3)
    assert stats.flops < stats.dense_flops
    with tp.pruning(unet, TwoExperts(codes=(0, 0, 0, 0))) as h0:
        run(unet, x, t, ctx)
    with tp.pruning(unet, TwoExperts(codes=(1, 1, 1, 1))) as h1:
        run(unet, x, t, ctx)
    assert stats.flops == (h0.stats.flops + h1.stats.flops) // 2  # each row at its expert's cost
    with tp.pruning(unet, TwoExperts(codes=(0, 2, 0, 0))):
        with pytest.raises(tp.TokenPruneError, match="one expert index"):
            run(unet, x, t, ctx)
    assert torch.equal(run(unet, x, t, ctx), dense) and hook_count(unet) == hooks
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_width_pruners_compose_with_token_merging_and_other_families_refuse():
    unet = tiny_unet()
    x, t, ctx = inputs(2)
    with tp.pruning(unet, tp.build_pruner("unet-static", keep=0.5)):
        static = run(unet, x, t, ctx)
    with tp.pruning(unet, [tp.build_pruner("unet-static", keep=0.5), tp.ToMeSD(ratio=0.5)]) as h:
        both = run(unet, x, t, ctx)
    assert both.shape == static.shape and not torch.allclose(both, static, atol=1e-4)
    assert min(r[0] for r in h.stats.tokens_per_layer) < 256
    decoder = tiny_decoder("llama-sdpa")
    with pytest.raises(tp.TokenPruneError, match="cannot be sliced"):
        tp.prune(decoder, tp.build_pruner("unet-static"))
    assert hook_count(decoder) == 0
