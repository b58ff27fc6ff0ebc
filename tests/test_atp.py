"""ATP-LLaVA: per-instance kept counts, checkpoints, soft (training) vs hard (inference) masks.

The contract (keep-all exact, cache, padding, leaks) runs in tests/test_lvlm.py (LVLM_CASES).
"""
import importlib.util
import json
import os

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.atp import ATPHead, SoftMasks

from .conftest import LLAVA_IMAGE_TOKEN, llava_inputs, tiny_llava
from .test_contract import hook_count, params_of


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    """A head with random (seeded) weights for the 4-layer test LLaVA: thresholds move per instance."""
    torch.manual_seed(0)
    head = ATPHead(hidden=16, num_layers=4)
    torch.nn.init.normal_(head.net[2].weight, std=0.1)
    path = tmp_path_factory.mktemp("atp") / "atp.safetensors"
    head.save(str(path))
    return str(path)


def visual_kept(stats, x, layer):
    """Visual tokens of each row entering ``layer`` (text and image counts from the inputs)."""
    visual = (x["input_ids"] == LLAVA_IMAGE_TOKEN).sum(1)
    dense = torch.tensor(stats.tokens_per_layer[0])
    return (torch.tensor(stats.tokens_per_layer[layer]) - (dense - visual)).tolist()


def test_kept_counts_differ_per_row_and_layer_and_rows_equal_alone(llava, head_file):
    x = llava_inputs(questions=(9, 5, 7, 3), images_per_prompt=2, seed=1)
    atp = tp.ATP(layer=[1, 3], keep_ratio=0.3, checkpoint=head_file)
    with torch.no_grad(), tp.pruning(llava, atp) as h:
        batch = llava(**x).logits
        stats = h.stats
        per_row = [visual_kept(stats, x, layer) for layer in (1, 3)]
        assert len(set(per_row[0])) > 1 and len(set(per_row[1])) > 1, per_row  # per instance
        assert all(a > b for a, b in zip(*per_row)), per_row  # per layer
        for b in range(4):
            keep = x["attention_mask"][b].bool()
            alone = llava(input_ids=x["input_ids"][b, keep][None], pixel_values=x["pixel_values"][2 * b:2 * b + 2]).logits
            assert visual_kept(h.stats, {"input_ids": x["input_ids"][b:b + 1]}, 3) == [per_row[1][b]]
            assert torch.allclose(batch[b, keep], alone[0], atol=1e-5)


def test_soft_masks_hard_mode_equals_pruning_and_soft_mode_trains_the_head(llava, head_file):
    x = llava_inputs()
    layers = llava.model.language_model.layers
    atp = tp.ATP(layer=2, keep_ratio=0.4, checkpoint=head_file)
    hooks = hook_count(llava)
    with torch.no_grad():
        with tp.pruning(llava, atp):
            pruned = llava(**x).logits
        with tp.pruning(llava, atp), SoftMasks([atp], layers, hard=True):
            hard = llava(**x).logits
        with tp.pruning(llava, atp), SoftMasks([atp], layers, tau=1e5):
            sharp = llava(**x).logits
        dense = llava(**x).logits
    last = x["attention_mask"].shape[1] - 1
    assert torch.allclose(hard[:, last], pruned[:, last], atol=1e-5)
    assert torch.allclose(sharp[:, last], pruned[:, last], atol=1e-4)  # tau -> inf: soft -> hard
    assert not torch.allclose(pruned[:, last], dense[:, last], atol=1e-3)
    # soft masks are differentiable in the head's parameters (the base model stays frozen)
    head = ATPHead(hidden=8, num_layers=4)
    torch.nn.init.normal_(head.net[2].weight, std=0.1)
    atp = tp.ATP(layer=[1, 2], keep_ratio=0.3, checkpoint=None)
    atp.head = head
    llava.requires_grad_(False)
    with tp.pruning(llava, atp), SoftMasks([atp], layers, tau=5.0) as soft:
        out = llava(**x).logits
        shares = torch.stack([s for s, _ in soft.shares])
        loss = out[:, -1].logsumexp(-1).mean() + soft.budget_loss()
    loss.backward()
    assert ((shares >= 0) & (shares <= 1)).all() and len(soft.shares) == 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert atp.soft is None and hook_count(llava) == hooks  # hooks gone, inference mode again
    assert all(p.grad is None for p in llava.parameters())


def test_checkpoints_load_by_name_or_path_and_mismatches_are_refused(llava, head_file, tmp_path):
    shipped = tp.build_pruner("atp")  # default: the head shipped for tiny-llava
    assert shipped.checkpoint == "tiny-llava" and shipped.head.num_layers == 6
    folder = os.path.dirname(head_file)  # a folder holding atp.safetensors works too
    assert torch.equal(tp.ATP(checkpoint=head_file).head.net[0].weight, tp.ATP(checkpoint=folder).head.net[0].weight)
    config = tp.ATP(layer=[1, 3], keep_ratio=0.2, checkpoint=head_file).to_dict()
    assert tp.build_pruner(**json.loads(json.dumps(config))).to_dict() == config
    x = llava_inputs()
    before, hooks = params_of(llava), hook_count(llava)
    with pytest.raises(tp.TokenPruneError, match="trained for a 6-layer decoder; this model has 4"):
        tp.prune(llava, tp.build_pruner("atp", checkpoint="tiny-llava"))
    with pytest.raises(tp.TokenPruneError, match="no checkpoint 'nope'"):
        tp.build_pruner("atp", checkpoint="nope")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(tp.TokenPruneError, match="cannot read checkpoint"):
        tp.ATP(checkpoint=str(bad))
    from safetensors.torch import save_file

    save_file({"net.0.weight": torch.zeros(4, 3)}, str(tmp_path / "other.safetensors"), metadata={"method": "atp", "features": "3"})
    with pytest.raises(tp.TokenPruneError, match="not an ATP module"):
        tp.ATP(checkpoint=str(tmp_path / "other.safetensors"))
    for config in (dict(layer=0), dict(layer=[2, 2]), dict(keep_ratio=1.5), dict(checkpoint=3)):
        with pytest.raises(tp.TokenPruneError):
            tp.ATP(**config)
    assert hook_count(llava) == hooks
    assert all(torch.equal(v, before[k]) for k, v in llava.state_dict().items())
    with torch.no_grad(), tp.pruning(llava, tp.ATP(layer=[1, 3], checkpoint=None, keep_ratio=0.0)) as h:
        llava(**x)
    assert visual_kept(h.stats, x, 3) == [0, 0]


@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="pip install easy-vqa")
def test_shipped_head_adapts_per_instance_on_tiny_llava():
    from tokenprune.zoo.vqa_data import build_prompt, easy_vqa_items

    model, processor = tp.zoo.load("tiny-llava")
    items = easy_vqa_items("test", limit=8, seed=0)
    x = processor(images=[i[0] for i in items], text=[build_prompt(i[1]) for i in items], return_tensors="pt",
                  padding=True)
    visual = (x["input_ids"] == model.config.image_token_id).sum(1)
    with torch.no_grad(), tp.pruning(model, tp.ATP(layer=[2, 4], keep_ratio=0.25)) as h:
        model(**x)
    dense = torch.tensor(h.stats.tokens_per_layer[0])
    kept = [(torch.tensor(h.stats.tokens_per_layer[layer]) - (dense - visual)) for layer in (2, 4)]
    assert len(set(kept[1].tolist())) > 1, kept
    assert (kept[0] > kept[1]).all() and (kept[1] > 0).all()
