"""FTP: the learned token router (tokenprune/methods/ftp.py), its training script and shipped files."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.ftp import Router, uniform_schedule

from .conftest import tiny_decoder
from .test_contract import assert_untouched, greedy, hook_count, params_of, prompt, recompute_step_logits

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tokenprune" / "zoo" / "weights" / "smollm2-135m" / "ftp"
sys.path.insert(0, str(REPO / "evals" / "train"))


def router_file(folder, num_layers=4, hidden_size=64, seed=0, heads=None):
    """A random router checkpoint for a model of this shape (its logits straddle 0, so both decisions occur)."""
    torch.manual_seed(seed)
    path = os.path.join(folder, "ftp.safetensors")
    Router(8, num_layers=num_layers, hidden_size=hidden_size, heads=heads).save(path)
    return path


def position_router_file(folder, middle: int):
    """A hand-set router for the 4-layer test models: tokens after position ``middle`` skip (the
    attention share nudges it a little), so generated tokens route both ways."""
    from tokenprune.methods.ftp import POSITION_SCALE

    router = Router(8, num_layers=4, hidden_size=64)
    with torch.no_grad():
        for lin in router.net[::2]:
            lin.weight.zero_()
            lin.bias.zero_()
        router.net[0].weight[0, 0], router.net[0].weight[0, 1], router.net[0].bias[0] = 1.0, 0.01, 1.0
        router.net[2].weight[0, 0] = 1.0
        router.net[4].weight[0, 0] = -100.0
        pos = torch.tensor([[torch.log1p(torch.tensor(middle + 0.5)) / POSITION_SCALE, 0.0, 0.5, 0.4]])
        router.net[4].bias[0] = -router(pos)[0]
    path = os.path.join(folder, "position.safetensors")
    router.save(path)
    return path


def skipped_share(stats, num_layers):
    """Share of the row's token-block computations skipped, from the per-block kept counts."""
    n = stats.dense_tokens[0]
    return sum(n - row[0] for row in stats.tokens_per_layer) / (n * num_layers)


def test_loads_the_shipped_router_by_name():
    ftp = tp.build_pruner("ftp", sparsity=0.3)
    assert ftp.checkpoint == "smollm2-135m" and ftp.router.num_layers == 30 and ftp.router.hidden_size == 576
    assert os.path.getsize(SHIPPED / "ftp.safetensors") < 20_000  # a few thousand parameters
    assert tp.build_pruner(**ftp.to_dict()).router is ftp.router  # round-trips, loaded once
    # the searched schedules ship as configs: for the default (the prompt's share the eval runs it at
    # for 0.2 / 0.3 / 0.4 of its pass) and for every token routed
    for budget, every in [("0.25", False), ("0.375", False), ("0.5", False), ("0.2", True), ("0.3", True), ("0.4", True)]:
        config = json.loads((SHIPPED / f"ftp-{budget}.json").read_text())
        p = tp.build_pruner(**config)
        assert p.sparsity == float(budget) and len(p.schedule) == 30 and p.schedule[0] == 0.0
        assert p.route_generated == every
        assert abs(sum(p.schedule) / 30 - float(budget)) < 1e-3
        assert tp.build_pruner("ftp", sparsity=float(budget), schedule="searched").schedule == p.schedule


def test_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    model, ids = tiny_decoder("llama-sdpa"), prompt()
    before, hooks = params_of(model), hook_count(model)
    with torch.no_grad():
        dense = model(ids).logits
    with pytest.raises(tp.TokenPruneError, match="trained for a 30-layer decoder; this model has 4"):
        tp.prune(model, tp.build_pruner("ftp"))  # the shipped SmolLM2 router
    wide = router_file(tmp_path, num_layers=4, hidden_size=576)
    with pytest.raises(tp.TokenPruneError, match="trained for hidden size 576; this model has 64"):
        with torch.no_grad(), tp.pruning(model, tp.build_pruner("ftp", checkpoint=wide)):
            model(ids)
    with pytest.raises(tp.TokenPruneError, match="schedule lists 3 blocks; this model has 4"):
        tp.prune(model, tp.build_pruner("ftp", sparsity=0.2, schedule=[0, 0.3, 0.3], checkpoint=None))
    with pytest.raises(tp.TokenPruneError, match="no checkpoint"):
        tp.build_pruner("ftp", checkpoint=str(tmp_path / "missing"))
    with pytest.raises(tp.TokenPruneError, match="mean sparsity is 0.150"):
        tp.build_pruner("ftp", sparsity=0.3, schedule=[0, 0.3, 0.3, 0.0], checkpoint=None)
    assert_untouched(model, before, hooks, ids, dense)


@pytest.mark.parametrize("sparsity", [0.2, 0.4])
def test_realised_sparsity_matches_the_config(tmp_path, sparsity):
    model, ids = tiny_decoder("llama-sdpa"), prompt(64, batch=2)
    for ckpt in (router_file(tmp_path), None):
        with torch.no_grad(), tp.pruning(model, tp.build_pruner("ftp", sparsity=sparsity, checkpoint=ckpt)) as h:
            model(ids)
        # the prompt's tokens: round(s_i * n) skip each block (block 0 never): the share is the target
        assert abs(skipped_share(h.stats, 4) - sparsity) <= 2 / 64
        counts = [row[0] for row in h.stats.tokens_per_layer]
        per_block = round(uniform_schedule(sparsity, 4)[1] * 64)
        assert counts == [64] + [64 - per_block] * 3


def test_sparsity_zero_is_dense_exactly(tmp_path):
    model, ids = tiny_decoder("qwen2"), prompt()
    with torch.no_grad():
        dense, dense_seq = model(ids).logits, greedy(model, ids)[0]
        with tp.pruning(model, tp.build_pruner("ftp", sparsity=0.0, checkpoint=router_file(tmp_path))):
            assert torch.equal(model(ids).logits, dense)
            assert torch.equal(greedy(model, ids)[0], dense_seq)


def test_first_token_never_skips_and_generated_tokens_route_like_a_recompute(tmp_path):
    model, ids = tiny_decoder("llama-sdpa"), prompt(32)
    ftp = tp.build_pruner("ftp", sparsity=0.4, checkpoint=position_router_file(tmp_path, middle=34),
                          route_generated=True)
    assert ftp.routes_decode and not ftp.spares_generated
    with torch.no_grad(), tp.pruning(model, ftp) as h:
        model(ids)
        assert all(0 in h.stats.kept[i][0] for i in h.stats.kept)
        seq, logits = greedy(model, ids, n=6)
        decoded = h.stats
        again = recompute_step_logits(model, h, seq, ids.shape[1])
        seg = torch.full(seq.shape, int(tp.Segment.TEXT))
        seg[:, 32:] = int(tp.Segment.GENERATED)
        with h.segments(seg):
            model(seq)
    assert torch.allclose(logits, again, atol=1e-4, rtol=1e-4)
    # generated tokens 32..34 run every block, 35.. skip blocks 1-3: at decode as in the recompute
    assert [row[0] for row in h.stats.tokens_per_layer] == [38] + [32 - 17 + 3] * 3
    assert decoded.flops < decoded.dense_flops


def test_by_default_tokens_whose_prediction_is_read_run_every_block(tmp_path):
    """The default (``route_generated=False``): the prompt's last token and generated tokens run every
    block, the prompt's other tokens skip the whole share; decode steps are not routed, and cached
    generate equals the recompute. Batched rows with left padding equal each row alone."""
    model = tiny_decoder("llama-sdpa")
    ftp = tp.build_pruner("ftp", sparsity=0.4, checkpoint=position_router_file(tmp_path, middle=34))
    assert not ftp.routes_decode and ftp.spares_generated
    ids = prompt(32)
    with torch.no_grad(), tp.pruning(model, ftp) as h:
        model(ids)
        prefill = h.stats
        seq, logits = greedy(model, ids, n=5)
        again = recompute_step_logits(model, h, seq, ids.shape[1])
    assert all(0 in k[0] and 31 in k[0] for k in prefill.kept.values())
    per_block = round(uniform_schedule(0.4, 4)[1] * 32)
    assert [row[0] for row in prefill.tokens_per_layer] == [32] + [32 - per_block] * 3
    assert torch.allclose(logits, again, atol=1e-4, rtol=1e-4)
    short = prompt(20, seed=3)
    pad = torch.zeros(1, 12, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), ids])
    mask = torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(ids)])
    with torch.no_grad(), tp.pruning(model, ftp):
        both = model(batch, attention_mask=mask).logits
        alone = [model(short).logits[0], model(ids).logits[0]]
    assert torch.allclose(both[0, 12:], alone[0], atol=1e-4) and torch.allclose(both[1], alone[1], atol=1e-4)


@pytest.mark.parametrize("heads", [None, (1, 2)])
def test_training_hooks_route_as_the_library(tmp_path, heads):
    """Hard routing through train_ftp.py's hooks (what training optimises) equals the library's Skip,
    with the sink share of every head or of a subset (heads 1 and 2 read different key heads)."""
    from train_ftp import SoftRouting

    model, ids = tiny_decoder("llama-sdpa"), prompt(40)
    ftp = tp.build_pruner("ftp", sparsity=0.3, checkpoint=router_file(tmp_path, heads=heads))
    assert ftp.router.heads == heads
    with torch.no_grad():
        with tp.pruning(model, ftp):
            library = model(ids).logits
        with SoftRouting(model, ftp.router, generated=0.0) as soft:
            soft.reset()
            soft.schedule = uniform_schedule(0.3, 4)
            hooks = model(ids).logits
        dense = model(ids).logits
    assert not torch.allclose(library, dense, atol=1e-2)
    assert torch.allclose(library, hooks, atol=1e-4), (library - hooks).abs().max()


def test_training_script_smoke(tmp_path, smollm2):
    """Two steps of evals/train/train_ftp.py on SmolLM2 into a temp dir (the shipped router is untouched)."""
    import train_ftp

    shipped = (SHIPPED / "ftp.safetensors").read_bytes()
    train_ftp.main(["--steps", "2", "--length", "48", "--threshold-blocks", "1", "--calib-blocks", "0",
                    "--eval-limit", "0", "--out", str(tmp_path)], loaded=smollm2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps_done"] == 2 and len(metrics["log"]) == 2
    assert set(metrics["split"]) == {"held", "train", "calibration"} and metrics["split"]["held"] > 0
    # each calibrated cut makes generated tokens skip about the share it is for
    for rule in ("router", "static"):
        assert all(abs(got - target) < 0.15 for target, got in metrics["threshold_realised"][rule]), metrics
    assert "FTP router for SmolLM2-135M" in (tmp_path / "README.md").read_text()
    p = tp.build_pruner("ftp", sparsity=0.3, checkpoint=str(tmp_path))
    assert p.router.num_layers == 30
    assert (SHIPPED / "ftp.safetensors").read_bytes() == shipped


@pytest.mark.parametrize("family", ["llama-sdpa", "qwen3"])
def test_attention_mass_of_some_heads_is_their_share_at_prefill_and_decode(family):
    """``state.attention_mass(..., heads=)`` (what FTP's feature reads) equals those heads of the
    all-head result, at prefill and at decode steps, with tokens skipping blocks (masked keys)."""
    from dataclasses import dataclass

    from .test_skip import HiddenRouter

    seen = []

    @dataclass
    class Spy(HiddenRouter):
        def select(self, state):
            # (some heads first: after a Skip it projects only their q columns for the skippers)
            some = state.attention_mass(state.row_offset, heads=(3, 0))  # GQA: key heads 1 and 0
            every = state.attention_mass(state.row_offset)
            assert some.shape[1] == 2 and torch.allclose(some, every[:, [3, 0]], atol=1e-6)
            if not state.decoding:  # some query rows only (the path that re-projects the skippers' head columns)
                rows = torch.arange(0, state.index.shape[1], 2).expand(state.index.shape[0], -1)
                some = state.attention_mass(state.row_offset, query_slots=rows, heads=(3, 0))
                every = state.attention_mass(state.row_offset, query_slots=rows)
                assert torch.allclose(some, every[:, [3, 0]], atol=1e-6)
            seen.append(state.decoding)
            return super().select(state)

    model = tiny_decoder(family)
    with torch.no_grad(), tp.pruning(model, Spy()):
        greedy(model, prompt(20, batch=2), n=3)
    assert False in seen and True in seen


def test_static_rule_skips_generated_tokens_by_its_calibrated_threshold(tmp_path):
    """``static=True`` routes generated tokens by minus their sink share against the checkpoint's
    static thresholds (none calibrated, or checkpoint=None: they never skip); the prompt part is
    the same top-k as ``checkpoint=None`` when the heads are all."""
    model, ids = tiny_decoder("llama-sdpa"), prompt(40)
    seg = torch.full(ids.shape, int(tp.Segment.TEXT))
    seg[:, 30:] = int(tp.Segment.GENERATED)
    path = router_file(tmp_path)
    router = tp.build_pruner("ftp", sparsity=0.3, checkpoint=path).router

    def kept(**config):
        ftp = tp.build_pruner("ftp", sparsity=0.3, route_generated=True, **config)
        with torch.no_grad(), tp.pruning(model, ftp) as h, h.segments(seg):
            model(ids)
        return {i: set(h.stats.kept[i][0]) for i in h.stats.kept}

    none = kept(checkpoint=None)
    assert all(set(range(30, 40)) <= k for k in none.values())  # generated tokens never skip
    assert kept(checkpoint=path, static=True) == none  # no static thresholds calibrated: the same
    router.static_thresholds = [(0.0, 1.0)]  # minus any share is below 1: every generated token skips
    try:
        everything = kept(checkpoint=path, static=True)
    finally:
        router.static_thresholds = []
    for i, k in everything.items():
        assert not (set(range(30, 40)) & k)  # every generated token skipped
        assert k == none[i] - set(range(30, 40))  # the prompt's choice is unchanged (causal)


def test_perplexity_task_reports_the_scored_tokens_skipped_share():
    """The eval's ``scored_skipped``: the share of the scored tokens' token-block computations that
    skipped, so rows that route generated tokens and rows that never do are compared at equal FLOPs."""
    from tokenprune.evals.metrics import Meter
    from tokenprune.evals.tasks import PerplexityTask

    model = tiny_decoder("llama-sdpa")
    ids = torch.randint(2, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    task = PerplexityTask("tiny", model=model, token_ids=ids, context=32, limit=2, progress=False)
    task.setup()

    def share(pruner):
        with torch.no_grad(), tp.pruning(model, pruner) as h:
            return task.evaluate(Meter(model, h, analytic=True, count=False), h).extra["scored_skipped"]

    assert share(tp.build_pruner("ftp", sparsity=0.4, checkpoint=None)) == 0.0  # generated tokens never skip
    assert share(tp.build_pruner("shortgpt", sparsity=0.5, scores=[1, 0.2, 0.5, 0.3])) == 0.5  # 2 of 4 blocks
    assert 0.2 < share(tp.build_pruner("skip-random", sparsity=0.4)) < 0.6
