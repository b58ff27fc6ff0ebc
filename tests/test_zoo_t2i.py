"""The ``tiny-t2i`` zoo model (diffusers U-Net + MiniLM + DDIM) loads offline, samples images of
the right shape through its pipeline, and its judge is actually trained."""
import pytest
import torch

import tokenprune as tp
from tokenprune.zoo import t2i

pytestmark = pytest.mark.skipif(not (t2i.WEIGHTS_DIR / "unet").is_dir(), reason="tiny-t2i weights not trained")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny convolutions: one thread is as fast on an idle CPU and far faster on a shared one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_t2i(one_thread):
    return tp.zoo.load("tiny-t2i")


def test_registered():
    assert "tiny-t2i" in tp.zoo.names()


def test_pipeline_components(tiny_t2i):
    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    pipe, judge = tiny_t2i
    assert isinstance(pipe, DiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and not pipe.unet.training
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 384
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) >= 4
    # spatial tokens per transformer block: 16x16 and 8x8 attention resolutions
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                         with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            emb, mask = t2i.encode_text(pipe.text_encoder, pipe.tokenizer, ["a red circle"])
            out = pipe.unet(torch.zeros(1, 3, 32, 32), 500, encoder_hidden_states=emb, encoder_attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    assert out.sample.shape == (1, 3, 32, 32)
    assert max(seen) == 256 and 64 in seen


def test_sampling_shapes_and_determinism(tiny_t2i):
    pipe, _ = tiny_t2i
    prompts = ["a red circle", "a blue triangle"]
    out = pipe(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 and torch.isfinite(out).all()
    again = pipe(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(out, again)
    pil = pipe("a green rectangle", num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(1)).images
    assert len(pil) == 1 and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    arr = pipe(prompts, num_inference_steps=2, output_type="np").images
    assert arr.shape == (2, 32, 32, 3)


def test_judge_on_real_test_images(tiny_t2i):
    _, judge = tiny_t2i
    x, s, c = t2i.easy_vqa_32("test")
    assert x.shape == (1000, 3, 32, 32) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    _, ps, pc = t2i._judge_batches(judge, x)
    both = float(((ps == s) & (pc == c)).float().mean())
    assert both > 0.9  # chance is 1/24
    res = t2i.real_scores(t2i.eval_prompts(48), judge)
    assert res["n"] == 48 and res["faithfulness"] > 0.9 and res["frechet"] >= 0.0


def test_scores_on_a_few_samples(tiny_t2i):
    pipe, judge = tiny_t2i
    res = t2i.t2i_scores(pipe, t2i.eval_prompts(24), judge, num_inference_steps=8, guidance_scale=1.0)
    assert set(res) >= {"faithfulness", "shape_acc", "color_acc", "frechet", "n"} and res["n"] == 24
    assert 0.0 <= res["faithfulness"] <= 1.0 and res["frechet"] > 0.0
    assert res["color_acc"] > 0.5  # the trained model gets colors right even with 8 steps (chance 1/8)


def test_frechet_distance_basics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    assert abs(t2i.frechet_distance(a, a)) < 1e-6
    b = torch.randn(500, 8, generator=g) + 3.0
    assert t2i.frechet_distance(a, b) == pytest.approx(9 * 8, rel=0.1)
    assert t2i.parse_prompt("a teal triangle") == (t2i.COLORS.index("teal"), t2i.SHAPES.index("triangle"))
    with pytest.raises(ValueError):
        t2i.parse_prompt("a dog")
