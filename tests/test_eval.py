"""The evaluation harness: metrics on known inputs, and one small end-to-end grid run.

Quality numbers here come from random-weight models: they only test the plumbing.
"""
import csv
import json
import math
import time

import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.evals.metrics import (
    DenseDecoderCounter, Meter, TensorMemoryTracker, count_flops, frechet_distance, latency, mean_cosine,
    top1_agreement,
)
from tokenprune.evals.runner import MethodSpec, budget_field, method_config, run_grid
from tokenprune.evals.tasks import EvalOutput, PerplexityTask, Task, score_continuation, seeded_subset
from tokenprune.stats import decoder_layer_flops

from .conftest import tiny_decoder


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: one thread is as fast, and far steadier on a busy shared CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- fidelity metrics ----------------------------------------------------------------------
def test_top1_agreement():
    assert top1_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5
    assert top1_agreement(["red", "yes", "no"], ["red", "no", "no"]) == pytest.approx(2 / 3)
    assert top1_agreement(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 5]])) == 0.75
    with pytest.raises(ValueError):
        top1_agreement(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))


def test_mean_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[5.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])  # same direction, orthogonal, opposite
    assert mean_cosine(a, b) == pytest.approx((1 + 0 - 1) / 3)
    assert mean_cosine(a, 7 * a) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_cosine(a, b[:2])


def test_frechet_distance_known_gaussians():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 1))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # N(0, 1) vs N(3, 4): (0 - 3)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 10
    assert frechet_distance(x, 3 + 2 * rng.standard_normal((20000, 1))) == pytest.approx(10.0, rel=0.03)
    y = rng.standard_normal((20000, 3))
    assert frechet_distance(y, y + np.array([1.0, 2.0, 2.0])) == pytest.approx(9.0, rel=1e-6)  # pure shift
    with pytest.raises(ValueError):
        frechet_distance(y, rng.standard_normal((10, 4)))


# ---- efficiency metrics --------------------------------------------------------------------
def test_flop_counter_counts_cpu_sdpa_like_the_analytic_formula():
    # the stock FlopCounterMode counts 0 for the CPU SDPA kernel; ours matches eager and the formula
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 8)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    eager = lambda: ((q @ k.transpose(-1, -2)).softmax(-1)) @ v  # noqa: E731
    assert count_flops(sdpa) == count_flops(eager) == 2 * 2 * 4 * 10 * 7 * 16 + 2 * 2 * 4 * 10 * 7 * 8

    model = tiny_decoder("llama-sdpa")
    layer, x = model.model.layers[1], torch.randn(1, 20, 64)
    rope = model.model.rotary_emb(x, torch.arange(20)[None])
    with torch.no_grad():
        n = count_flops(lambda: layer(x, attention_mask=None, position_embeddings=rope))
    assert n == decoder_layer_flops(model.config, 20, 20)


def test_flop_counter_counts_the_multihead_attention_fast_path():
    # nn.MultiheadAttention (open_clip towers) runs one fused op in eval: counted like its slow path
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        fast = count_flops(lambda: mha(x, x, x, need_weights=False))
        slow = count_flops(lambda: mha(x, x, x, need_weights=False, attn_mask=torch.zeros(9, 9)))
    assert fast == slow == 2 * 2 * 9 * 32 * 32 * 4 + 4 * 2 * 9 * 9 * 32


def test_tensor_memory_tracker_counts_live_new_tensors_only():
    weight = torch.ones(1000)  # exists before: never counted
    with TensorMemoryTracker() as m:
        a = weight * 2  # 4000 B
        weight.add_(1)  # in place on an old storage: 0 B
        b = a + 1  # 8000 B live
        view = b.view(10, 100)  # a view: 0 B
        del a
        c = torch.zeros(3000)  # 4000 + 12000 = 16000 B live (peak)
        del b, view, c
        d = torch.zeros(10)  # 40 B
    assert m.peak == 16000
    assert m.current == 40
    del d
    assert m.current == 0


def test_latency_median_and_call_count():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.02)

    out = latency(fn, repeats=3, warmup=2)
    assert len(calls) == 5 and len(out["times_s"]) == 3
    assert 0.02 <= out["min_s"] <= out["median_s"] < 1.0


def test_dense_counter_matches_adapter_dense_accounting_with_kv_cache():
    # generate = prefill + decode steps with a KV cache: the dense counter, run on the bare model,
    # must give exactly what the adapter reports as dense_flops / dense_kv_bytes for the same request
    model = tiny_decoder("llama-sdpa")
    ids = torch.randint(2, 128, (2, 18), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        counter = DenseDecoderCounter(model)
        with counter.counting():
            model.generate(ids, **gen)
        with tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)) as h:
            model.generate(ids, **gen)
            stats = h.stats
    assert counter.flops == stats.dense_flops > stats.flops
    assert counter.kv_bytes == stats.dense_kv_bytes > stats.kv_bytes


def test_meter_accumulates_every_call():
    model = tiny_decoder("llama-sdpa")
    ids = torch.randint(2, 128, (1, 20))
    meter = Meter(model, None, analytic=True)
    with torch.no_grad():
        for _ in range(3):
            with meter.call():
                model(ids, use_cache=False)
    assert meter.calls == 3
    assert meter.flops == 3 * 4 * decoder_layer_flops(model.config, 20, 20)
    assert meter.flops_counted > meter.flops  # the counter also sees the LM head


# ---- tasks and runner pieces ---------------------------------------------------------------
def test_score_continuation_matches_text_perplexity():
    from tokenprune.evals.text import continuation_perplexity

    model = tiny_decoder("llama-sdpa")
    ids = torch.randint(2, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    nll, n, pred, last = score_continuation(model, ids, context=22)
    assert n == 8 and pred.shape == (1, 9) and last.shape == (1, 128)
    assert math.exp(nll / n) == pytest.approx(continuation_perplexity(model, ids, context=22), rel=1e-5)


def test_seeded_subset_is_fixed_and_nested():
    assert seeded_subset(100, 10, 0) == seeded_subset(100, 10, 0)
    assert seeded_subset(100, 5, 0) == seeded_subset(100, 10, 0)[:5]
    assert seeded_subset(100, 10, 0) != seeded_subset(100, 10, 1)


def test_method_specs_and_budget_mapping():
    spec = MethodSpec.parse("fastv:layer=3,segment=visual,protect_last=8")
    assert spec.name == "fastv" and spec.overrides == {"layer": 3, "segment": "visual", "protect_last": 8}
    assert spec.label == "fastv(layer=3,segment=visual,protect_last=8)"
    assert budget_field("fastv") == budget_field("random") == "keep_ratio"
    task = PerplexityTask("t", model=tiny_decoder("llama-sdpa"), token_ids=torch.zeros(2, 30, dtype=torch.long),
                          context=20)
    task.setup()  # 20 context + 10 scored tokens
    assert method_config(task, MethodSpec.parse("random:seed=4"), 0.25) == {"layer": 1, "seed": 4, "keep_ratio": 0.25}
    # skip methods take sparsity, the share skipped: budget 0.7 (kept) -> sparsity 0.3 of the pass
    assert method_config(task, MethodSpec.parse("ftp:checkpoint=null,route_generated=true"), 0.7) == {
        "checkpoint": None, "route_generated": True, "sparsity": 0.3}
    assert method_config(task, MethodSpec.parse("shortgpt"), 0.8)["sparsity"] == 0.2
    # ... which a method sparing the scored tokens spends on the context alone: 0.3 x 30 / 20
    assert method_config(task, MethodSpec.parse("ftp:checkpoint=null"), 0.7)["sparsity"] == 0.45
    assert method_config(task, MethodSpec.parse("skip-rank"), 0.8)["sparsity"] == 0.3
    assert method_config(task, MethodSpec.parse("skip-rank"), 0.2)["sparsity"] == 1.0  # at most all of it
    # APTP's router sets its own widths: the budget is recorded in the row, not put in the config
    assert method_config(task, MethodSpec.parse("aptp:code=1"), 0.5) == {"code": 1}
    with pytest.raises(tp.TokenPruneError):
        MethodSpec.parse("fastv:layer")
    with pytest.raises(tp.TokenPruneError):
        budget_field("no-such-method")


class LinearTask(Task):
    """A model no adapter supports: the grid must record 'skipped', not crash."""

    task, metric = "toy", "mean"

    def setup(self):
        torch.manual_seed(0)
        self.model, self.x = torch.nn.Linear(4, 3), torch.randn(5, 4)

    def evaluate(self, meter, handle=None):
        with meter.call(), torch.no_grad():
            y = self.model(self.x)
        return EvalOutput(quality=float(y.mean()), predictions=y.argmax(-1), features=y, n_items=5)

    def probe(self, handle=None):
        return lambda: self.model(self.x)


# ---- end to end ------------------------------------------------------------------------------
def test_grid_end_to_end_on_a_tiny_llama(tmp_path):
    model = tiny_decoder("llama-sdpa")
    ids = torch.randint(2, 128, (5, 40), generator=torch.Generator().manual_seed(0))
    task = PerplexityTask("tiny-llama", model=model, token_ids=ids, context=32, limit=3, batch_size=2,
                          progress=False)
    rows = run_grid([task, LinearTask("linear", progress=False)], methods=["fastv", "random"], budgets=[1.0, 0.5],
                    out=str(tmp_path), repeats=1, progress=False, log=lambda msg: None)

    for name in ("results.json", "results.csv", "accuracy_vs_flops.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows) == 2 * (1 + 2 * 2)
    assert saved["meta"]["methods"] == ["fastv", "random"] and saved["meta"]["tasks"][0]["limit"] == 3
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)

    llama = {(r["method"], r["budget"]): r for r in rows if r["model"] == "tiny-llama"}
    dense = llama[("dense", None)]
    assert dense["status"] == "ok" and dense["n_items"] == 3 and dense["calls"] == 2
    assert dense["agreement"] == 1.0 and dense["cosine"] == pytest.approx(1.0)
    assert dense["flops_rel"] == 1.0 and dense["flops_source"] == "analytic-decoder"
    assert dense["flops"] == 3 * 4 * decoder_layer_flops(model.config, 40, 40)
    assert dense["latency_s"] > 0 and dense["peak_mem_bytes"] > 0
    for method in ("fastv", "random"):
        keep_all, pruned = llama[(method, 1.0)], llama[(method, 0.5)]
        # keep-everything is the dense model exactly (the engine's contract), at the dense cost
        assert keep_all["quality"] == dense["quality"] and keep_all["agreement"] == 1.0
        assert keep_all["flops"] == dense["flops"]
        # a real budget costs less, and the adapter's own dense count agrees with the dense row
        assert pruned["status"] == "ok" and pruned["flops"] < dense["flops"] and pruned["flops_rel"] < 1.0
        assert pruned["flops_counted"] < dense["flops_counted"] and pruned["kv_rel"] < 1.0
        assert pruned["adapter_dense_flops"] == dense["flops"]
        assert pruned["agreement"] < 1.0 and pruned["config"]["keep_ratio"] == 0.5 and pruned["config"]["layer"] == 1
        # latency relative to a dense time measured interleaved with it, not to the dense row's
        assert pruned["latency_dense_s"] > 0
        assert pruned["latency_rel"] == pytest.approx(pruned["latency_s"] / pruned["latency_dense_s"])
    # random drops tokens anywhere: its output drifts from dense, but stays correlated
    assert 0.0 < llama[("random", 0.5)]["cosine"] < 1.0

    linear = [r for r in rows if r["model"] == "linear"]
    assert linear[0]["status"] == "ok" and linear[0]["flops_source"] == "flop_counter"
    assert linear[0]["flops"] == 2 * 5 * 4 * 3  # one (5x4) @ (4x3) matmul
    assert all(r["status"] == "skipped" and "no tokenprune adapter" in r["reason"] for r in linear[1:])


def test_unavailable_model_is_reported_not_raised(tmp_path, monkeypatch):
    from tokenprune.evals import tasks

    monkeypatch.setattr(tasks, "zoo_names", lambda: ["smollm2-135m"])
    rows = run_grid(["tiny-t2i"], methods=["fastv"], budgets=[0.5], out=str(tmp_path), progress=False,
                    log=lambda msg: None)
    assert [r["status"] for r in rows] == ["unavailable"]
    assert "tiny-t2i" in rows[0]["reason"] and "tp.zoo.names()" in rows[0]["reason"]
    assert (tmp_path / "results.json").exists() and not (tmp_path / "accuracy_vs_flops.png").exists()


def test_cli_help_and_list(capsys):
    from tokenprune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("smollm2-135m", "keep_ratio", "accuracy_vs_flops.png", "--limit", "--device", "skipped"):
        assert word in text
    assert main(["eval", "--list"]) == 0
    assert "fastv" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--model", "no-such-model"])


def test_image_classification_task_plumbing(tmp_path):
    # random-weight ViT: checks the task, the flop_counter path and the vision attach path only
    transformers = pytest.importorskip("transformers")
    from tokenprune.evals.tasks import ClassificationTask

    from .conftest import tiny_encoder

    model, _ = tiny_encoder("vit-sdpa")
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12)
    task = ClassificationTask("rand-vit", model=model, processor=proc, images=images, labels=labels, limit=12,
                              batch_size=6, progress=False)
    rows = run_grid([task], methods=["random"], budgets=[0.5], out=str(tmp_path), repeats=1, progress=False,
                    log=lambda msg: None)
    dense, pruned = rows
    assert dense["status"] == "ok" and dense["n_items"] == 12 and dense["flops_source"] == "flop_counter"
    assert dense["flops"] == dense["flops_counted"] > 0 and dense["agreement"] == 1.0
    assert pruned["status"] in ("ok", "skipped"), pruned["reason"]  # "ok" once a ViT adapter is registered
    if pruned["status"] == "ok":
        assert pruned["config"]["segment"] == "visual" and pruned["flops"] < dense["flops"]
