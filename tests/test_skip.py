"""Routed Skip at prefill and decode (tokens bypass blocks and leave no KV there), and the skip baselines.

Routers here decide per token from its own hidden state, so rows route differently and a
generated token can skip: the hardest case for "cached generate == cache-free recompute".
"""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.shortgpt import block_influence, shipped_scores
from tokenprune.pruner import Pruner
from tokenprune.stats import kv_bytes_per_token

from .conftest import tiny_decoder, tiny_encoder, tiny_llava
from .test_contract import assert_untouched, greedy, hook_count, params_of, prompt, recompute_step_logits


@dataclass
class HiddenRouter(Pruner):
    """Test router: a token skips block i when its hidden state's first feature is below ``cut``
    (causal, per token); the first token of each row never does. ``log`` records who skipped."""

    name = "test-hidden-router"
    cut: float = 0.0
    blocks: tuple = (1, 2, 3)
    routes_decode: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        self.log = []

    def layers(self):
        return list(self.blocks)

    def select(self, state):
        first = state.positions() == 0
        keep = state.valid & ((state.hidden[..., 0] >= self.cut) | first)
        self.log.append((state.layer, state.decoding, state.index.clone(), state.valid & ~keep, keep.clone()))
        return tp.Skip(keep=keep)


FAMILIES = ["llama-sdpa", "llama-eager", "qwen3", "gemma3"]


@pytest.fixture(params=FAMILIES)
def model(request):
    return tiny_decoder(request.param)


def padded_batch():
    a, b = prompt(20, seed=2)[0], prompt(13, seed=3)[0]
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, 7:] = a, b
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    return batch, mask, a, b


def test_keep_all_routing_at_decode_is_dense_exactly(model):
    ids = prompt()
    with torch.no_grad():
        dense = model(ids).logits
        dense_seq, dense_logits = greedy(model, ids)
        router = HiddenRouter(cut=-1e9)  # asked at every block and step, keeps everyone
        with tp.pruning(model, router) as handle:
            assert torch.equal(model(ids).logits, dense)
            seq, logits = greedy(model, ids)
            assert handle.stats.flops == handle.stats.dense_flops
    assert torch.equal(seq, dense_seq) and torch.equal(logits, dense_logits)
    assert any(decoding for _, decoding, _, _, _ in router.log)


def test_cached_generate_equals_routed_recompute(model):
    ids = prompt()
    router = HiddenRouter()
    with torch.no_grad(), tp.pruning(model, router) as handle:
        seq, logits = greedy(model, ids, n=8)
        stats = handle.stats
        skipped_at_decode = sum(int(s.sum()) for _, decoding, _, s, _ in router.log if decoding)
        again = recompute_step_logits(model, handle, seq, ids.shape[1])
    assert skipped_at_decode > 0, "generated tokens should skip some blocks"
    assert torch.allclose(logits, again, atol=1e-4, rtol=1e-4)
    assert stats.flops < stats.dense_flops and stats.kv_bytes < stats.dense_kv_bytes


def test_sampling_with_routing_equals_recompute():
    model = tiny_decoder("llama-sdpa")
    ids = prompt(batch=2)
    with torch.no_grad(), tp.pruning(model, HiddenRouter()) as handle:
        torch.manual_seed(0)
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0,
                             return_dict_in_generate=True, output_logits=True)
        again = recompute_step_logits(model, handle, out.sequences, ids.shape[1])
    assert torch.allclose(torch.stack(out.logits, dim=1), again, atol=1e-4, rtol=1e-4)


def test_padded_batch_equals_rows_alone_when_rows_route_differently(model):
    batch, mask, a, b = padded_batch()
    router = HiddenRouter()
    with torch.no_grad(), tp.pruning(model, router):
        seq, logits = greedy(model, batch, attention_mask=mask, n=6)
        decisions = [s for _, decoding, _, s, _ in router.log if decoding]
        seq_a, logits_a = greedy(model, a[None], n=6)
        seq_b, logits_b = greedy(model, b[None], n=6)
    assert any(bool(s[0].any() != s[1].any()) for s in decisions), "rows should route differently at decode"
    assert torch.equal(seq[0, 20:], seq_a[0, 20:]) and torch.equal(seq[1, 20:], seq_b[0, 13:])
    assert torch.allclose(logits[0], logits_a[0], atol=1e-5) and torch.allclose(logits[1], logits_b[0], atol=1e-5)


def test_skipped_tokens_leave_no_kv_and_accounting_matches_the_cache(model):
    batch, mask, _, _ = padded_batch()
    router = HiddenRouter()
    with torch.no_grad(), tp.pruning(model, router) as handle:
        out = model.generate(batch, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True)
        stats = handle.stats
    cache = out.past_key_values
    held = [layer.keys.shape[2] if layer.is_initialized else 0 for layer in cache.layers]
    per_token = kv_bytes_per_token(model.config, 4)
    assert stats.kv_bytes == 2 * sum(held) * per_token
    total = batch.shape[1] + 4  # the last generated token never entered the cache
    assert held[0] == total
    for i in (1, 2, 3):  # a block holds the tokens that ran it, rows padded to the longest (fillers)
        calls = [kept.sum(1).max() for layer, _, _, _, kept in router.log if layer == i]
        assert held[i] == sum(int(c) for c in calls) < total


def test_a_skipped_token_passes_its_block_unchanged():
    model = tiny_decoder("llama-sdpa")
    ids = prompt()
    seen = {}

    def pre(i):  # registered before tp.prune: sees the block's full input
        def fn(module, args, kwargs):
            seen[("in", i)] = (args[0] if args else kwargs["hidden_states"]).clone()
        return fn

    def post(i):  # registered after: sees the output with skipped tokens put back
        def fn(module, args, output):
            seen[("out", i)] = (output[0] if isinstance(output, tuple) else output).clone()
        return fn

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    router = HiddenRouter()
    try:
        with torch.no_grad(), tp.pruning(model, router):
            handles += [layer.register_forward_hook(post(i)) for i, layer in enumerate(model.model.layers)]
            model(ids)
            checked = 0
            for layer, _, _, skipped, _ in router.log:
                x, y = seen[("in", layer)], seen[("out", layer)]
                assert torch.equal(x[skipped], y[skipped]) and not torch.equal(x[~skipped], y[~skipped])
                checked += int(skipped.sum())
            router.log.clear()
            greedy(model, ids, n=4)  # the last call is a decode step: its new token, where it skipped
            for layer, decoding, _, skipped, _ in router.log[-3:]:
                assert decoding and torch.equal(seen[("in", layer)][skipped], seen[("out", layer)][skipped])
                checked += int(skipped.sum())
        assert checked > 0
    finally:
        for h in handles:
            h.remove()


def test_attention_after_a_skipped_block_indexes_the_current_slots():
    model = tiny_decoder("llama-sdpa")
    seen = {}

    @dataclass
    class Spy(HiddenRouter):
        def select(self, state):
            if state.layer == 2 and not state.decoding:
                seen["probs"] = state.attention(None).sum(1)
                seen["n"] = state.num_slots
            return super().select(state)

    router = Spy(blocks=(1, 2))
    with torch.no_grad(), tp.pruning(model, router):
        model(prompt())
    skipped = router.log[0][3][0]  # who skipped block 1
    probs = seen["probs"][0]  # (n, n), head-summed
    assert seen["n"] == 24 and skipped.any()
    assert torch.equal(probs[:, skipped], torch.zeros_like(probs[:, skipped])), "skippers left no key"
    assert torch.allclose(probs.sum(-1), torch.full((24,), 4.0)), "every token, skippers too, has a row"


def test_decode_context_attention_equals_recompute():
    """What a router reads of a generated token (its share on the first token) is the same at
    its decode step and in a cache-free recompute: the basis of cached == recompute for FTP."""
    model = tiny_decoder("qwen3")
    ids = prompt()
    reads = {"decode": {}, "recompute": {}}

    @dataclass
    class Spy(HiddenRouter):
        def select(self, state):
            probs, key_index, key_valid = state.context_attention(None)
            sink = (probs.mean(1) * (key_index == state.row_offset[:, None])[:, None, :]).sum(-1)  # (B, q)
            fused = state.attention_mass(state.row_offset).mean(1)  # the same, through the attention kernel
            assert torch.allclose(fused, sink, atol=1e-6)
            generated = state.segments == int(tp.Segment.GENERATED)
            where = "decode" if state.decoding else "recompute"
            for pos, value in zip(state.index[0][generated[0]].tolist(), sink[0][generated[0]].tolist()):
                reads[where][(state.layer, pos)] = value
            return super().select(state)

    with torch.no_grad(), tp.pruning(model, Spy()) as handle:
        seq, _ = greedy(model, ids, n=5)
        recompute_step_logits(model, handle, seq, ids.shape[1])
    assert len(reads["decode"]) >= 10
    for key, value in reads["decode"].items():
        assert abs(reads["recompute"][key] - value) < 1e-5


@pytest.mark.parametrize("family, chunk", [(f, 256) for f in FAMILIES] + [("qwen3", 8)])
def test_prefill_attention_mass_equals_the_probabilities(family, chunk, monkeypatch):
    """``state.attention_mass`` for every slot at prefill (FTP's feature, computed on a few heads
    without a probability matrix, in chunks of query rows) equals the columns of the explicit
    attention probabilities, with keys masked by a Skip at the previous layer and by left padding
    (padding rows: 0)."""
    from tokenprune.adapters import decoder

    monkeypatch.setattr(decoder, "MASS_ROWS", chunk)
    model = tiny_decoder(family)
    checked = []

    @dataclass
    class Spy(HiddenRouter):
        def select(self, state):
            probs, key_index, _ = state.context_attention(None)
            on = state.row_offset
            want = (probs * (key_index == on[:, None])[:, None, None, :]).sum(-1)  # (B, heads, n)
            for heads in [(1,), (3, 0), (0, 1, 2), None]:
                got = state.attention_mass(on, heads=heads)
                assert torch.allclose(got, want if heads is None else want[:, list(heads)], atol=1e-6)
            checked.append(state.layer)
            return super().select(state)

    batch, mask, _, _ = padded_batch()
    router = Spy()
    with torch.no_grad(), tp.pruning(model, router):
        model(batch, attention_mask=mask)
    assert checked == [1, 2, 3]
    assert router.log[0][3].any(), "some tokens skipped block 1: block 2's scores mask their keys"


def test_remove_after_routed_generate_is_exact():
    model = tiny_decoder("llama-eager")
    ids = prompt()
    before, hooks = params_of(model), hook_count(model)
    with torch.no_grad():
        dense = model(ids).logits
        handle = tp.prune(model, [tp.build_pruner("shortgpt", sparsity=0.25, scores=[1, 0.2, 0.5, 0.3])])
        greedy(model, ids)
        handle.remove()
        assert torch.equal(model(ids).logits, dense)
    assert hook_count(model) == hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- the baselines -------------------------------------------------------------------
def test_shortgpt_removes_the_lowest_influence_blocks_and_nothing_runs_there():
    model = tiny_decoder("llama-sdpa")
    ids = prompt()
    bi = block_influence(model, [ids, prompt(16, seed=5)])
    assert len(bi) == 4 and all(0.0 <= x <= 2.0 for x in bi)
    pruner = tp.build_pruner("shortgpt", sparsity=0.5, scores=bi)
    removed = pruner.layers_on(4)
    assert removed == sorted(sorted(range(1, 4), key=lambda i: (bi[i], i))[:2])
    with torch.no_grad(), tp.pruning(model, pruner) as handle:
        _, logits = greedy(model, ids, n=4)
        stats = handle.stats
    assert [row[0] for i, row in enumerate(stats.tokens_per_layer) if i in removed] == [0, 0]
    assert stats.flops * 2 == stats.dense_flops  # half the blocks, each at the dense model's cost
    assert stats.kv_bytes * 2 == stats.dense_kv_bytes
    # equal to the model without those blocks (recomputed without a cache, no tokenprune)
    layers = model.model.layers
    try:
        model.model.layers = torch.nn.ModuleList([l for i, l in enumerate(layers) if i not in removed])
        model.config.num_hidden_layers = 2
        with torch.no_grad():
            seq = torch.cat([ids, logits.argmax(-1)[:, :-1]], dim=1)
            short = model(seq, use_cache=False).logits[:, ids.shape[1] - 1:]
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, 4
    assert torch.allclose(short, logits, atol=1e-4)


def test_shortgpt_shipped_scores_for_smollm2():
    bi = shipped_scores("smollm2-135m")
    pruner = tp.build_pruner("shortgpt", sparsity=0.3)  # no arguments: the shipped SmolLM2-135M scores
    removed = pruner.layers_on(30)
    assert len(bi) == 30 and len(removed) == 9 and 0 not in removed
    assert max(bi[i] for i in removed) <= min(bi[i] for i in range(1, 30) if i not in removed)
    assert tp.build_pruner(**pruner.to_dict()).layers_on(30) == removed


def test_skip_random_routes_rows_alike_alone_or_batched_and_hits_the_share():
    model = tiny_decoder("llama-sdpa")
    batch, mask, a, b = padded_batch()
    pruner = tp.build_pruner("skip-random", sparsity=0.3, seed=4)
    with torch.no_grad(), tp.pruning(model, pruner) as handle:
        model(batch, attention_mask=mask)
        both = handle.stats.tokens_per_layer
        model(b[None])
        alone = handle.stats.tokens_per_layer
    rate = 0.3 * 4 / 3
    assert [row[1] for row in both] == [row[0] for row in alone]
    assert [row[1] for row in both[1:]] == [13 - round(rate * 12)] * 3


BAD = [
    (dict(name="shortgpt", sparsity=1.5), "sparsity must be a number in \\[0, 1\\]"),
    (dict(name="shortgpt", blocks=[0, 2]), "blocks must be a list of block indices >= 1"),
    (dict(name="shortgpt", scores="no-such-model"), "no shipped block-influence scores"),
    (dict(name="shortgpt", scores=[0.1, "x"]), "scores must be"),
    (dict(name="skip-rank", sparsity=-0.1), "sparsity must be a number in \\[0, 1\\]"),
    (dict(name="skip-random", blocks=[2, 2]), "repeats a block"),
]


@pytest.mark.parametrize("config,message", BAD)
def test_bad_configs_raise_the_library_error(config, message):
    with pytest.raises(tp.TokenPruneError, match=message):
        tp.build_pruner(**config)


@pytest.mark.parametrize("pruner,message", [
    (lambda: tp.build_pruner("shortgpt", sparsity=0.3), "score 30 blocks, but this model has 4"),
    (lambda: tp.build_pruner("shortgpt", blocks=[2, 7]), "layer 7 is beyond the model"),
    (lambda: tp.build_pruner("shortgpt", sparsity=1.0, scores=[1, 2, 3, 4]), "block 0 stays"),
    (lambda: tp.build_pruner("skip-random", sparsity=0.9), "does not fit in the 3 routed blocks"),
    (lambda: tp.build_pruner("skip-rank", blocks=[1, 9]), "layer 9 is beyond the model"),
])
def test_configs_that_do_not_fit_the_model_are_refused_before_it_runs(pruner, message):
    model = tiny_decoder("llama-sdpa")
    hooks = hook_count(model)
    with pytest.raises(tp.TokenPruneError, match=message):
        tp.prune(model, pruner())
    assert hook_count(model) == hooks


def test_only_a_skip_is_accepted_at_decode():
    @dataclass
    class Dropper(HiddenRouter):
        def select(self, state):
            return tp.Drop(keep=state.valid & (state.positions() == 0)) if state.decoding else None

    model = tiny_decoder("llama-sdpa")
    with torch.no_grad(), tp.pruning(model, Dropper()):
        with pytest.raises(tp.TokenPruneError, match="only a Skip"):
            greedy(model, prompt(), n=2)


def test_smollm2_routed_generate_equals_recompute(smollm2):
    model, tok = smollm2
    ids = tok("The interpreter compiles the tree to bytecode, and the bytecode", return_tensors="pt").input_ids
    with torch.no_grad():
        for pruner in (tp.build_pruner("skip-random", sparsity=0.3), tp.build_pruner("shortgpt", sparsity=0.3)):
            with tp.pruning(model, pruner) as handle:
                seq, logits = greedy(model, ids, n=3)
                stats = handle.stats
                again = recompute_step_logits(model, handle, seq, ids.shape[1])
            assert torch.allclose(logits, again, atol=1e-3, rtol=1e-3)
            assert 0.6 < stats.flops_ratio < 0.75


def test_beam_search_reorders_the_routed_cache_rows():
    """Beams of one prompt route their generated tokens differently, so they hold different keys:
    every returned beam's token log-probs equal the routed model recomputed without a cache."""
    model = tiny_decoder("llama-sdpa")
    ids = prompt(seed=0)  # (beams reorder and route apart within 8 steps)
    with torch.no_grad(), tp.pruning(model, HiddenRouter()) as handle:
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=3,
                             do_sample=False, return_dict_in_generate=True, output_scores=True, length_penalty=0.0)
        chosen = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
        P = ids.shape[1]
        again = recompute_step_logits(model, handle, out.sequences, P).log_softmax(-1)
    expected = again.gather(2, out.sequences[:, P:, None])[..., 0]
    assert torch.allclose(chosen, expected, atol=1e-4)


@pytest.mark.parametrize("combo", ["fastv", "random@0", "tome"])
@pytest.mark.parametrize("renumber", [False, True])
def test_decode_routing_composes_with_other_reductions(combo, renumber):
    model = tiny_decoder("llama-eager")
    other = {"fastv": tp.FastV(layer=2, keep_ratio=0.5), "random@0": tp.RandomDrop(layer=0, keep_ratio=0.7, seed=1),
             "tome": tp.build_pruner("tome", layer=[1, 3], keep_ratio=0.7, segment="text")}[combo]
    batch, mask, a, b = padded_batch()
    with torch.no_grad(), tp.pruning(model, [other, HiddenRouter()], renumber_positions=renumber) as handle:
        seq, logits = greedy(model, a[None], n=5)
        again = recompute_step_logits(model, handle, seq, a.shape[0])
        both, _ = greedy(model, batch, attention_mask=mask, n=5)
        alone, _ = greedy(model, b[None], n=5)
    assert torch.allclose(logits, again, atol=1e-4, rtol=1e-4)
    assert torch.equal(both[0], seq[0]) and torch.equal(both[1, 20:], alone[0, 13:])


# ---- attach-time model checks (Pruner.check with the adapter's ModelFacts) -------------------
@dataclass
class FactsProbe(Pruner):
    """Test pruner: records the ModelFacts it is checked with; refuses a residual stream wider than ``max_width``."""

    name = "test-facts-probe"
    max_width: int = 1 << 20

    def __post_init__(self):
        super().__post_init__()
        self.seen = []

    def layers(self):
        return [1]

    def check(self, model):
        super().check(model)
        self.seen.append(model)
        if model.hidden_size > self.max_width:
            raise tp.TokenPruneError(f"{self.name}: built for width <= {self.max_width}, got {model.hidden_size}")

    def select(self, state):
        return None


@pytest.mark.parametrize("kind,facts", [
    ("llama-sdpa", dict(num_layers=4, stack="language", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)),
    ("qwen3", dict(num_layers=4, stack="language", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)),
    ("vit-sdpa", dict(num_layers=4, stack="vision", hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16)),
    ("open_clip", dict(num_layers=4, stack="vision", hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16)),
    ("clip", dict(num_layers=4, stack="vision", hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16)),
])
def test_pruners_check_the_model_facts_before_anything_is_hooked(kind, facts):
    model = tiny_decoder(kind) if kind in ("llama-sdpa", "qwen3") else tiny_encoder(kind)[0]
    probe = FactsProbe()
    tp.prune(model, probe).remove()
    assert probe.seen == [tp.ModelFacts(**facts)]
    before, hooks = params_of(model), hook_count(model)
    with pytest.raises(tp.TokenPruneError, match="built for width <= 32, got 64"):
        tp.prune(model, FactsProbe(max_width=32))
    assert hook_count(model) == hooks and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_lvlm_checks_each_pruner_against_its_own_stack():
    model = tiny_llava()  # CLIP tower of width 32 (2 blocks), Llama decoder of width 64 (4 layers)
    language, vision = FactsProbe(), FactsProbe(target="vision")
    hooks = hook_count(model)
    with pytest.raises(tp.TokenPruneError, match="built for width <= 48, got 64"):
        tp.prune(model, [FactsProbe(max_width=48, target="vision"), FactsProbe(max_width=48)])
    assert hook_count(model) == hooks
    tp.prune(model, [language, vision]).remove()
    assert (language.seen[0].stack, language.seen[0].hidden_size, language.seen[0].num_layers) == ("language", 64, 4)
    assert (vision.seen[0].stack, vision.seen[0].hidden_size, vision.seen[0].num_layers) == ("vision", 32, 2)


def test_a_pruner_that_only_overrides_validate_is_still_checked():
    @dataclass
    class OldStyle(HiddenRouter):
        def validate(self, num_layers):
            raise tp.TokenPruneError(f"old-style validate saw {num_layers} layers")

    model = tiny_decoder("llama-sdpa")
    hooks = hook_count(model)
    with pytest.raises(tp.TokenPruneError, match="old-style validate saw 4 layers"):
        tp.prune(model, OldStyle())
    assert hook_count(model) == hooks


@pytest.mark.parametrize("trained,message", [
    (dict(num_layers=4, hidden_size=96), "trained for hidden size 96; this model has 64"),
    (dict(num_layers=30, hidden_size=64), "trained for a 30-layer decoder; this model has 4 layers"),
])
def test_an_ftp_router_for_another_model_is_refused_at_prune_time(tmp_path, trained, message):
    from tokenprune.methods.ftp import Router

    Router(8, **trained).save(str(tmp_path / "ftp.safetensors"))
    pruner = tp.build_pruner("ftp", sparsity=0.3, checkpoint=str(tmp_path))
    model = tiny_decoder("llama-sdpa")
    ids = prompt()
    with torch.no_grad():
        dense = model(ids).logits
    before, hooks = params_of(model), hook_count(model)
    with pytest.raises(tp.TokenPruneError, match=message):
        tp.prune(model, pruner)
    assert_untouched(model, before, hooks, ids, dense)


# ---- the cache row moves of contrastive search (batch_repeat_interleave + batch_select_indices) -----
@dataclass
class GeneratedOnlyRouter(HiddenRouter):
    """Prompt tokens run every block; generated tokens route by content (so no key bookkeeping
    exists after the prefill: it starts at the first decode step)."""

    def select(self, state):
        generated = state.segments == int(tp.Segment.GENERATED)
        keep = state.valid & ((state.hidden[..., 0] >= self.cut) | (state.positions() == 0) | ~generated)
        self.log.append((state.layer, state.decoding, state.index.clone(), state.valid & ~keep, keep.clone()))
        return tp.Skip(keep=keep)


def contrastive_steps(model, ids, top_k=3, steps=5):
    """The cache calls of HF's contrastive search (``transformers-community/contrastive-search``,
    the ``custom_generate`` transformers v5 moved it to): after each step every row is repeated
    ``top_k`` times (``batch_repeat_interleave``), the top-k candidates run as one batch, and the
    chosen candidate's row is kept (``batch_select_indices``). The pick here is not the top
    candidate, so a wrong row would show. Returns the sequences and the logits each chosen token
    was drawn from."""
    from transformers import DynamicCache

    B = ids.shape[0]
    cache = DynamicCache(config=model.config)
    mask = torch.ones_like(ids)
    logits = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
    mask = mask.repeat_interleave(top_k, dim=0)
    seq, drawn = ids, []
    for t in range(steps):
        drawn.append(logits)
        top = logits.topk(top_k, dim=-1).indices  # (B, top_k)
        cache.batch_repeat_interleave(top_k)
        mask = torch.cat([mask, mask.new_ones(B * top_k, 1)], dim=1)
        out = model(top.reshape(-1, 1), attention_mask=mask, past_key_values=cache, use_cache=True)
        pick = (torch.arange(B) + t) % top_k
        cache.batch_select_indices(pick + torch.arange(B) * top_k)
        logits = out.logits[:, -1].view(B, top_k, -1)[torch.arange(B), pick]
        seq = torch.cat([seq, top[torch.arange(B), pick][:, None]], dim=1)
    return seq, torch.stack(drawn, dim=1), cache


@pytest.mark.parametrize("router", [HiddenRouter, GeneratedOnlyRouter])
def test_contrastive_search_cache_moves_carry_the_routed_rows(router):
    """Candidates of one prompt route their token differently, so they hold different keys: the
    rows contrastive search keeps must bring their own key bookkeeping (without it: a row-count
    error, or, when only generated tokens route, silently the wrong rows' keys)."""
    model = tiny_decoder("llama-sdpa")
    ids = torch.cat([prompt(12, seed=4), prompt(12, seed=5)])
    r = router()
    with torch.no_grad(), tp.pruning(model, r) as handle:
        seq, drawn, cache = contrastive_steps(model, ids)
        again = recompute_step_logits(model, handle, seq, ids.shape[1])
        held = [cache.layers[i].get_seq_length() for i in range(4)]
    skipped = [s for _, decoding, _, s, _ in r.log if decoding]
    assert any(bool(s.any()) for s in skipped), "generated tokens should skip some blocks"
    assert held[0] == seq.shape[1]  # (the chosen candidate's own keys are in: contrastive search looks ahead)
    assert torch.allclose(drawn, again, atol=1e-4, rtol=1e-4)


def test_crop_removes_the_routed_keys_of_the_last_tokens():
    """``cache.crop(-n)`` (contrastive search's low-memory path after each candidate; assisted
    decoding): each routed layer drops the keys of the last n tokens wherever it holds them, so
    the run continues as if they never ran. Cropping into the prefill is refused."""
    from transformers import DynamicCache

    model = tiny_decoder("llama-eager")
    ids = torch.cat([prompt(12, seed=4), prompt(12, seed=5)])
    r = HiddenRouter()
    with torch.no_grad(), tp.pruning(model, r) as handle:
        cache = DynamicCache(config=model.config)
        mask = torch.ones(2, 12, dtype=torch.long)
        logits = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
        prefill_held = [layer.get_seq_length() for layer in cache.layers]
        seq, drawn = ids, []
        for t in range(5):
            drawn.append(logits)
            top = logits.topk(3, dim=-1).indices
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            for k in range(3):  # try each candidate, then take it back out
                model(top[:, k : k + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
                cache.crop(-1)
            chosen = top[:, t % 3 : t % 3 + 1]
            logits = model(chosen, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
            seq = torch.cat([seq, chosen], dim=1)
        again = recompute_step_logits(model, handle, seq, ids.shape[1])
        assert any(bool(s.any()) for _, decoding, _, s, _ in r.log if decoding)
        assert torch.allclose(torch.stack(drawn, dim=1), again, atol=1e-4, rtol=1e-4)
        cache.crop(-5)  # every generated token out: back to the prefill's cache
        assert [layer.get_seq_length() for layer in cache.layers] == prefill_held
        with pytest.raises(tp.TokenPruneError, match="cut into the 12 tokens of the pruned prefill"):
            cache.crop(-1)


def test_prompt_lookup_decoding_under_pruning_is_refused_with_the_library_error():
    """Prompt-lookup (and assisted) decoding prefill the prompt with their first candidates, then
    crop the rejected ones: the prefill's reductions chose among them, so the crop is refused."""
    model = tiny_decoder("llama-sdpa")
    ids = prompt(12, seed=4)
    ids = torch.cat([ids, ids[:, 2:8], ids[:, 2:8]], dim=1)  # repeats: the lookup proposes candidates
    with torch.no_grad(), tp.pruning(model, HiddenRouter()):
        with pytest.raises(tp.TokenPruneError, match="prompt-lookup decoding prefill the prompt with their first"):
            model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)


@pytest.mark.parametrize("shape", [(1, 9, 5), (3, 9, 5), (3, 9), (3, 9, 2, 4)])
def test_row_gather_and_scatter_match_their_definition(shape):
    """The engine's row copies (index_select / index_copy) equal t[b, slots[b]] element for element,
    for a one-row tensor shared by every row too."""
    from tokenprune.state import gather_rows, scatter_rows

    g = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=g)
    slots = torch.stack([torch.randperm(9, generator=g)[:4].sort().values for _ in range(3)])
    gathered = gather_rows(t, slots)
    assert gathered.shape == (3, 4, *shape[2:])
    for b in range(3):
        assert torch.equal(gathered[b], t[0 if shape[0] == 1 else b, slots[b]])
    if shape[0] == 3:
        values = torch.randn(3, 4, *shape[2:], generator=g)
        out = scatter_rows(t, slots, values)
        expected = t.clone()
        for b in range(3):
            expected[b, slots[b]] = values[b]
        assert torch.equal(out, expected) and not torch.equal(out, t)
