"""Property-based tests: random configs of every registered method x tiny random models x random batches.

Every example either runs, with the dense output shape and the stats invariants holding (and,
for decoders, cached ``generate`` equal to the cache-free recompute), or raises the library's
own ``TokenPruneError`` and leaves the model as it was. Any other exception is a bug.

Configs come from a generic strategy over each method's dataclass fields (by name and default
type), so methods added later are fuzzed without editing this file. The default hypothesis
profile is small and repeatable; ``pytest --hypothesis-profile=thorough tests/test_properties.py``
draws many more examples.
"""
from __future__ import annotations

import dataclasses
import functools
from contextlib import nullcontext

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.pruner import _REGISTRY

from . import conftest
from .conftest import ENCODERS, FAMILIES, tiny_decoder, tiny_encoder

METHODS = tp.list_pruners()
NUM_LAYERS = 4  # every tiny model in conftest has 4 layers / blocks
NEW_TOKENS = 3
SEGMENTS = ["text", "visual", "system", "generated"]


# ---- configs: a strategy per dataclass field, from its name and default ---------------------
def layer_list(length=None):
    lists = st.lists(st.integers(1, NUM_LAYERS - 1), min_size=length or 1, max_size=length or 3, unique=True)
    return lists.map(lambda xs: tuple(sorted(xs)))


def field_strategy(f: dataclasses.Field, bad: bool, segments: list[str], targets: list[str]):
    """Values for one config field; ``bad`` adds values the library must refuse with its own error."""
    name = f.name
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    good, wrong = st.just(default), st.nothing()
    if name in ("layer", "layers"):
        good, wrong = st.one_of(st.integers(1, NUM_LAYERS - 1), layer_list()), st.sampled_from([0, NUM_LAYERS])
    elif name == "segment":
        good, wrong = st.sampled_from(segments), st.sampled_from(["generated", "system", "audio"])
    elif name == "target":
        good = st.sampled_from(targets)
        wrong = st.sampled_from(sorted({"vision", "language", "both"} - set(targets)))
    elif name == "seed":
        good = st.integers(0, 2**16)
    elif isinstance(default, bool):
        good = st.booleans()
    elif isinstance(default, int):
        good, wrong = st.integers(min(default, 1), max(4, 2 * default)), st.sampled_from([-1, 0])
    elif isinstance(default, float):
        if 0.0 <= default <= 1.0 and any(w in name for w in ("ratio", "share", "keep", "budget", "fraction")):
            good = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
            wrong = st.sampled_from([-0.25, 1.5, float("nan")])
        else:
            good = st.one_of(st.just(default), st.floats(0.0, max(1.0, 2 * default)))
    elif isinstance(default, tuple) and default and all(type(x) is int for x in default):
        size = len(default)
        good = layer_list(size) if "layer" in name else \
            st.lists(st.integers(1, 2 * max(default)), min_size=size, max_size=size).map(tuple)
    elif isinstance(default, tuple) and default and all(type(x) is float for x in default):
        good = st.lists(st.floats(0.0, 1.0), min_size=len(default), max_size=len(default)).map(tuple)
    # anything else (strings with their own vocabulary, checkpoints, modules) keeps its default
    return st.one_of(good, good, good, wrong) if bad else good


@st.composite
def pruner_config(draw, name, segments=("text", "visual"), targets=("auto",)):
    """``(name, kwargs)``: fields drawn or left at their defaults; one config in six may be invalid."""
    bad = draw(st.integers(0, 5)) == 0
    kwargs = {}
    for f in dataclasses.fields(_REGISTRY[name]):
        if f.init and (f.name == "segment" or draw(st.booleans())):  # the segment must suit the input
            kwargs[f.name] = draw(field_strategy(f, bad, list(segments), list(targets)))
    return name, kwargs


def build(configs):
    """The pruners, or None when the library refuses a config (a pass: refused before any model)."""
    try:
        return [tp.build_pruner(name, **kwargs) for name, kwargs in configs]
    except tp.TokenPruneError as e:
        event(f"refused by build_pruner: {str(e).split(':')[-1][:40]}")
        return None


def composed(segments, targets=("auto",)):
    """A list of one to three configs of any registered methods."""
    one = st.sampled_from(METHODS).flatmap(lambda name: pruner_config(name, segments, targets))
    return st.lists(one, min_size=1, max_size=3)


# ---- models (built once per module: attachments are removed after every example) ------------
@functools.lru_cache(maxsize=None)
def decoder_model(family):
    return tiny_decoder(family)


@functools.lru_cache(maxsize=None)
def encoder_model(kind):
    return tiny_encoder(kind)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def params_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def check_stats(stats, dense_tokens, num_layers, calls=1):
    """Invariants of any pruned request: never more tokens, FLOPs or KV bytes than dense."""
    assert stats.dense_tokens == dense_tokens
    assert len(stats.tokens_per_layer) == num_layers
    for row in stats.tokens_per_layer:
        assert len(row) == len(dense_tokens), "one count per batch row"
        assert all(0 <= kept <= dense for kept, dense in zip(row, dense_tokens)), (row, dense_tokens)
    assert 0 <= stats.flops <= stats.dense_flops
    assert 0 <= stats.kv_bytes <= stats.dense_kv_bytes
    assert stats.forward_calls in (0, calls)  # encoders do not count calls


def pruned_nothing(stats, dense_tokens):
    return all(row == dense_tokens for row in stats.tokens_per_layer)


def refused_cleanly(model, hooks, before):
    """After the library refused: no hooks left, no parameter changed."""
    assert hook_count(model) == hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- decoders ---------------------------------------------------------------------------
@st.composite
def decoder_batch(draw):
    """Left-padded ids, their mask, and a segment map (None: all text) with an optional visual span."""
    lengths = draw(st.lists(st.integers(1, 20), min_size=1, max_size=3))
    B, N = len(lengths), max(lengths)
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(2, 127, (B, N), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(B, N, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, N - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    segments = None
    if draw(st.booleans()):
        segments = torch.where(mask.bool(), int(tp.Segment.TEXT), int(tp.Segment.PAD))
        for b, n in enumerate(lengths):
            start = N - n + draw(st.integers(0, n - 1))
            stop = draw(st.integers(start, N))
            segments[b, start:stop] = int(tp.Segment.VISUAL)
            if draw(st.booleans()):
                segments[b, N - n] = int(tp.Segment.SYSTEM)
    return ids, mask, segments


def decoder_segments(batch):
    """Segments a pruner may target in this batch: text, and visual where the map marks a span."""
    segments = batch[2]
    return ("text", "visual") if segments is not None and bool((segments == tp.Segment.VISUAL).any()) else ("text",)


def greedy(model, inputs):
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def recompute(model, handle, seq, inputs, segments):
    """Each generated token's logits from the whole sequence without a cache (generated marked as such)."""
    mask = inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    B, N = mask.shape
    base = segments if segments is not None else torch.where(mask.bool(), int(tp.Segment.TEXT), int(tp.Segment.PAD))
    steps = []
    for t in range(N, seq.shape[1]):
        m = torch.cat([mask, torch.ones(B, t - N, dtype=mask.dtype)], dim=1)
        seg = torch.cat([base, torch.full((B, t - N), int(tp.Segment.GENERATED))], dim=1)
        with handle.segments(seg):
            steps.append(model(input_ids=seq[:, :t], attention_mask=m, use_cache=False, **extra).logits[:, -1])
    return torch.stack(steps, dim=1)


def rows_alone(model, handle, inputs, segments) -> dict:
    """Logits of each row run alone without its padding (rows the library refuses alone are left out)."""
    out = {}
    for b, real in enumerate(inputs["attention_mask"].bool()):
        if len(inputs["attention_mask"]) == 1:
            break
        ids = inputs["input_ids"][b, real][None]
        try:
            with handle.segments(segments[b, real][None]) if segments is not None else nullcontext():
                out[b] = model(input_ids=ids).logits[0]
        except tp.TokenPruneError:  # e.g. the batch had the pruner's segment only in another row
            pass
    return out


def run_generating_example(model, inputs, segments, configs, renumber, override=True):
    """One example on a decoder or LVLM: forward, cached generate, cache-free recompute, remove.

    ``segments``: the prompt's segment map, given to the adapter (``override``) or, for LVLMs that
    derive it from the ids, used only to mark the recompute's generated tokens.
    """
    mask = inputs["attention_mask"]
    with torch.no_grad():
        dense = model(**inputs).logits  # first: transformers may add its own hooks on a first call
    hooks, before = hook_count(model), params_of(model)
    pruners = build(configs)
    if pruners is None:
        return
    try:
        handle = tp.prune(model, pruners, renumber_positions=renumber)
    except tp.TokenPruneError as e:
        event(f"refused by prune(): {str(e)[:60]}")
        return refused_cleanly(model, hooks, before)
    dense_tokens = mask.sum(1).tolist()
    try:
        with torch.no_grad(), (handle.segments(segments) if override and segments is not None else nullcontext()):
            out = model(**inputs).logits
            stats = handle.stats
            alone = rows_alone(model, handle, inputs, segments) if override else {}
            seq, logits = greedy(model, inputs)
            gen_stats = handle.stats
        with torch.no_grad():
            again = recompute(model, handle, seq, inputs, segments)
    except tp.TokenPruneError as e:
        event(f"refused in the forward: {str(e)[:60]}")
        out = None  # refused inside the forward: the hooks must still come off cleanly
    finally:
        handle.remove()
    refused_cleanly(model, hooks, before)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, dense), "remove() must restore bit for bit"
    if out is None:
        return
    assert out.shape == dense.shape and torch.isfinite(out).all()
    check_stats(stats, dense_tokens, NUM_LAYERS)
    check_stats(gen_stats, dense_tokens, NUM_LAYERS, calls=NEW_TOKENS)
    event("ran: reduced nothing" if pruned_nothing(stats, dense_tokens) else "ran: reduced tokens")
    if pruned_nothing(stats, dense_tokens) and not any(p.resolved_target() == "vision" for p in pruners):
        assert torch.equal(out, dense), "a call that reduced nothing must be the dense model exactly"
    assert torch.allclose(logits, again, atol=1e-4, rtol=1e-4), "cached generate must equal the recompute"
    for b, row in alone.items():
        real = mask[b].bool()
        assert torch.allclose(out[b, real], row, atol=1e-4, rtol=1e-4), "a padded batch row must equal the row alone"


def run_decoder_example(family, configs, batch, renumber):
    ids, mask, segments = batch
    run_generating_example(decoder_model(family), dict(input_ids=ids, attention_mask=mask), segments, configs,
                           renumber)


@pytest.mark.parametrize("name", METHODS)
@given(data=st.data())
def test_decoder_random_configs(name, data):
    family = data.draw(st.sampled_from(sorted(FAMILIES)), label="family")
    batch = data.draw(decoder_batch(), label="batch")
    configs = [data.draw(pruner_config(name, decoder_segments(batch)), label="config")]
    run_decoder_example(family, configs, batch, data.draw(st.booleans(), label="renumber"))


@given(data=st.data())
def test_decoder_composed_lists(data):
    family = data.draw(st.sampled_from(sorted(FAMILIES)), label="family")
    batch = data.draw(decoder_batch(), label="batch")
    configs = data.draw(composed(decoder_segments(batch)), label="configs")
    run_decoder_example(family, configs, batch, data.draw(st.booleans(), label="renumber"))


# ---- LVLMs (a tiny random LLaVA: tower + projector + decoder) -----------------------------
LVLM_TARGETS = ("auto", "vision", "language")


@functools.lru_cache(maxsize=None)
def llava_model():
    return conftest.tiny_llava()


@st.composite
def llava_batch(draw):
    questions = draw(st.lists(st.integers(1, 8), min_size=1, max_size=2))
    inputs = conftest.llava_inputs(tuple(questions), images_per_prompt=draw(st.integers(1, 2)),
                                   seed=draw(st.integers(0, 2**16)))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    segments = torch.where(ids == conftest.LLAVA_IMAGE_TOKEN, int(tp.Segment.VISUAL), int(tp.Segment.TEXT))
    return inputs, segments.masked_fill(mask == 0, int(tp.Segment.PAD))


def run_lvlm_example(configs, batch, renumber):
    inputs, segments = batch
    run_generating_example(llava_model(), inputs, segments, configs, renumber, override=False)


@pytest.mark.skipif(not hasattr(conftest, "tiny_llava"), reason="no tiny LLaVA fixture")
@pytest.mark.parametrize("name", METHODS)
@given(data=st.data())
def test_lvlm_random_configs(name, data):
    batch = data.draw(llava_batch(), label="batch")
    configs = [data.draw(pruner_config(name, ("visual", "visual", "text"), LVLM_TARGETS), label="config")]
    run_lvlm_example(configs, batch, data.draw(st.booleans(), label="renumber"))


@pytest.mark.skipif(not hasattr(conftest, "tiny_llava"), reason="no tiny LLaVA fixture")
@given(data=st.data())
def test_lvlm_composed_lists(data):
    batch = data.draw(llava_batch(), label="batch")
    configs = data.draw(composed(("visual", "visual", "text"), LVLM_TARGETS), label="configs")
    run_lvlm_example(configs, batch, data.draw(st.booleans(), label="renumber"))


# ---- encoders ---------------------------------------------------------------------------
ENCODER_SEGMENTS = ("visual",)


def run_encoder_example(kind, configs, batch, seed):
    model, forward = encoder_model(kind)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    hooks, before = hook_count(model), params_of(model)
    with torch.no_grad():
        dense = forward(x)
    pruners = build(configs)
    if pruners is None:
        return
    try:
        handle = tp.prune(model, pruners)
    except tp.TokenPruneError as e:
        event(f"refused by prune(): {str(e)[:60]}")
        return refused_cleanly(model, hooks, before)
    try:
        with torch.no_grad():
            out = forward(x)
            stats = handle.stats
            alone = torch.cat([forward(x[i : i + 1]) for i in range(batch)])
    except tp.TokenPruneError as e:
        event(f"refused in the forward: {str(e)[:60]}")
        out = None
    finally:
        handle.remove()
    refused_cleanly(model, hooks, before)
    with torch.no_grad():
        assert torch.equal(forward(x), dense), "remove() must restore bit for bit"
    if out is None:
        return
    assert out.shape == dense.shape and torch.isfinite(out).all()
    dense_tokens = stats.dense_tokens
    assert len(set(dense_tokens)) == 1 and len(dense_tokens) == batch
    check_stats(stats, dense_tokens, NUM_LAYERS)
    event("ran: reduced nothing" if pruned_nothing(stats, dense_tokens) else "ran: reduced tokens")
    if pruned_nothing(stats, dense_tokens):
        assert torch.equal(out, dense), "a call that reduced nothing must be the dense model exactly"
    assert torch.allclose(alone, out, atol=1e-4, rtol=1e-4), "a batch must equal each image alone"


@pytest.mark.parametrize("name", METHODS)
@given(data=st.data())
def test_encoder_random_configs(name, data):
    kind = data.draw(st.sampled_from(ENCODERS), label="kind")
    configs = [data.draw(pruner_config(name, ENCODER_SEGMENTS), label="config")]
    run_encoder_example(kind, configs, data.draw(st.integers(1, 3), label="batch"),
                        data.draw(st.integers(0, 2**16), label="seed"))


@given(data=st.data())
def test_encoder_composed_lists(data):
    kind = data.draw(st.sampled_from(ENCODERS), label="kind")
    configs = data.draw(composed(ENCODER_SEGMENTS), label="configs")
    run_encoder_example(kind, configs, data.draw(st.integers(1, 3), label="batch"),
                        data.draw(st.integers(0, 2**16), label="seed"))
