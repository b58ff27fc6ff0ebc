"""The LVLM (LLaVA) adapter: the contract on visual tokens, segment / grid bookkeeping, routing, errors.

Runs on a tiny random LlavaForConditionalGeneration built from a config dict (structure only,
no quality claims) and on the bundled ``tiny-llava``.
"""
import pytest
import torch

import tokenprune as tp

from .conftest import LLAVA_IMAGE_TOKEN, cache_bytes, llava_inputs, tiny_decoder, tiny_llava
from .test_contract import ENGINE_CASES, hook_count, params_of

VISUAL = dict(segment="visual", protect_first=0, protect_last=0, target="language")

# (reducing config, keep-everything config) of every method on an LVLM's visual tokens
LVLM_CASES = {
    "fastv": (dict(layer=2, keep_ratio=0.4, **VISUAL), dict(layer=2, keep_ratio=1.0, **VISUAL)),
    "random": (dict(layer=1, keep_ratio=0.5, seed=3, **VISUAL), dict(layer=1, keep_ratio=1.0, **VISUAL)),
    "tome": (dict(layer=[1, 3], keep_ratio=0.6, **VISUAL), dict(layer=[1, 3], keep_ratio=1.0, **VISUAL)),
    "zero-tprune": (dict(layer=2, keep_ratio=0.5, **VISUAL), dict(layer=2, keep_ratio=1.0, **VISUAL)),
    "visionzip": (dict(layer=1, keep_ratio=0.4, contextual_share=0.3), dict(layer=1, keep_ratio=1.0)),
    # entropy term from the patch pixels and recycling on a 2 x 2 cell grid, two stages
    "vflowopt": (dict(layer=[1, 3], keep_ratio=0.5, alpha=0.5, recycle_grid=2, **VISUAL),
                 dict(layer=[1, 3], keep_ratio=1.0, **VISUAL)),
    # untrained threshold rule (the shipped head is for the 6-layer tiny-llava; see tests/test_atp.py)
    "atp": (dict(layer=[1, 3], keep_ratio=0.3, checkpoint=None), dict(layer=[1, 3], keep_ratio=1.0, checkpoint=None)),
    # before decoder layer 0 (name@0): the language model runs on, and caches, the kept tokens only
    "random@0": (dict(layer=0, keep_ratio=0.5, seed=3, **VISUAL), dict(layer=0, keep_ratio=1.0, **VISUAL)),
    "visionzip@0": (dict(layer=0, keep_ratio=0.4, contextual_share=0.3), dict(layer=0, keep_ratio=1.0)),
    # token / block skipping in the language model (every segment: they ask nothing of visual tokens)
    "shortgpt": (dict(sparsity=0.25, scores=[1.0, 0.2, 0.5, 0.3]), dict(sparsity=0.0, scores=[1.0, 0.2, 0.5, 0.3])),
    "skip-rank": (dict(sparsity=0.4), dict(sparsity=0.0)),
    "skip-random": (dict(sparsity=0.4, seed=1), dict(sparsity=0.0)),
    "ftp": (dict(sparsity=0.4, checkpoint=None), dict(sparsity=0.0, checkpoint=None)),  # static rule: no router fits
}
ALL = sorted(LVLM_CASES) + sorted(ENGINE_CASES)
# methods made for another family: on an LVLM they must get the library's error, not run wrongly
LVLM_REFUSED = {"tome-sd", "unet-static", "aptp"}


def make(name, noop=False):
    if name in ENGINE_CASES:
        return ENGINE_CASES[name][0](layer=2, keep_ratio=1.0 if noop else 0.4, **VISUAL)
    active, keep_all = LVLM_CASES[name]
    return tp.build_pruner(name.split("@")[0], **(keep_all if noop else active))


def test_every_registered_method_has_an_lvlm_case():
    assert set(tp.list_pruners()) <= set(LVLM_CASES) | LVLM_REFUSED


@pytest.mark.parametrize("name", sorted(LVLM_REFUSED))
def test_methods_of_other_families_are_refused(llava, name):
    x = llava_inputs()
    with pytest.raises(tp.TokenPruneError), torch.no_grad(), tp.pruning(llava, tp.build_pruner(name)):
        llava(**x)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def greedy(model, inputs, n=5, **kw):
    # a generated <image> id would make the cache-free recompute's prompt invalid (raw logits are unchanged)
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, suppress_tokens=[LLAVA_IMAGE_TOKEN],
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


def segments_of(ids, mask, prompt_len):
    seg = torch.where(ids == LLAVA_IMAGE_TOKEN, int(tp.Segment.VISUAL), int(tp.Segment.TEXT))
    seg[:, prompt_len:] = int(tp.Segment.GENERATED)
    return seg.masked_fill(mask == 0, int(tp.Segment.PAD))


@pytest.mark.parametrize("name", ALL)
def test_lvlm_contract(llava, name):
    x = llava_inputs()
    with torch.no_grad():
        dense = llava(**x).logits  # transformers installs its own output-capturing hooks on first call
        dense_seq, _ = greedy(llava, x)
    before, hooks = params_of(llava), hook_count(llava)
    with torch.no_grad():
        dense_beams = llava.generate(**x, max_new_tokens=4, num_beams=2, do_sample=False)
        with tp.pruning(llava, make(name, noop=True)):
            assert torch.equal(llava(**x).logits, dense), "keep-everything must be the dense model exactly"
            assert torch.equal(greedy(llava, x)[0], dense_seq)
            assert torch.equal(llava.generate(**x, max_new_tokens=4, num_beams=2, do_sample=False), dense_beams)
        with tp.pruning(llava, make(name)) as handle:
            pruned = llava(**x).logits
            beams = llava.generate(**x, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
            assert beams.shape == (4, x["input_ids"].shape[1] + 4)
            seq, logits = greedy(llava, x)
            stats = handle.stats
            # cached generate == the pruned model recomputed without a cache
            P = x["input_ids"].shape[1]
            for t in range(P, seq.shape[1]):
                mask = torch.cat([x["attention_mask"], torch.ones(2, t - P, dtype=torch.long)], 1)
                with handle.segments(segments_of(seq[:, :t], mask, P)):
                    step = llava(input_ids=seq[:, :t], attention_mask=mask, pixel_values=x["pixel_values"],
                                 use_cache=False).logits[:, -1]
                assert torch.allclose(step, logits[:, t - P], atol=1e-4, rtol=1e-4)
            # a left-padded batch equals each row alone
            for b in range(2):
                keep = x["attention_mask"][b].bool()
                alone = llava(input_ids=x["input_ids"][b, keep][None], pixel_values=x["pixel_values"][b:b + 1]).logits
                assert torch.allclose(pruned[b, keep], alone[0], atol=1e-5)
            # another config's request in between leaves nothing behind (A / B / A)
            with torch.no_grad():
                llava(**llava_inputs((3, 12), seed=4))
            assert torch.equal(llava(**x).logits, pruned)
        after = llava(**x).logits
    assert not torch.equal(pruned, dense), "the reducing config should change the output"
    assert stats.flops < stats.dense_flops and stats.kv_bytes < stats.dense_kv_bytes
    assert torch.equal(after, dense) and hook_count(llava) == hooks
    assert all(torch.equal(v, before[k]) for k, v in llava.state_dict().items())


def test_only_visual_tokens_are_pruned_and_grid_is_recorded(llava):
    x = llava_inputs(images_per_prompt=2)
    seen = {}

    class Spy(tp.RandomDrop):
        def select(self, state):
            seen.update(segments=state.segments.clone(), image=state.info("image"), row=state.info("row"),
                        col=state.info("col"), valid=state.valid.clone(), pixels=state.info("patch_pixels"))
            return super().select(state)

    with torch.no_grad(), tp.pruning(llava, Spy(layer=1, keep_ratio=0.0, **VISUAL)) as h:
        llava(**x)
    ids, mask = x["input_ids"], x["attention_mask"].bool()
    visual = ids == LLAVA_IMAGE_TOKEN
    assert torch.equal(seen["segments"] == tp.Segment.VISUAL, visual)
    assert torch.equal(seen["segments"] == tp.Segment.PAD, ~mask)
    assert torch.equal(seen["segments"] == tp.Segment.TEXT, mask & ~visual)
    # images in flattened batch order, patches row-major on a 4 x 4 grid
    for b in range(2):
        img = seen["image"][b][visual[b]]
        assert img.tolist() == [2 * b] * 16 + [2 * b + 1] * 16
        assert seen["row"][b][visual[b]].tolist() == [r for r in range(4) for _ in range(4)] * 2
        assert seen["col"][b][visual[b]].tolist() == list(range(4)) * 8
    assert (seen["row"][~visual] == -1).all() and (seen["image"][~visual] == -1).all()
    # the pixels of image 3, patch (row 2, col 1), are what the token at that grid cell sees
    b, k = 1, 16 + 2 * 4 + 1
    pos = visual[b].nonzero()[k].item()
    expected = x["pixel_values"][3, :, 16:24, 8:16].reshape(-1)
    assert torch.equal(seen["pixels"][b, pos], expected)
    kept = h.stats.tokens_per_layer
    assert [r - 32 for r in kept[0]] == [row for row in kept[1]], "all 32 visual tokens of each row dropped"


def test_vision_tower_facts_match_eager_attention(llava):
    x = llava_inputs()
    got = {}

    class Spy(tp.FastV):
        def select(self, state):
            got["attn"], got["keys"] = state.info("vision_cls_attention"), state.info("vision_keys")
            return super().select(state)

    with torch.no_grad():
        eager = tiny_llava(vision_attn="eager").model.vision_tower  # same seed: same weights
        ref = eager(x["pixel_values"], output_attentions=True)
        with tp.pruning(llava, Spy(layer=2, keep_ratio=0.5, **VISUAL)):
            llava(**x)
    # tiny_llava reads the last layer's output, so its attention is the last layer's
    cls_attn = ref.attentions[-1].mean(1)[:, 0, 1:]  # (images, 16)
    visual = x["input_ids"] == LLAVA_IMAGE_TOKEN
    for b in range(2):
        assert torch.allclose(got["attn"][b][visual[b]], cls_attn[b], atol=1e-5)
        assert (got["attn"][b][~visual[b]] == 0).all()
    assert got["keys"].shape[-1] == llava.config.vision_config.hidden_size


def test_bad_lvlm_input_gets_the_library_error(llava):
    x = llava_inputs()
    with torch.no_grad():
        dense = llava(**x).logits
    before, hooks = params_of(llava), hook_count(llava)
    with torch.no_grad():
        text_only = x["input_ids"].masked_fill(x["input_ids"] == LLAVA_IMAGE_TOKEN, 7)
        with tp.pruning(llava, tp.FastV(layer=2, **VISUAL)):
            with pytest.raises(tp.TokenPruneError, match="no 'visual' tokens"):
                llava(input_ids=text_only, attention_mask=x["attention_mask"])
            with pytest.raises(tp.TokenPruneError, match="image tokens but 1 image"):
                llava(input_ids=x["input_ids"], attention_mask=x["attention_mask"], pixel_values=x["pixel_values"][:1])
    with pytest.raises(tp.TokenPruneError, match="target must be one of"):
        tp.FastV(target="projector")
    with pytest.raises(tp.TokenPruneError, match="this model has no vision tower"):
        tp.prune(tiny_decoder("llama-sdpa"), tp.FastV(target="vision"))
    with pytest.raises(tp.TokenPruneError, match="beyond the model"):
        tp.prune(llava, [tp.FastV(layer=2, **VISUAL), tp.RandomDrop(layer=9, **VISUAL)])
    assert hook_count(llava) == hooks
    assert all(torch.equal(v, before[k]) for k, v in llava.state_dict().items())
    with torch.no_grad():
        assert torch.equal(llava(**x).logits, dense)


def test_tower_and_decoder_pruners_compose(llava):
    x = llava_inputs()
    tower = dict(layer=1, segment="visual", protect_first=0, protect_last=0, target="vision")
    with torch.no_grad():
        dense = llava(**x).logits
        dense_seq, _ = greedy(llava, x)
        keep_all = [tp.ZeroTPrune(keep_ratio=1.0, **tower), tp.FastV(layer=2, keep_ratio=1.0, **VISUAL)]
        with tp.pruning(llava, keep_all):
            assert torch.equal(llava(**x).logits, dense)
            assert torch.equal(greedy(llava, x)[0], dense_seq)
        with tp.pruning(llava, [tp.ZeroTPrune(keep_ratio=0.5, **tower), tp.FastV(layer=2, keep_ratio=0.5, **VISUAL)]) as h:
            pruned = llava(**x).logits
            seq, _ = greedy(llava, x)
            stats = h.stats
    assert not torch.equal(pruned, dense) and seq.shape == dense_seq.shape
    assert stats.vision is not None and stats.vision.tokens_per_layer[1][0] == 1 + 8  # CLS + half of 16 patches
    assert stats.tokens_per_layer[2][0] < stats.tokens_per_layer[1][0]
    assert torch.equal(llava(**x).logits, dense)


def test_tower_pruner_on_a_model_without_tower_is_refused():
    with pytest.raises(tp.TokenPruneError, match="this model has no vision tower"):
        tp.prune(tiny_decoder("qwen2"), tp.ZeroTPrune(segment="text", target="vision"))


def test_tiny_llava_answers_under_pruning():
    """The bundled testbed through generate: FastV from layer 2 at 75% visual pruning keeps its answers."""
    from tokenprune.zoo import vqa_data

    model, processor = tp.zoo.load("tiny-llava")
    items = vqa_data.easy_vqa_items("test", limit=24, seed=1)
    dense = vqa_data.vqa_accuracy(model, processor, items, batch_size=24)
    with tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.25, segment="visual")) as h:
        pruned = vqa_data.vqa_accuracy(model, processor, items, batch_size=24)
        kept = h.stats.tokens_per_layer
    assert dense >= 0.9 and pruned >= dense - 0.1
    assert all(a - b == 48 for a, b in zip(kept[1], kept[2])), "48 of each row's 64 visual tokens leave at layer 2"


def test_stats_record_kept_and_merged_positions(llava):
    x = llava_inputs()
    with torch.no_grad(), tp.pruning(llava, tp.VisionZip(layer=1, keep_ratio=0.5, contextual_share=0.5)) as h:
        llava(**x)
    stats = h.stats
    visual = x["input_ids"] == LLAVA_IMAGE_TOKEN
    for b in range(2):
        kept = set(stats.kept[1][b])
        positions = visual[b].nonzero().flatten().tolist()
        assert len(kept & set(positions)) == 8 and len(kept) == stats.tokens_per_layer[1][b]
        merged = stats.merged[1][b]
        assert merged and all(s in positions and d in kept and s not in kept for s, d in merged)
    assert list(stats.kept) == [1] and stats.to_dict()["kept"]["1"] == stats.kept[1]


def test_kv_bytes_are_what_the_cache_holds(llava):
    x = llava_inputs()
    with torch.no_grad(), tp.pruning(llava, tp.FastV(layer=2, keep_ratio=0.25, **VISUAL)) as h:
        out = llava.generate(**x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert h.stats.kv_bytes == cache_bytes(out.past_key_values) < h.stats.dense_kv_bytes
