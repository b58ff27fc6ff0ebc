"""VFlowOpt's parts: the patch-entropy term, spatial recycling as a Merge, the calibrated configs
and the calibration study (its contract runs in tests/test_lvlm.py and tests/test_contract.py)."""
import json
import os

import pytest
import torch

import tokenprune as tp
from tokenprune.calibrate import evaluate, calibration_inputs, last_hidden, schedules, solve_ratios
from tokenprune.methods.vflowopt import ZOO_WEIGHTS, patch_entropy, recycle


# ---- the entropy term --------------------------------------------------------------------------
def patches(values):
    """(1, n, 3, 2, 2) RGB patches from n lists of 4 gray levels (0..255)."""
    x = torch.tensor(values, dtype=torch.float32).view(1, len(values), 1, 2, 2)
    return x.expand(1, len(values), 3, 2, 2).clone()


def test_patch_entropy_counts_gray_levels_in_bits():
    x = patches([[0, 0, 0, 0], [0, 0, 255, 255], [0, 85, 170, 255], [10, 10, 10, 200]])
    ent = patch_entropy(x, torch.ones(1, 4, dtype=torch.bool))
    expected = torch.tensor([0.0, 1.0, 2.0, -(0.75 * torch.tensor(0.75).log2() + 0.25 * torch.tensor(0.25).log2())])
    assert torch.allclose(ent[0], expected, atol=1e-5)


def test_patch_entropy_undoes_any_per_channel_normalisation():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (2, 9, 3, 4, 4), generator=g).float()
    present = torch.ones(2, 9, dtype=torch.bool)
    present[1, 7:] = False  # not visual: entropy 0, and left out of the row's stretch
    mean, std = torch.tensor([0.48, 0.46, 0.41]), torch.tensor([0.27, 0.26, 0.28])
    normalised = (raw / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    a = patch_entropy(raw, present)
    b = patch_entropy(normalised, present)
    assert torch.allclose(a, b, atol=1e-5)
    assert (b[1, 7:] == 0).all() and (b[present] > 0).all()


# ---- recycling ------------------------------------------------------------------------------------
def grid_state(importance, side=4, attn_noise=None):
    """One row: [text, side*side visual tokens of image 0 on a side x side grid, text]; the last
    prompt token's attention to the visual tokens is ``importance`` (head-averaged)."""
    v = side * side
    n = v + 2
    imp = torch.as_tensor(importance, dtype=torch.float32)
    attn = torch.zeros(1, 2, n, n)
    attn[0, :, -1, 1:-1] = imp / imp.sum() * 0.9
    attn[0, :, -1, 0] = attn[0, :, -1, -1] = 0.05
    segments = torch.full((1, n), int(tp.Segment.TEXT))
    segments[0, 1:-1] = int(tp.Segment.VISUAL)
    cells = torch.arange(v)
    info = {"image": torch.cat([torch.tensor([-1]), torch.zeros(v, dtype=torch.long), torch.tensor([-1])])[None],
            "row": torch.cat([torch.tensor([-1]), cells // side, torch.tensor([-1])])[None],
            "col": torch.cat([torch.tensor([-1]), cells % side, torch.tensor([-1])])[None]}
    hidden = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(1))
    state = tp.TokenState(1, 4, hidden, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), segments,
                          token_info=info)
    state._attention = lambda q: attn if q is None else attn.gather(2, q[:, None, :, None].expand(1, 2, q.shape[1], n))
    return state


def test_recycling_merges_the_lowest_tokens_per_cell_into_their_best_member():
    g = torch.Generator().manual_seed(3)
    importance = torch.rand(16, generator=g) + 0.1
    state = grid_state(importance)
    pruner = tp.VFlowOpt(layer=1, keep_ratio=0.5, alpha=0.0, global_threshold=None, recycle_grid=2)
    red = pruner.select(state)
    assert isinstance(red, tp.Merge)
    visual = state.segments[0] == tp.Segment.VISUAL
    keep, dst = red.keep[0], red.dst[0]
    assert int((keep & visual).sum()) == 8, "recycled tokens count in the kept share, exactly"
    assert keep[~visual].all()
    cell = lambda s: (int(state.token_info["row"][0, s]) // 2, int(state.token_info["col"][0, s]) // 2)  # noqa: E731
    imp = torch.zeros(18)
    imp[1:-1] = importance
    reps = sorted({int(d) for d in dst if d >= 0})
    members = {r: [s for s in range(18) if dst[s] == r] + [r] for r in reps}
    low = [s for r in reps for s in members[r]] + [s for s in range(18) if visual[s] and not keep[s] and dst[s] < 0]
    for r, group in members.items():
        assert keep[r] and all(cell(s) == cell(r) for s in group)
        assert imp[r] == max(imp[s] for s in group), "the slot kept is the group's most important member"
    # the low set is the lowest tokens, the top ones are kept as they are
    top = [s for s in range(1, 17) if keep[s] and s not in reps]
    assert min(imp[s] for s in top) >= max(imp[s] for s in low)
    assert len(top) + len(reps) == 8
    # the recycled token is the importance-weighted mean of its group (weights: importance x size)
    out = red.combine(state)
    for r, group in members.items():
        w = torch.stack([red.weight[0, s] for s in group])
        expected = (w[:, None] * state.hidden[0, group]).sum(0) / w.sum()
        assert torch.allclose(out[0, r], expected, atol=1e-6)
        assert torch.allclose(red.weight[0, r] / red.weight[0, group[0]], imp[r] / imp[group[0]], rtol=1e-4)
    untouched = [s for s in range(18) if s not in reps]
    assert torch.equal(out[0, untouched], state.hidden[0, untouched])


@pytest.mark.parametrize("seed", range(6))
def test_recycle_keeps_exactly_the_count(seed):
    g = torch.Generator().manual_seed(seed)
    B, n = 3, 40
    importance = torch.rand(B, n, generator=g)
    candidates = torch.rand(B, n, generator=g) < 0.8
    cell = torch.randint(-1, 6, (B, n), generator=g)  # -1: a token without a cell (dropped, never merged)
    count = (candidates.sum(1) * torch.rand(B, generator=g)).long()
    keep, dst = recycle(importance, candidates, count, cell)
    assert torch.equal((keep & candidates).sum(1), torch.minimum(count, candidates.sum(1)))
    assert not (keep & ~candidates).any()
    for b in range(B):
        for s in (dst[b] >= 0).nonzero().squeeze(1).tolist():
            d = int(dst[b, s])
            assert keep[b, d] and not keep[b, s] and cell[b, s] == cell[b, d] >= 0


def test_recycle_with_fewer_slots_than_cells_keeps_the_best_groups():
    importance = torch.arange(8, dtype=torch.float32)[None]
    cell = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    keep, dst = recycle(importance, torch.ones(1, 8, dtype=torch.bool), torch.tensor([2]), cell)
    assert keep[0].tolist() == [False] * 6 + [True, True]  # the two best tokens, each recycling its cell
    assert dst[0].tolist() == [-1, -1, 6, 7, -1, -1, -1, -1]


# ---- config, calibrated configs --------------------------------------------------------------------
def test_default_prunes_about_three_quarters_and_round_trips():
    p = tp.build_pruner("vflowopt")
    share = 1.0
    for layer in p.layers():
        share *= p.stage_ratio(layer)
    assert share == pytest.approx(0.25)
    assert tp.build_pruner(**p.to_dict()) == p


@pytest.mark.parametrize("config,message", [
    (dict(layer=[2, 1]), "must be increasing"),
    (dict(layer=[1, 2], keep_ratio=[0.5]), "lists 1 values for 2 stage layers"),
    (dict(keep_ratio=[0.5, 1.5]), "keep_ratio must be a number in \\[0, 1\\]"),
    (dict(recycle_grid=-1), "recycle_grid must be a non-negative integer"),
    (dict(global_threshold=None, text_queries=0), "no attention queries"),
    (dict(calibrated="tiny-llava", budget=0.33), "no calibrated config.*shipped for 'tiny-llava': .*keep0.10.json"),
    (dict(calibrated="no-such-testbed", budget=0.1), "run `tokenprune calibrate vflowopt"),
])
def test_bad_configs_raise_the_library_error(config, message):
    with pytest.raises(tp.TokenPruneError, match=message):
        tp.build_pruner("vflowopt", **config)


SHIPPED = sorted(f for f in os.listdir(os.path.join(ZOO_WEIGHTS, "tiny-llava", "vflowopt"))
                 if f.startswith("keep") and not f.endswith(".study.json"))


@pytest.mark.parametrize("file", SHIPPED)
def test_shipped_configs_reproduce_their_study(file, tiny_llava_zoo):
    """Rerunning a shipped config on its calibration set gives the objective and share its record holds."""
    record = json.load(open(os.path.join(ZOO_WEIGHTS, "tiny-llava", "vflowopt", file.replace(".json", ".study.json"))))
    model, processor = tiny_llava_zoo
    inputs = calibration_inputs(processor, record["items"], seed=record["seed"], kinds=record.get("kinds", ["easy-vqa"]))
    got = evaluate(model, inputs, last_hidden(model, inputs), tp.build_pruner(**record["config"]))
    assert got["objective"] == pytest.approx(record["objective"], abs=1e-5)
    assert got["kept_share"] == record["kept_share"] <= record["budget"]
    assert record["objective"] >= record["first_trial_objective"]


@pytest.mark.parametrize("file", SHIPPED)
def test_shipped_configs_load_by_name_and_by_json(file):
    path = os.path.join(ZOO_WEIGHTS, "tiny-llava", "vflowopt", file)
    with open(path) as f:
        config = json.load(f)
    budget = float(file[len("keep"):-len(".json")])
    by_name = tp.build_pruner("vflowopt", calibrated="tiny-llava", budget=budget)
    by_json = tp.build_pruner(**config)
    for k in ("layer", "keep_ratio", "alpha", "global_threshold", "text_queries", "recycle_grid"):
        assert getattr(by_name, k) == getattr(by_json, k)
    assert by_name.budget == config["budget"] == budget
    assert tp.build_pruner(**by_name.to_dict()) == by_name
    # the eval harness sets keep_ratio to the budget: with calibrated, it selects the same file
    assert tp.build_pruner("vflowopt", calibrated="tiny-llava", keep_ratio=budget, layer=2).layer == by_json.layer
    assert tp.build_pruner("vflowopt", calibrated=path).keep_ratio == by_json.keep_ratio


@pytest.mark.parametrize("budget", [0.5, 0.1, 0.02])
def test_solved_ratios_spend_the_budget_exactly(budget):
    g = torch.Generator().manual_seed(0)
    for layers in schedules(6, budget):
        for _ in range(5):
            ratios = solve_ratios(layers, 6, budget, torch.rand(2, generator=g).tolist())
            assert all(0.0 <= r <= 1.0 for r in ratios)
            share, kept = 0.0, 1.0
            for layer in range(1, 6):
                if layer in layers:
                    kept *= ratios[layers.index(layer)]
                share += kept
            assert share / 5 == pytest.approx(budget, abs=1e-5), (layers, ratios)
            # in whole tokens (64 per image), as the pruner rounds: never above the budget
            ratios = solve_ratios(layers, 6, budget, torch.rand(2, generator=g).tolist(), tokens=64)
            count, spent = 64, 0
            for layer in range(1, 6):
                if layer in layers:
                    count = int(ratios[layers.index(layer)] * count + 0.5)
                spent += count
            assert spent <= budget * 5 * 64 + 1e-9 and spent > budget * 5 * 64 - 64, (layers, ratios)


# ---- the calibration study (tiny-llava, 4 train items, 2 trials) ----------------------------------
@pytest.fixture(scope="module")
def tiny_llava_zoo():
    return tp.zoo.load("tiny-llava")


def test_calibrate_command_writes_a_loadable_config_within_budget(tiny_llava_zoo, tmp_path):
    from tokenprune.cli import main

    out = tmp_path / "cfg.json"
    assert main(["calibrate", "vflowopt", "--model", "tiny-llava", "--budget", "0.25", "--out", str(out),
                 "--trials", "2", "--items", "4"]) == 0
    pruner = tp.build_pruner(**json.load(open(out)))
    record = json.load(open(tmp_path / "cfg.study.json"))
    assert record["trials"] == 2 and record["budget"] == 0.25 and record["config"] == json.load(open(out))
    model, processor = tiny_llava_zoo
    inputs = calibration_inputs(processor, 4, seed=0)
    got = evaluate(model, inputs, last_hidden(model, inputs), pruner)
    assert got["objective"] == pytest.approx(record["objective"], abs=1e-5), "the config reproduces its objective"
    assert got["kept_share"] <= 0.25 + 0.5 / 64
    assert got["flops_rel"] < 1.0


def test_calibration_set_is_easy_vqa_train(tiny_llava_zoo):
    from tokenprune.zoo import vqa_data

    _, processor = tiny_llava_zoo
    inputs = calibration_inputs(processor, 4, seed=0)
    train = vqa_data.easy_vqa_items("train", limit=4, seed=0)
    expected = processor(images=[im for im, _, _ in train], return_tensors="pt")["pixel_values"]
    assert torch.equal(inputs["pixel_values"], expected)
    kinds = ("easy-vqa", "position", "size")  # a mix: the derived questions' words are in the prompts
    mixed = calibration_inputs(processor, 24, seed=0, kinds=kinds)
    items = vqa_data.easy_vqa_items("train", limit=24, seed=0, kinds=kinds)
    assert {vqa_data.kind_of(q) for _, q, _ in items} == set(kinds)
    expected = processor(images=[im for im, _, _ in items], text=[vqa_data.build_prompt(q) for _, q, _ in items],
                         return_tensors="pt", padding=True)
    assert torch.equal(mixed["input_ids"], expected["input_ids"])


def test_calibrate_under_a_flops_budget(tiny_llava_zoo):
    from tokenprune.calibrate import calibrate

    model, processor = tiny_llava_zoo
    result = calibrate(model, processor, 0.5, kind="flops", trials=2, items=4, progress=False)
    assert result["kind"] == "flops" and 0.0 < result["token_budget"] < 1.0
    inputs = calibration_inputs(processor, 4, seed=0)
    got = evaluate(model, inputs, last_hidden(model, inputs), tp.build_pruner(**result["config"]))
    assert got["flops_rel"] <= 0.5 and got["flops_rel"] == pytest.approx(result["flops_rel"])


def test_calibrate_refuses_bad_budgets_before_loading_anything(capsys):
    from tokenprune.cli import main

    for budget in ("0", "1.0", "-0.2"):
        assert main(["calibrate", "vflowopt", "--model", "no-such-model", "--budget", budget, "--out", "x.json"]) == 2
        assert "budget must be a number in (0, 1)" in capsys.readouterr().err
    assert main(["calibrate", "vflowopt", "--model", "no-such-model", "--budget", "0.1", "--out", "x.json",
                 "--kinds", "colour"]) == 2
    assert "unknown --kinds ['colour']" in capsys.readouterr().err
