"""Zero-TPrune as the paper defines it: I' -> S -> I, RMS over heads, fixed-bound head filter."""
import pytest
import torch
import transformers as T

import tokenprune as tp
from tokenprune.methods.zero_tprune import combine_heads, head_filter
from tokenprune.state import Segment, TokenState

from .conftest import VIT


def state_with(attn, keys):
    """A TokenState of CLS + patches whose previous block had attention ``attn`` and ``keys``."""
    B, H, n, _ = attn.shape
    segments = torch.full((B, n), int(Segment.VISUAL))
    segments[:, 0] = int(Segment.SYSTEM)
    st = TokenState(1, 4, torch.zeros(B, n, 4), torch.arange(n).expand(B, n), torch.ones(B, n, dtype=torch.bool), segments)
    st._attention = lambda query: attn
    st._keys = lambda: keys
    return st


# rows are queries: CLS, then patches 1..6. Patch 2 has patch 1's key (a duplicate) and votes for patch 6.
ATTENTION = torch.tensor([
    [0.10, 0.30, 0.10, 0.05, 0.20, 0.20, 0.05],
    [0.10, 0.40, 0.20, 0.05, 0.10, 0.10, 0.05],
    [0.05, 0.20, 0.10, 0.05, 0.05, 0.05, 0.50],
    [0.10, 0.30, 0.05, 0.10, 0.20, 0.20, 0.05],
    [0.10, 0.30, 0.10, 0.05, 0.30, 0.10, 0.05],
    [0.10, 0.30, 0.10, 0.05, 0.10, 0.30, 0.05],
    [0.10, 0.20, 0.10, 0.10, 0.20, 0.20, 0.10],
])[None, None]


def test_similarity_stage_runs_before_importance_recomputed_on_the_survivors():
    """I' ranks 1 > 4 = 5 > 2 > 6 > 3: A = {1, 4, 5}, B = {2, 6, 3}. S removes 2 (patch 1's
    duplicate). Without 2's vote patch 6 is the least important survivor, so I removes 6; ranking
    by the first pass would have removed 3."""
    keys = torch.eye(7)[None, None].clone()
    keys[0, 0, 2] = keys[0, 0, 1]
    st = state_with(ATTENTION, keys)
    config = dict(layer=1, keep_ratio=4 / 6, iterations=3, head_variance=())
    removed = lambda p: (~p.select(st).keep)[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert removed(tp.ZeroTPrune(**config)) == [2, 6]
    assert removed(tp.ZeroTPrune(**config, recompute=False)) == [2, 3]
    assert removed(tp.ZeroTPrune(**config, importance_share=1.0)) == [3, 6]  # I alone: the two lowest


def test_rms_over_heads_favours_a_token_one_head_finds_important():
    per_head = torch.tensor([[[0.6, 0.2, 0.2], [0.0, 0.5, 0.5]]])
    heads = torch.ones(1, 2, dtype=torch.bool)
    rms, mean = combine_heads(per_head, heads, "rms")[0], combine_heads(per_head, heads, "mean")[0]
    assert torch.allclose(rms, (per_head**2).mean(1).sqrt()[0]) and rms[0] > rms[1]
    assert mean[0] < mean[1]


def test_head_filter_with_four_heads_drops_flat_and_collapsed_heads():
    n = 64
    flat = torch.full((n,), 1 / n)
    collapsed = torch.zeros(n)
    collapsed[5] = 1.0
    g = torch.Generator().manual_seed(0)
    spread = [torch.rand(n, generator=g) ** 4 for _ in range(2)]
    per_head = torch.stack([flat, collapsed, *(s / s.sum() for s in spread)])[None]
    mask = torch.ones(1, n, dtype=torch.bool)
    assert head_filter(per_head, mask, 0.5, 32.0).tolist() == [[False, False, True, True]]
    assert head_filter(per_head[:, :2], mask, 0.5, 32.0).tolist() == [[True, True]]  # none qualifies: keep all


def test_iterations_follow_the_papers_early_middle_late_schedule():
    p = tp.ZeroTPrune(layer=3)
    assert [p.steps(layer, 12) for layer in range(1, 12)] == [30] * 4 + [5] * 4 + [1] * 3
    assert tp.ZeroTPrune(layer=3, iterations=7).steps(9, 12) == 7


@pytest.mark.parametrize("keep_ratio", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("share", [0.0, 0.2, 1.0])
def test_the_asked_count_is_reached_whatever_the_split(keep_ratio, share):
    torch.manual_seed(0)
    config = {k: v for k, v in VIT.items() if k != "num_labels"}
    model = T.ViTModel(T.ViTConfig(**config), add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tp.pruning(model, tp.ZeroTPrune(layer=2, keep_ratio=keep_ratio, importance_share=share)) as h:
        model(x)
    kept = int(64 * keep_ratio + 0.5)
    assert h.stats.tokens_per_layer[2] == [1 + kept] * 2


@pytest.mark.parametrize("config,message", [
    (dict(iterations=[30, 5]), "iterations must be an integer >= 1 or three of them"),
    (dict(iterations=0), "iterations must be an integer >= 1"),
    (dict(head_variance=[4.0, 1.0]), "head_variance must be \\(low, high\\)"),
    (dict(head_combine="max"), "head_combine must be 'rms' or 'mean'"),
    (dict(prefix_weight=-1), "prefix_weight must be a number >= 0"),
])
def test_bad_zero_tprune_configs(config, message):
    with pytest.raises(tp.TokenPruneError, match=message):
        tp.build_pruner("zero-tprune", **config)


def test_config_round_trips():
    p = tp.ZeroTPrune(layer=[2, 4], iterations=(50, 10, 1), head_variance=(0.2, 16.0))
    assert tp.build_pruner(**p.to_dict()) == p
    q = tp.ToMe(layer=[0, 1], r=[8, 4])
    assert tp.build_pruner(**q.to_dict()) == q


def test_pagerank_on_the_alive_tokens_is_pagerank_on_their_renormalised_graph():
    from tokenprune.methods.zero_tprune import weighted_pagerank

    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 9, 9, generator=g).softmax(-1)
    alive = torch.rand(2, 9, generator=g) > 0.3
    init = alive.float() / alive.float().sum(1, keepdim=True)
    sub = attn * alive[:, None, None, :]
    sub = sub / sub.sum(-1, keepdim=True)
    expected = weighted_pagerank(sub, init, 5) * alive[:, None, :]
    assert torch.allclose(weighted_pagerank(attn, init, 5, alive=alive), expected, atol=1e-6)
    assert torch.allclose(weighted_pagerank(attn, init, 5, chunk=9 * 9 * 3, alive=alive), expected, atol=1e-6)
