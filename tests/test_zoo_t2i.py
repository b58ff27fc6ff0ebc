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


def test_prompt_kinds():
    assert t2i.all_prompts() == [t2i.caption(c, s) for c in t2i.COLORS for s in t2i.SHAPES]  # the old 24
    assert [len(t2i.all_prompts((k,))) for k in t2i.KINDS] == [24, 48, 96, 192]
    assert t2i.eval_prompts(48) == t2i.all_prompts() * 2
    assert t2i.caption("red", "circle", "small", "left") == "a small red circle on the left"
    assert t2i.parse_attributes("a large teal triangle at the bottom") == dict(
        color="teal", shape="triangle", size="large", position="bottom")
    assert t2i.parse_prompt("a small red circle on the left") == (0, 0)
    mixed = t2i.eval_prompts(192, t2i.KINDS)
    assert [t2i.prompt_kind(p) for p in mixed[:4]] == list(t2i.KINDS)
    for kind in t2i.KINDS:  # every kind: each color x shape equally often, attribute values spread evenly
        ps = [p for p in mixed if t2i.prompt_kind(p) == kind]
        assert len(ps) == 48 and len(set(ps)) == min(48, len(t2i.all_prompts((kind,))))
        pairs = [t2i.parse_prompt(p) for p in ps]
        assert all(pairs.count(q) == 2 for q in set(pairs)) and len(set(pairs)) == 24
        if kind != "color-shape":
            values = [tuple(t2i.parse_attributes(p)[k] for k in ("size", "position")) for p in ps]
            assert len(set(values)) == len(t2i._kind_attrs(kind))
            assert max(map(values.count, set(values))) - min(map(values.count, set(values))) <= 1
    with pytest.raises(ValueError):
        t2i.all_prompts(("huge",))
    with pytest.raises(ValueError):
        t2i.parse_attributes("a small large red circle")


def _drawn(boxes, size=32):
    """Pastel background with one filled red box (y0, y1, x0, x1) per image, in [0, 1]."""
    x = torch.empty(len(boxes), 3, size, size)
    x[:] = torch.tensor([0.9, 0.85, 0.95])[:, None, None]
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        x[i, :, y0:y1, x0:x1] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    return x


def test_object_size_and_side_from_pixels():
    lo, hi = t2i.size_thresholds()["rectangle"]
    assert 0 < lo < hi < 32 * 32
    small, large = int(lo ** 0.5) - 1, int(hi ** 0.5) + 1  # side lengths of a clearly small / large square
    boxes = [(2, 2 + small, 2, 2 + small), (30 - large, 30, 30 - large, 30), (10, 14, 16, 30)]
    images = _drawn(boxes)
    area, cx, cy = t2i.object_stats(images)
    assert area.tolist() == [small * small, large * large, 4 * 14]
    assert cx.tolist() == pytest.approx([2 + (small - 1) / 2, 30 - (large + 1) / 2, 22.5])
    assert cy.tolist() == pytest.approx([2 + (small - 1) / 2, 30 - (large + 1) / 2, 11.5])
    lab = t2i.attribute_labels(images, torch.tensor([1, 1, 1]))
    assert lab["size"].tolist()[:2] == [0, 1]
    assert lab["horizontal"].tolist() == [0, 1, 1] and lab["vertical"].tolist() == [0, 1, 0]
    prompts = ["a small red rectangle at the top", "a large red rectangle on the right", "a red rectangle on the left"]
    size_ok, size_asked, pos_ok, pos_asked = t2i.attributes_ok(images, prompts)
    assert size_ok.tolist() == [True, True, True] and size_asked.tolist() == [True, True, False]
    assert pos_ok.tolist() == [True, True, False] and pos_asked.all()
    wrong = t2i.attributes_ok(images, ["a large red rectangle", "a small red rectangle at the top", "a red rectangle"])
    assert wrong[0].tolist() == [False, False, True] and wrong[2].tolist() == [True, False, True]


def test_real_images_have_what_their_prompts_ask(tiny_t2i):
    _, judge = tiny_t2i
    res = t2i.real_scores(t2i.eval_prompts(96, t2i.KINDS), judge)
    assert res["size_acc"] > 0.95 and res["position_acc"] > 0.95 and res["faithfulness"] > 0.9
    assert set(res["kinds"]) == set(t2i.KINDS)


def test_eval_task_scores_every_prompt_kind(tiny_t2i, tmp_path):
    from tokenprune.evals.runner import run_grid
    from tokenprune.evals.tasks import T2ITask

    pipe, judge = tiny_t2i
    task = T2ITask(pipe=pipe, judge=judge, limit=8, kinds=t2i.KINDS, num_inference_steps=2, progress=False)
    rows = run_grid([task], methods=["tome-sd"], budgets=[0.5], out=str(tmp_path), repeats=0, memory=False,
                    progress=False, log=lambda msg: None)
    dense, merged = rows
    assert dense["status"] == merged["status"] == "ok", merged["reason"]
    assert [t2i.prompt_kind(p) for p in task.prompts[:4]] == list(t2i.KINDS)
    assert task.describe()["kinds"] == t2i.KINDS
    for row in rows:
        assert {f"faithfulness_{k}" for k in t2i.KINDS} <= set(row)
        assert row["size_acc"] is not None and row["position_acc"] is not None
        # overall faithfulness is the mean of the per-kind ones (two prompts of each kind)
        assert row["quality"] == pytest.approx(sum(row[f"faithfulness_{k}"] for k in t2i.KINDS) / 4)


def test_training_captions_are_true():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "evals" / "train" / "train_tiny_t2i.py"
    spec = importlib.util.spec_from_file_location("_train_tiny_t2i", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    lo, hi = t2i.size_thresholds()["rectangle"]
    small, large = int(lo ** 0.5) - 1, int(hi ** 0.5) + 1
    # a small box top-left, a large box bottom-right, a mid-sized box on the middle lines
    images = _drawn([(2, 2 + small, 2, 2 + small), (30 - large, 30, 30 - large, 30), (11, 21, 11, 21)]) * 2 - 1
    data = (images, torch.tensor([1, 1, 1]), torch.tensor([0, 0, 0]))
    prompts = t2i.all_prompts(t2i.KINDS) + [""]
    cap = train.Captioner(data, prompts, t2i.KINDS, seed=0)
    seen = {i: {prompts[cap(i, False)] for _ in range(200)} for i in range(3)}
    assert seen[2] == {"a red rectangle"}  # neither size nor side is clear: color and shape only
    assert seen[0] == {"a red rectangle", "a small red rectangle", "a red rectangle on the left",
                       "a red rectangle at the top", "a small red rectangle on the left",
                       "a small red rectangle at the top"}
    assert "a large red rectangle on the right" in seen[1] and not any("small" in p or "left" in p for p in seen[1])
    flipped = {prompts[cap(0, True)] for _ in range(200)}  # mirrored: the small box is on the right
    assert "a red rectangle on the right" in flipped and not any("left" in p for p in flipped)
    only = train.Captioner(data, t2i.all_prompts(("color-shape", "size")) + [""], ("color-shape", "size"), seed=0)
    assert {only.row_prompt(only(1, False)) for _ in range(50)} == {"a red rectangle", "a large red rectangle"}


def test_size_words_change_the_drawn_size(tiny_t2i):
    # the shipped model learned "small" / "large" (its card: size words obeyed ~90% of the time)
    pipe, _ = tiny_t2i
    pairs = [(c, s) for c in t2i.COLORS[:4] for s in t2i.SHAPES]
    areas = {}
    for size in t2i.SIZES:
        x = pipe([t2i.caption(c, s, size) for c, s in pairs], num_inference_steps=10,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
        areas[size] = t2i.object_stats(x)[0]
    assert float((areas["large"] > areas["small"]).float().mean()) >= 0.75  # same noise, only the word differs
