"""The contract on diffusers U-Nets: tiny random UNet2DConditionModels built from config dicts,
and a real StableDiffusionPipeline of tiny random parts (classifier-free guidance, several
prompts, num_images_per_prompt > 1)."""
import json
import string

import pytest
import torch

import tokenprune as tp

from .conftest import tiny_decoder

diffusers = pytest.importorskip("diffusers")

UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
# transformer blocks in module order: 0 down 16x16 (256 tokens), 1 mid 8x8 (64), 2-3 up 16x16
VISUAL = dict(segment="visual", protect_first=0, protect_last=0)
# (reducing config, keep-everything config) per method on a U-Net; every reduction stays inside its block
UNET_CASES = {
    "tome-sd": (dict(ratio=0.5), dict(ratio=0.0)),
    "fastv": (dict(layer=[1, 3], keep_ratio=0.5, **VISUAL), dict(layer=[1, 3], keep_ratio=1.0, **VISUAL)),
    "random": (dict(layer=[1, 2], keep_ratio=0.5, seed=2, **VISUAL), dict(layer=[1, 2], keep_ratio=1.0, **VISUAL)),
    "tome": (dict(layer=[1, 3], keep_ratio=0.6), dict(layer=[1, 3], keep_ratio=1.0)),
    "zero-tprune": (dict(layer=[2], keep_ratio=0.6), dict(layer=[2], keep_ratio=1.0)),
    "vflowopt": (dict(layer=[1, 3], keep_ratio=0.5), dict(layer=[1, 3], keep_ratio=1.0)),  # recycles on the grid
}


def tiny_unet(seed=0, **over):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**UNET, **over}).eval()


@pytest.fixture
def unet():
    return tiny_unet()


def inputs(batch=3, seed=0, t=500):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(t), torch.randn(batch, 7, 32, generator=g)


def run(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def params_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def make(name, noop=False):
    active, keep_all = UNET_CASES[name]
    return tp.build_pruner(name, **(keep_all if noop else active))


@pytest.mark.parametrize("name", sorted(UNET_CASES))
def test_unet_contract(unet, name):
    x, t, ctx = inputs()
    before, hooks = params_of(unet), hook_count(unet)
    dense = run(unet, x, t, ctx)
    with tp.pruning(unet, make(name, noop=True)):
        assert torch.equal(run(unet, x, t, ctx), dense), "keep-everything must be the dense model exactly"
    with tp.pruning(unet, make(name)) as handle:
        pruned = run(unet, x, t, ctx)
        stats = handle.stats
        alone = torch.cat([run(unet, x[i: i + 1], t, ctx[i: i + 1]) for i in range(len(x))])
    with tp.pruning(unet, make(name, noop=True)):  # another config in between: nothing leaks
        run(unet, *inputs(2, seed=4, t=20))
    with tp.pruning(unet, make(name)):
        again = run(unet, x, t, ctx)
    after = run(unet, x, t, ctx)
    assert pruned.shape == dense.shape and not torch.equal(pruned, dense)
    assert torch.allclose(alone, pruned, atol=1e-5), "a batch must equal each row alone"
    assert torch.equal(again, pruned)
    assert stats.flops < stats.dense_flops and min(r[0] for r in stats.tokens_per_layer) < 256
    assert torch.equal(after, dense) and hook_count(unet) == hooks
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("name", tp.list_pruners())
def test_every_method_works_or_refuses_on_unet(unet, name):
    """Default configs: a method either runs (dense output shape) or raises the library's error."""
    x, t, ctx = inputs(2)
    dense = run(unet, x, t, ctx)
    try:
        with tp.pruning(unet, tp.build_pruner(name)):
            out = run(unet, x, t, ctx)
        assert out.shape == dense.shape and torch.isfinite(out).all()
    except tp.TokenPruneError as e:
        assert str(e)
    assert torch.equal(run(unet, x, t, ctx), dense) and hook_count(unet) == hook_count(tiny_unet())


@pytest.mark.parametrize("parts", [dict(), dict(merge_crossattn=True, merge_mlp=True)], ids=["attn", "all-parts"])
def test_tome_sd_equals_the_tomesd_package(parts):
    """Same partition (use_rand=False): tokenprune's tome-sd gives tomesd 0.1.3's output."""
    tomesd = pytest.importorskip("tomesd")
    x, t, ctx = inputs(2)
    ours, theirs = tiny_unet(), tiny_unet()
    with tp.pruning(ours, tp.ToMeSD(ratio=0.5, use_rand=False, **parts)):
        a = run(ours, x, t, ctx)
    tomesd.apply_patch(theirs, ratio=0.5, use_rand=False, **parts)
    b = run(theirs, x, t, ctx)
    tomesd.remove_patch(theirs)
    assert not torch.allclose(a, run(ours, x, t, ctx), atol=1e-3)
    assert torch.allclose(a, b, atol=1e-5)


def test_tome_sd_schedule_blocks_and_timesteps(unet):
    x, t, ctx = inputs(2)
    dense, dense_300 = run(unet, x, t, ctx), run(unet, x, torch.tensor(300), ctx)
    with tp.pruning(unet, tp.ToMeSD(ratio=0.5, timesteps=(0, 400))):
        assert torch.equal(run(unet, x, t, ctx), dense)  # t = 500 is outside the schedule
        assert not torch.equal(run(unet, x, torch.tensor(300), ctx), dense_300)
    with tp.pruning(unet, tp.ToMeSD(ratio=0.5, blocks=[2])) as h:
        run(unet, x, t, ctx)
    assert [r[0] for r in h.stats.tokens_per_layer] == [256, 64, 128, 256]
    with tp.pruning(unet, tp.ToMeSD(ratio=0.5, max_downsample=2)) as h:
        run(unet, x, t, ctx)
    assert [r[0] for r in h.stats.tokens_per_layer] == [128, 32, 128, 128]


def test_bad_configs_raise_before_the_model_is_touched(unet):
    for bad in (dict(ratio=1.5), dict(ratio=-0.1), dict(sx=0), dict(blocks=[-1]), dict(timesteps=(5, 1))):
        with pytest.raises(tp.TokenPruneError):
            tp.build_pruner("tome-sd", **bad)
    x, t, ctx = inputs(2)
    before, hooks, dense = params_of(unet), hook_count(unet), run(unet, x, t, ctx)
    with pytest.raises(tp.TokenPruneError, match="layer 4 is beyond the model, which has 4 layers"):
        tp.prune(unet, tp.ToMeSD(blocks=[0, 4]))
    with pytest.raises(tp.TokenPruneError, match="takes no options"):
        tp.prune(unet, tp.ToMeSD(), renumber_positions=True)
    with pytest.raises(tp.TokenPruneError, match="target='language'"):
        tp.prune(unet, tp.FastV(layer=2, target="language"))
    assert hook_count(unet) == hooks and torch.equal(run(unet, x, t, ctx), dense)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_tome_sd_refuses_models_without_a_token_grid():
    model = tiny_decoder("llama-sdpa")
    ids = torch.randint(2, 128, (1, 12))
    with torch.no_grad():
        dense = model(ids).logits
        with tp.pruning(model, tp.ToMeSD(blocks=[1])):
            with pytest.raises(tp.TokenPruneError, match="2-D token grid"):
                model(ids)
        assert torch.equal(model(ids).logits, dense)


# ---- a real diffusers pipeline --------------------------------------------------------
def tiny_sd_pipeline(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + " ":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=8, sample_size=16).eval()
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=tiny_unet(),
                                             scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stable_diffusion_pipeline_call(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)

    def sample(prompts, seeds):
        return pipe(prompts, num_images_per_prompt=2, guidance_scale=5.0, num_inference_steps=3, height=16, width=16,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images

    prompts, seeds = ["a red cat", "two dogs"], [0, 1, 2, 3]
    dense = sample(prompts, seeds)
    with tp.pruning(pipe, tp.ToMeSD(ratio=0.0)):
        assert torch.equal(sample(prompts, seeds), dense)
    with tp.pruning(pipe, tp.ToMeSD(ratio=0.5, max_downsample=2)) as handle:
        with pytest.raises(tp.AlreadyAttachedError):  # a pipeline and its U-Net are one model
            tp.prune(pipe.unet, tp.ToMeSD())
        pruned = sample(prompts, seeds)
        second = sample(prompts[1:], seeds[2:])  # the second prompt alone, same noise
        assert handle.stats.flops < handle.stats.dense_flops
        assert len(handle.stats.tokens_per_layer[0]) == 4  # 1 prompt x 2 images x (cond + uncond)
    assert pruned.shape == dense.shape == (4, 3, 16, 16) and not torch.equal(pruned, dense)
    assert torch.allclose(pruned[2:], second, atol=1e-4)
    assert torch.equal(sample(prompts, seeds), dense)


# ---- structural pruning: sliced experts ----------------------------------------------------
def test_sliced_expert_equals_the_gated_unet(unet):
    from tokenprune.adapters.unet import slice_unet, transformer_blocks
    from tokenprune.evals.metrics import flop_counter

    blocks = transformer_blocks(unet)
    g = torch.Generator().manual_seed(1)
    heads, channels = {}, {}
    for i, b in enumerate(blocks):
        heads[i] = torch.rand(b.attn1.heads, generator=g) < 0.6
        heads[i][0] = True
        if i != 1:
            channels[i] = torch.rand(b.ff.net[2].in_features, generator=g) < 0.5
    x, t, ctx = inputs(2)
    before = params_of(unet)
    expert = slice_unet(unet, heads, channels)
    gated = __import__("copy").deepcopy(unet)  # the same widths as zero gates on the full model
    for i, b in enumerate(transformer_blocks(gated)):
        with torch.no_grad():
            for attn in (b.attn1, b.attn2):
                d = attn.inner_dim // attn.heads
                attn.to_out[0].weight[:, ~heads[i].repeat_interleave(d)] = 0
            if i in channels:
                b.ff.net[2].weight[:, ~channels[i]] = 0
    with flop_counter() as small:
        out = run(expert, x, t, ctx)
    with flop_counter() as full:
        ref = run(gated, x, t, ctx)
    assert torch.allclose(out, ref, atol=1e-5) and not torch.allclose(ref, run(unet, x, t, ctx), atol=1e-3)
    assert small.get_total_flops() < full.get_total_flops()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    with pytest.raises(tp.TokenPruneError, match="block 9 is beyond"):
        slice_unet(unet, channels={9: torch.ones(128, dtype=torch.bool)})
    with pytest.raises(tp.TokenPruneError, match="keeping at least one"):
        slice_unet(unet, heads={0: torch.zeros(blocks[0].attn1.heads, dtype=torch.bool)})


# ---- token methods on top of width pruning (sliced / routed experts) ---------------------------
@pytest.mark.parametrize("name", sorted(UNET_CASES))
def test_token_methods_compose_with_routed_experts(name):
    """Every U-Net token method (fastv / tome / zero-tprune / vflowopt read the block's attention
    or keys) runs on top of several routed experts: each row is its expert's output with the
    tokens chosen from the dense block's own self-attention, i.e. the full U-Net with the dropped
    heads / channels gated to zero (same q / k projections) under the same token method."""
    from .test_unet_static import TwoExperts, gated

    unet = tiny_unet()
    x, t, ctx = inputs(4, seed=3)  # (seed 2 has a near-tie of tome-sd similarities: a top-k flips batch vs alone)
    ctx[:, 0, 0] = torch.tensor([1.0, -1.0, -1.0, 1.0])  # rows 0, 3 -> expert 1 (drops block 1's attention)
    before, hooks, dense = params_of(unet), hook_count(unet), run(unet, x, t, ctx)
    experts = TwoExperts()
    with tp.pruning(unet, experts):
        widths_only = run(unet, x, t, ctx)
    with tp.pruning(unet, [experts, make(name, noop=True)]):
        assert torch.equal(run(unet, x, t, ctx), widths_only), "a keep-everything token method changes nothing"
    with tp.pruning(unet, [make(name), experts]) as h:
        both = run(unet, x, t, ctx)
        stats = h.stats
        alone = torch.cat([run(unet, x[i: i + 1], t, ctx[i: i + 1]) for i in range(len(x))])
    from tokenprune.adapters.unet import transformer_blocks, width_units

    masks = experts.experts(width_units(transformer_blocks(unet)))
    refs = []
    for m in masks:
        ref_unet = gated(unet, m["heads"], m["channels"])
        with tp.pruning(ref_unet, make(name)):
            refs.append(run(ref_unet, x, t, ctx))
    expected = torch.where(torch.tensor([1, 0, 0, 1])[:, None, None, None] == 1, refs[1], refs[0])
    assert both.shape == dense.shape and not torch.allclose(both, widths_only, atol=1e-4)
    assert torch.allclose(both, expected, atol=1e-5), "each row: its expert under the token method"
    assert torch.allclose(both, alone, atol=1e-5), "a batch must equal each row alone"
    assert stats.codes == [1, 0, 0, 1] and min(r[0] for r in stats.tokens_per_layer) < 256
    assert torch.equal(run(unet, x, t, ctx), dense) and hook_count(unet) == hooks
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_token_method_on_one_sliced_expert_reads_the_dense_attention():
    """unet-static (one expert, sliced in place) + fastv: the same tokens as on the gated full U-Net."""
    from tokenprune.adapters.unet import transformer_blocks, width_units

    from .test_unet_static import gated

    unet = tiny_unet()
    x, t, ctx = inputs(2)
    static = tp.build_pruner("unet-static", keep=0.5)
    with tp.pruning(unet, [static, make("fastv")]):
        both = run(unet, x, t, ctx)
    m = static.experts(width_units(transformer_blocks(unet)))[0]
    ref_unet = gated(unet, m["heads"], m["channels"])
    with tp.pruning(ref_unet, make("fastv")):
        ref = run(ref_unet, x, t, ctx)
    assert torch.allclose(both, ref, atol=1e-5)


def test_a_second_attach_is_refused_and_a_list_is_the_way():
    """One attachment per model: a token method next to a width pruner goes in the same list;
    a second tp.prune raises the library's error and leaves the first attachment as it was."""
    from .test_unet_static import TwoExperts

    unet = tiny_unet()
    x, t, ctx = inputs(2)
    dense = run(unet, x, t, ctx)
    with tp.pruning(unet, TwoExperts()):
        widths_only = run(unet, x, t, ctx)
        with pytest.raises(tp.AlreadyAttachedError, match="pass a list"):
            tp.prune(unet, tp.ToMeSD(ratio=0.5))
        assert torch.equal(run(unet, x, t, ctx), widths_only)
    with tp.pruning(unet, [tp.ToMeSD(ratio=0.5), TwoExperts()]) as h:
        with pytest.raises(tp.AlreadyAttachedError):
            tp.prune(unet, make("fastv"))
        run(unet, x, t, ctx)
    assert min(r[0] for r in h.stats.tokens_per_layer) < 256 and h.stats.flops < h.stats.dense_flops
    assert torch.equal(run(unet, x, t, ctx), dense)


def test_remove_frees_the_sliced_copies_at_once():
    """A kept handle (to read its stats) does not keep the experts' sliced copies alive."""
    import gc
    import weakref

    from .test_unet_static import TwoExperts

    unet = tiny_unet()
    x, t, ctx = inputs(2)
    originals = {id(m) for m in unet.modules()}
    gc.disable()  # freed by reference counting, not by a collection
    try:
        handle = tp.prune(unet, TwoExperts())
        run(unet, x, t, ctx)
        copies = [weakref.ref(c) for b in unet.modules() for c in getattr(b, "copies", []) if id(c) not in originals]
        handle.remove()
        assert copies and all(r() is None for r in copies) and handle.stats.flops < handle.stats.dense_flops
    finally:
        gc.enable()
