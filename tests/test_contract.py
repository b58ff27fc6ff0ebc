"""The contract every pruner keeps on every adapter (DESIGN.md "Quality bars").

Parametrised over every registered pruner (plus test-only Skip and Merge pruners that
exercise the engine's other two reductions) x every supported decoder family.
"""
from dataclasses import dataclass

import pytest
import torch

import tokenprune as tp
from tokenprune.pruner import SegmentDropPruner

from .conftest import tiny_decoder


@dataclass
class SkipRandom(SegmentDropPruner):
    """Test-only: random candidates skip one block (exercises ``Skip``)."""

    name = "test-skip"
    seed: int = 0

    def select(self, state):
        keep = tp.RandomDrop(**{k: v for k, v in self.to_dict().items() if k != "name"}).select(state).keep
        return tp.Skip(keep=keep)


@dataclass
class MergeRandom(SegmentDropPruner):
    """Test-only: random candidates merge into the previous kept token (exercises ``Merge``)."""

    name = "test-merge"
    seed: int = 0

    def select(self, state):
        keep = tp.RandomDrop(**{k: v for k, v in self.to_dict().items() if k != "name"}).select(state).keep
        pos = torch.arange(keep.shape[1]).expand_as(keep)
        dst = torch.where(keep & state.valid, pos, -1).cummax(dim=1).values
        return tp.Merge(keep=keep, dst=dst, weight=state.hidden.norm(dim=-1))


# (reducing config, keep-everything config) for each method; a new method must add itself here
CASES = {
    "fastv": (dict(layer=2, keep_ratio=0.4), dict(layer=2, keep_ratio=1.0)),
    "random": (dict(layer=1, keep_ratio=0.5, seed=3), dict(layer=1, keep_ratio=1.0)),
    "tome": (dict(layer=[1, 3], keep_ratio=0.7, segment="text"), dict(layer=[1, 3], keep_ratio=1.0, segment="text")),
    "zero-tprune": (dict(layer=2, keep_ratio=0.5, segment="text", protect_first=1),
                    dict(layer=2, keep_ratio=1.0, segment="text")),
    # text has no image patches: attention importance + progressive drop only (entropy and
    # recycling run in tests/test_lvlm.py; encoders run the defaults, skipped without pixels / grid)
    "vflowopt": (dict(layer=[1, 3], keep_ratio=0.6, segment="text", protect_first=1, alpha=0.0, recycle_grid=0),
                 dict(layer=[1, 3], keep_ratio=1.0, segment="text")),
    # no router fits these tiny models: the static attention-rank rule (a random router for them,
    # routing generated tokens too, runs in tests/test_ftp.py)
    "ftp": (dict(sparsity=0.4, checkpoint=None), dict(sparsity=0.0, checkpoint=None)),
    # skip baselines (tests/test_skip.py): generated tokens skip too (skip-random, shortgpt)
    "shortgpt": (dict(sparsity=0.25, scores=[1.0, 0.2, 0.5, 0.3]), dict(sparsity=0.0, scores=[1.0, 0.2, 0.5, 0.3])),
    "skip-rank": (dict(sparsity=0.4), dict(sparsity=0.0)),
    "skip-random": (dict(sparsity=0.4, seed=1), dict(sparsity=0.0)),
}
# decoder-only methods configured by sparsity (not layer / keep_ratio): no encoder case below
DECODER_ONLY = {"ftp", "shortgpt", "skip-rank", "skip-random"}
# Methods that need what only another family provides (an LVLM's vision tower or image grid, a
# U-Net's feature map): here they must raise the library's error; their contract runs in that
# family's tests (tests/test_lvlm.py, tests/test_unet.py). name -> (config, error message pattern)
ELSEWHERE = {
    "visionzip": (dict(layer=1, keep_ratio=0.5, segment="text"), "does not provide per-token 'vision_cls_attention'"),
    "tome-sd": (dict(ratio=0.5, blocks=[1]), "2-D token grid"),
    "unet-static": (dict(keep=0.5), "slices the transformer blocks of a diffusers U-Net"),  # tests/test_unet_static.py
    "aptp": (dict(), "slices the transformer blocks of a diffusers U-Net"),  # tests/test_aptp.py
    "atp": (dict(layer=1, checkpoint=None), "no 'visual' tokens"),  # scores visual tokens by text -> image attention
}
ENGINE_CASES = {
    "test-skip": (SkipRandom, dict(layer=2, keep_ratio=0.3), dict(layer=2, keep_ratio=1.0)),
    "test-merge": (MergeRandom, dict(layer=2, keep_ratio=0.5), dict(layer=2, keep_ratio=1.0)),
}
ALL = sorted(CASES) + sorted(ENGINE_CASES)


def make(name, noop=False):
    if name in ENGINE_CASES:
        cls, active, keep_all = ENGINE_CASES[name]
        return cls(**(keep_all if noop else active))
    active, keep_all = CASES[name]
    return tp.build_pruner(name, **(keep_all if noop else active))


def prompt(length=24, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 128, (batch, length), generator=g)


def params_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def greedy(model, ids, n=6, **kw):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


def test_every_registered_method_has_a_contract_case():
    assert set(tp.list_pruners()) == set(CASES) | set(ELSEWHERE)
    assert not set(CASES) & set(ELSEWHERE)


@pytest.mark.parametrize("name", sorted(ELSEWHERE))
def test_methods_of_other_families_refuse_with_the_library_error(decoder, name):
    config, message = ELSEWHERE[name]
    ids = prompt()
    with torch.no_grad():
        dense = decoder(ids).logits
        before, hooks = params_of(decoder), hook_count(decoder)
        with pytest.raises(tp.TokenPruneError, match=message):
            with tp.pruning(decoder, tp.build_pruner(name, **config)):
                decoder(ids)
    assert_untouched(decoder, before, hooks, ids, dense)


@pytest.mark.parametrize("name", ALL)
def test_keep_everything_is_dense_exactly(decoder, name):
    ids = prompt()
    with torch.no_grad():
        dense = decoder(ids).logits
        dense_seq, _ = greedy(decoder, ids)
        with tp.pruning(decoder, make(name, noop=True)):
            assert torch.equal(decoder(ids).logits, dense)
            assert torch.equal(greedy(decoder, ids)[0], dense_seq)


@pytest.mark.parametrize("name", ALL)
def test_remove_restores_bit_identical(decoder, name):
    ids = prompt()
    before, hooks = params_of(decoder), hook_count(decoder)
    with torch.no_grad():
        dense = decoder(ids).logits
        handle = tp.prune(decoder, make(name))
        pruned = decoder(ids).logits
        handle.remove()
        after = decoder(ids).logits
    assert not torch.equal(pruned, dense), "the reducing config should change the output"
    assert torch.equal(after, dense)
    assert hook_count(decoder) == hooks
    assert all(torch.equal(v, before[k]) for k, v in decoder.state_dict().items())


def recompute_step_logits(model, handle, seq, prompt_len):
    """Logits for every generated token, recomputed without a cache from the full sequence."""
    steps = []
    for t in range(prompt_len, seq.shape[1]):
        ids = seq[:, :t]
        seg = torch.full(ids.shape, int(tp.Segment.TEXT))
        seg[:, prompt_len:] = int(tp.Segment.GENERATED)
        with handle.segments(seg):
            steps.append(model(ids, use_cache=False).logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("renumber", [False, True], ids=["orig-pos", "renumber"])
@pytest.mark.parametrize("name", ALL)
def test_generate_with_cache_matches_recompute(decoder, name, renumber):
    ids = prompt()
    with torch.no_grad(), tp.pruning(decoder, make(name), renumber_positions=renumber) as handle:
        seq, logits = greedy(decoder, ids, n=6)
        stats = handle.stats
        again = recompute_step_logits(decoder, handle, seq, ids.shape[1])
    assert torch.allclose(logits, again, atol=1e-4, rtol=1e-4)
    assert stats.forward_calls == 6 and stats.flops < stats.dense_flops


@pytest.mark.parametrize("name", ALL)
def test_padded_batch_equals_each_row_alone(decoder, name):
    a, b = prompt(24, seed=2)[0], prompt(15, seed=3)[0]
    batch = torch.zeros(2, 24, dtype=torch.long)
    batch[0], batch[1, 9:] = a, b
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :9] = 0
    with torch.no_grad(), tp.pruning(decoder, make(name)) as handle:
        both = decoder(batch, attention_mask=mask).logits
        kept = handle.stats.tokens_per_layer
        alone_a, alone_b = decoder(a[None]).logits, decoder(b[None]).logits
        kept_b = handle.stats.tokens_per_layer
        seq, _ = greedy(decoder, batch, attention_mask=mask)
        seq_a, _ = greedy(decoder, a[None])
        seq_b, _ = greedy(decoder, b[None])
    assert torch.allclose(both[0], alone_a[0], atol=1e-5)
    assert torch.allclose(both[1, 9:], alone_b[0], atol=1e-5)
    assert [row[1] for row in kept] == [row[0] for row in kept_b], "padding must not count as content"
    assert torch.equal(seq[0, 24:], seq_a[0, 24:]) and torch.equal(seq[1, 24:], seq_b[0, 15:])


@pytest.mark.parametrize("name", ALL)
def test_no_state_leaks_between_configs(decoder, name):
    ids = prompt()
    a, b = make(name), make(name, noop=True)
    with torch.no_grad():
        with tp.pruning(decoder, a):
            first = decoder(ids).logits
            first_seq, _ = greedy(decoder, ids)
        with tp.pruning(decoder, b):
            decoder(prompt(30, seed=9))
            greedy(decoder, prompt(11, seed=8))
        with tp.pruning(decoder, a):
            assert torch.equal(greedy(decoder, ids)[0], first_seq)
            assert torch.equal(decoder(ids).logits, first)


def test_double_attach_raises_and_list_composes(decoder):
    with tp.pruning(decoder, tp.FastV(layer=2)):
        with pytest.raises(tp.AlreadyAttachedError):
            tp.prune(decoder, tp.RandomDrop(layer=1))
    with tp.pruning(decoder, [tp.RandomDrop(layer=1, keep_ratio=0.8), tp.FastV(layer=3, keep_ratio=0.5)]) as h:
        with torch.no_grad():
            decoder(prompt(30))
        counts = [row[0] for row in h.stats.tokens_per_layer]
    assert counts[0] > counts[1] == counts[2] > counts[3]


# ---- bad input: a clear error of the library's own type, model untouched ---------------
BAD_BUILDS = [
    (dict(name="no-such-method"), "unknown pruning method"),
    (dict(name="fastv", keep_ratio=1.5), "keep_ratio must be a number in \\[0, 1\\]"),
    (dict(name="random", keep_ratio=-0.1), "keep_ratio must be a number in \\[0, 1\\]"),
    (dict(name="fastv", layer=0), "layer must be an integer >= 1"),
    (dict(name="fastv", segment="audio"), "unknown segment"),
    (dict(name="fastv", colour="red"), "unknown option"),
]


@pytest.mark.parametrize("config,message", BAD_BUILDS)
def test_bad_configs_raise_clear_errors(config, message):
    with pytest.raises(tp.TokenPruneError, match=message):
        tp.build_pruner(**config)


def assert_untouched(model, before, hooks, ids, dense):
    assert hook_count(model) == hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_layer_beyond_the_model_is_refused(decoder):
    ids = prompt()
    before, hooks = params_of(decoder), hook_count(decoder)
    with torch.no_grad():
        dense = decoder(ids).logits
    with pytest.raises(tp.TokenPruneError, match="layer 4 is beyond the model, which has 4 layers"):
        tp.prune(decoder, [tp.RandomDrop(layer=1), tp.FastV(layer=4)])
    assert_untouched(decoder, before, hooks, ids, dense)
    tp.prune(decoder, tp.FastV(layer=3)).remove()  # nothing was left attached


def test_unsupported_models_are_refused():
    bert = __import__("transformers").BertModel(
        __import__("transformers").BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    for model in (torch.nn.Linear(4, 4), bert):
        with pytest.raises(tp.UnsupportedModelError, match="Supported families:.*decoder LLMs"):
            tp.prune(model, tp.FastV())
    with pytest.raises(tp.TokenPruneError, match="expected a Pruner"):
        tp.prune(tiny_decoder("llama-sdpa"), "fastv")


def test_unsupported_attention_kernel_is_refused():
    model = tiny_decoder("llama-sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(tp.UnsupportedModelError, match="attention implementation 'flex_attention'"):
        tp.prune(model, tp.FastV())
    assert hook_count(model) == hook_count(tiny_decoder("llama-sdpa"))


def test_empty_segment_raises_and_model_keeps_working(decoder):
    ids = prompt()
    before, hooks = params_of(decoder), hook_count(decoder)
    with torch.no_grad():
        dense = decoder(ids).logits
        with tp.pruning(decoder, tp.FastV(layer=2, segment="visual")):
            with pytest.raises(tp.TokenPruneError, match="no 'visual' tokens to prune"):
                decoder(ids)
    assert_untouched(decoder, before, hooks, ids, dense)


# ---- the real model --------------------------------------------------------------------
TEXT = (
    "The Python interpreter reads a program line by line. Each line is broken into tokens, "
    "the tokens are parsed into a tree, the tree is compiled to bytecode and the bytecode runs "
    "on a virtual machine. Question: what does the interpreter compile the tree to? Answer:"
)


def test_smollm2_contract(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    enc = tok([TEXT, "Name a colour of the sky:"], return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    with torch.no_grad():
        dense = model(ids[:1]).logits
        with tp.pruning(model, tp.FastV(layer=4, keep_ratio=1.0)):
            assert torch.equal(model(ids[:1]).logits, dense)
        with tp.pruning(model, tp.FastV(layer=4, keep_ratio=0.5)) as handle:
            seq, logits = greedy(model, ids[:1], n=4)
            assert handle.stats.tokens_per_layer[4][0] < handle.stats.tokens_per_layer[3][0]
            again = recompute_step_logits(model, handle, seq, ids.shape[1])
            assert torch.allclose(logits, again, atol=1e-3, rtol=1e-3)
            both, _ = greedy(model, ids, attention_mask=mask, n=4)
            short = ids[1][mask[1].bool()][None]
            alone, _ = greedy(model, short, n=4)
            assert torch.equal(both[1, ids.shape[1]:], alone[0, short.shape[1]:])
            assert torch.equal(both[0], seq[0])
    with torch.no_grad():
        assert torch.equal(model(ids[:1]).logits, dense)


# ---- ViT / CLIP encoders ---------------------------------------------------------------
VISUAL = dict(segment="visual", protect_first=0, protect_last=0)
ENCODER_NAMES = sorted(set(CASES) - DECODER_ONLY) + sorted(ENGINE_CASES)


def make_visual(name, noop=False):
    cls = ENGINE_CASES[name][0] if name in ENGINE_CASES else type(tp.build_pruner(name))
    return cls(layer=[1, 3], keep_ratio=1.0 if noop else 0.6, **VISUAL)


def pixels(batch=3, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_contract(encoder, name):
    model, forward = encoder
    x = pixels()
    before, hooks = params_of(model), hook_count(model)
    with torch.no_grad():
        dense = forward(x)
        with tp.pruning(model, make_visual(name, noop=True)):
            assert torch.equal(forward(x), dense), "keep-everything must be the dense model exactly"
        with tp.pruning(model, make_visual(name)) as handle:
            pruned = forward(x)
            stats = handle.stats
            alone = torch.cat([forward(x[i : i + 1]) for i in range(len(x))])
            other = forward(pixels(2, seed=5))  # a different batch in between: no state leaks
            again = forward(x)
        after = forward(x)
    assert not torch.equal(pruned, dense)
    assert torch.allclose(alone, pruned, atol=1e-5), "a batch must equal each image alone"
    assert torch.equal(again, pruned) and other.shape[0] == 2
    counts = [row[0] for row in stats.tokens_per_layer]
    assert counts[1] < counts[0] and counts[3] < counts[2] and stats.flops < stats.dense_flops
    assert torch.equal(after, dense) and hook_count(model) == hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(set(CASES) - DECODER_ONLY))
def test_encoder_never_drops_prefix_tokens(encoder, name):
    model, forward = encoder
    prefix = 2 if "DeiT" in type(model).__name__ else 1
    kept_prefix = []

    class Spy(type(tp.build_pruner(name))):
        def select(self, state):
            reduction = super().select(state)
            kept_prefix.append(bool(reduction.keep[:, :prefix].all()))
            return reduction

    with torch.no_grad(), tp.pruning(model, Spy(layer=[1, 2], keep_ratio=0.0, **VISUAL)) as h:
        out = forward(pixels(2))
    counts = [row[0] for row in h.stats.tokens_per_layer]
    assert kept_prefix == [True, True] and counts[2] <= counts[1] < counts[0] and counts[2] >= prefix
    assert torch.isfinite(out).all()


def test_encoder_bad_input_leaves_model_untouched(encoder):
    model, forward = encoder
    x = pixels()
    before, hooks = params_of(model), hook_count(model)
    with torch.no_grad():
        dense = forward(x)
    with pytest.raises(tp.TokenPruneError, match="beyond the model"):
        tp.prune(model, tp.ZeroTPrune(layer=[2, 9]))
    with tp.pruning(model, tp.FastV(layer=2)), pytest.raises(tp.TokenPruneError, match="no 'text' tokens"):
        with torch.no_grad():
            forward(x)
    with torch.no_grad():
        assert torch.equal(forward(x), dense)
    assert hook_count(model) == hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
