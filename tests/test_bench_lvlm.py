"""The LLaVA-shape benchmark (``python -m tokenprune.evals.bench lvlm``): a one-repeat run on tiny
shapes; its JSON fields and the counts behind them, never its times. Plus the LVLM decoder's
analytic FLOPs against ``flop_counter``."""
import json
import re

import pytest
import torch

import tokenprune as tp
from tokenprune.evals import bench
from tokenprune.evals.metrics import flop_counter
from tokenprune.stats import decoder_layer_flops, kv_bytes_per_token

from .conftest import llava_inputs, tiny_llava

TINY = {
    "vision": dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2),
    "text": dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
}
TEXT = 12


@pytest.fixture(scope="module")
def result():
    return bench.bench_lvlm(methods=["fastv", "random"], prunes=(0.75, 0.9), text=TEXT, repeats=1, shape=TINY)


def test_timing_rows_hold_each_method_at_each_budget(result):
    json.dumps(result)  # the CLI writes it as is
    visual = (56 // 14) ** 2
    assert (result["prompt_tokens"], result["visual_tokens"], result["text_tokens"]) == (visual + TEXT, visual, TEXT)
    dense, *rows = result["rows"]
    assert dense["method"] == "dense" and dense["visual_kept"] == visual
    assert [(r["method"], r["visual_pruned"]) for r in rows] == [
        ("fastv", 0.75), ("fastv", 0.9), ("random", 0.75), ("random", 0.9)]
    for r in rows:
        kept = visual - int(visual * r["visual_pruned"] + 0.5)
        # fastv / random default: every layer from 2 on runs on the kept tokens
        assert r["tokens_per_layer"] == [visual + TEXT] * 2 + [TEXT + kept] * 2
        assert r["visual_kept"] == kept and r["config"]["layer"] == 2 and r["config"]["segment"] == "visual"
        assert r["flops_ratio"] < 1 and r["kv_ratio"] < 1 and r["scoring_s"] >= 0
        for k in ("dense_s", "pruned_s", "ideal_s", "speedup", "ideal_speedup", "fraction_of_ideal",
                  "savings_fraction_of_ideal", "scoring_share_of_dense", "overhead_share_of_dense"):
            assert k in r
    # the ideal needs the dense decoder timed at every count a method left
    assert set(result["decoder_s"]) == {str(n) for r in rows for n in r["tokens_per_layer"]}


def test_llava_7b_accounting_is_consistent(result):
    acc = result["llava_7b"]
    cfg = bench.llava(bench.LLAVA_7B, device="meta").config.text_config
    per_token = kv_bytes_per_token(cfg, 2)
    assert per_token == 2 * 32 * 128 * 2  # K and V, 32 heads x 128 dims, fp16
    N, L = 576 + TEXT, 32
    assert (acc["prompt_tokens"], acc["visual_tokens"]) == (N, 576)
    dense, *rows = acc["rows"]
    assert dense["kv_bytes"] == L * N * per_token and dense["tokens_per_layer"] == [N] * L
    assert len(rows) == 4
    for r in rows + [dense]:
        # flop_counter on the meta 7B layers == the adapter's formula; cache shapes == the adapter's stats
        assert r["decoder_flops"] == r["decoder_flops_analytic"]
        assert r["cached_keys_per_layer"] == r["tokens_per_layer"]
        assert r["kv_bytes"] == sum(r["tokens_per_layer"]) * per_token
        assert r["ttft_flops"] == acc["tower_projector_flops"] + r["decoder_flops"] + acc["lm_head_flops"]
    for r in rows:
        assert r["kv_bytes_adapter"] == r["kv_bytes"]
        kept = TEXT + 576 - int(576 * r["visual_pruned"] + 0.5)
        assert r["kv_bytes"] == (2 * N + (L - 2) * kept) * per_token
        assert r["decoder_flops"] == 2 * decoder_layer_flops(cfg, N, N) + (L - 2) * decoder_layer_flops(cfg, kept, kept)
        assert r["kv_ratio"] == round(r["kv_bytes"] / dense["kv_bytes"], 4) < 1


def test_methods_that_cannot_meet_a_budget_are_listed_not_timed():
    model = bench.llava(TINY)
    inputs = bench.llava_prompt(model, TEXT)
    with pytest.raises(tp.TokenPruneError, match="cannot prune 90%"):  # ToMe merges at most half per layer
        bench.lvlm_pruner(model, "tome", 0.9, inputs, TEXT)
    with pytest.raises(tp.TokenPruneError, match="keep_ratio"):
        bench.lvlm_pruner(model, "tome-sd", 0.9, inputs, TEXT)


def test_lvlm_decoder_flops_match_flop_counter():
    """The adapter's analytic decoder FLOPs (pruned and dense) == flop_counter over the decoder
    layers of a tiny LLaVA, padded batch. Random drop: no scoring work inside the layers' hooks."""
    model, x = tiny_llava(), llava_inputs()
    pruner = tp.RandomDrop(layer=2, keep_ratio=0.5, segment="visual", protect_first=0, protect_last=0)
    with torch.no_grad():
        model(**x)  # transformers installs its output-capturing hooks on the first call
        with tp.pruning(model, pruner) as handle, flop_counter() as counter:
            model(**x)
        stats = handle.stats
        with flop_counter() as dense_counter:
            model(**x)
    layers = re.compile(r"language_model\.layers\.\d+$")

    def decoder(c):
        return sum(sum(ops.values()) for name, ops in c.get_flop_counts().items() if layers.search(name))

    assert stats.flops < stats.dense_flops
    assert decoder(counter) == stats.flops
    assert decoder(dense_counter) == stats.dense_flops
