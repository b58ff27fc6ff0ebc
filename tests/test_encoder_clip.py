"""HF CLIP vision towers (the tower LLaVA holds): hidden states LLaVA reads keep the dense length."""
from dataclasses import dataclass

import pytest
import torch
import transformers as T

import tokenprune as tp
from tokenprune.adapters.encoder import find_tower

from .conftest import VIT

CLIP = {k: v for k, v in VIT.items() if k != "num_labels"}


def tiny_clip_tower(seed=0):
    torch.manual_seed(seed)
    return T.CLIPVisionModel(T.CLIPVisionConfig(**CLIP, attn_implementation="sdpa")).eval()


def pixels(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@dataclass
class Spy(tp.RandomDrop):
    """RandomDrop that remembers which original tokens each reduction removed, and into what."""

    name = "test-spy"
    segment: str = "visual"
    protect_first: int = 0
    protect_last: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.seen = []

    def select(self, state):
        reduction = super().select(state)
        self.seen.append((state.layer, state.index.clone(), reduction.keep.clone()))
        return reduction


def test_find_tower_matches_a_bare_clip_vision_model_only():
    tower = tiny_clip_tower()
    found = find_tower(tower)
    assert found.kind == "clip" and found.root is tower and found.prefix == 1
    assert found.blocks is tower.encoder.layers
    text = T.CLIPTextModel(T.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2))
    assert find_tower(text) is None
    with pytest.raises(tp.UnsupportedModelError):
        tp.prune(text, tp.ZeroTPrune(layer=1))


@pytest.mark.parametrize("recorders_first", [False, True], ids=["recorders-installed-after", "recorders-installed-before"])
def test_recorded_hidden_states_have_the_dense_length(recorders_first):
    """Removed tokens carry their exit state in every later hidden state; kept ones their own."""
    tower, x = tiny_clip_tower(), pixels()
    if recorders_first:  # transformers installs its recording hooks on the first call that asks for them
        with torch.no_grad():
            tower(x, output_hidden_states=True)
    spy = Spy(layer=2, keep_ratio=0.5)
    with torch.no_grad():
        dense = tiny_clip_tower()(x, output_hidden_states=True)  # same weights, a separate module
        with tp.pruning(tower, spy):
            out = tower(x, output_hidden_states=True)
            selected = tower(x, output_hidden_states=-2)  # LLaVA-1.5's vision_feature_layer
    hs, N = out.hidden_states, dense.last_hidden_state.shape[1]
    assert len(hs) == len(dense.hidden_states) == 5 and all(h.shape == (2, N, 64) for h in hs)
    assert all(torch.equal(hs[i], dense.hidden_states[i]) for i in range(3))  # up to block 1's output
    (layer, index, keep), again = spy.seen  # one per call
    assert torch.equal(again[2], keep)
    assert layer == 2 and torch.equal(index, torch.arange(N).expand(2, N))
    gone = ~keep
    assert int(gone.sum()) == 2 * 32  # half of the 64 patches of each image
    for h in hs[3:]:
        assert torch.equal(h[gone], hs[2][gone]), "a removed token's hidden state is the one it left with"
        assert not torch.allclose(h[keep], hs[2][keep])
    assert torch.equal(out.last_hidden_state, hs[4])
    assert not torch.allclose(hs[3], dense.hidden_states[3])
    assert selected.hidden_states[3] is not None and torch.equal(selected.hidden_states[3], hs[3])


def test_merged_tokens_take_their_targets_hidden_states():
    tower, x = tiny_clip_tower(), pixels()
    dst_of = {}

    class Record(tp.ToMe):
        def select(self, state):
            merge = super().select(state)
            row, slot = (merge.dst >= 0).nonzero(as_tuple=True)
            for r, s in zip(row.tolist(), slot.tolist()):
                dst_of[(r, int(state.index[r, s]))] = int(state.index[r, merge.dst[r, s]])
            return merge

    with torch.no_grad(), tp.pruning(tower, Record(layer=2, keep_ratio=0.6)) as handle:
        hs = tower(x, output_hidden_states=True).hidden_states
    assert handle.stats.tokens_per_layer[3][0] < handle.stats.tokens_per_layer[1][0]
    assert len(dst_of) > 0
    for (row, src), dst in dst_of.items():
        assert torch.equal(hs[-1][row, src], hs[-1][row, dst]) and torch.equal(hs[-2][row, src], hs[-2][row, dst])


def test_llava_reads_dense_length_features_from_a_pruned_tower():
    torch.manual_seed(0)
    vision = T.CLIPVisionConfig(**CLIP, attn_implementation="sdpa")
    text = T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    llava = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=127,
                                                          vision_feature_layer=-2)).eval()
    tower = llava.model.vision_tower
    assert find_tower(tower).root is tower
    x = pixels()
    with torch.no_grad():
        dense = llava.model.get_image_features(x).pooler_output
        with tp.pruning(tower, tp.ZeroTPrune(layer=[1, 2], keep_ratio=0.5)) as handle:
            pruned = llava.model.get_image_features(x).pooler_output
            hidden = tower(x, output_hidden_states=True).hidden_states[-2]
    assert handle.stats.tokens_per_layer[2][0] < handle.stats.tokens_per_layer[0][0]
    assert [f.shape for f in pruned] == [f.shape for f in dense] == [(64, 32)] * 2
    assert not torch.allclose(torch.stack(pruned), torch.stack(dense))
    assert torch.allclose(torch.stack(pruned), llava.model.multi_modal_projector(hidden[:, 1:]), atol=1e-6)
