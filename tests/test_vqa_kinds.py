"""Derived easy-vqa question kinds (position, size): answers follow the object mask, the default
items are today's, test images stay out of training, and the tiny-llava vocabulary covers them."""
import importlib.util
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("easy_vqa")
from tokenprune.zoo import vqa_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _image(box, size=64):
    im = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(im).rectangle(box, fill=(200, 0, 0))
    return im


def test_position_answers_follow_the_mask_centroid():
    assert dict(vqa_data.derived_questions(_image((2, 2, 12, 12)), "position")) == {
        "is the shape on the left or on the right?": "left", "is the shape at the top or at the bottom?": "top"}
    assert dict(vqa_data.derived_questions(_image((50, 44, 60, 60)), "position")) == {
        "is the shape on the left or on the right?": "right", "is the shape at the top or at the bottom?": "bottom"}
    # centred horizontally: no left/right question, only top/bottom
    assert vqa_data.derived_questions(_image((26, 48, 37, 60)), "position") == [
        ("is the shape at the top or at the bottom?", "bottom")]
    assert vqa_data.derived_questions(Image.new("RGB", (64, 64), (9, 9, 9)), "position") == []


def test_size_answers_follow_the_area_terciles():
    lo, hi = vqa_data.size_thresholds()
    assert 0 < lo < hi < 64 * 64
    assert vqa_data.derived_questions(_image((10, 10, 14, 14)), "size") == [("is the shape small or large?", "small")]
    assert vqa_data.derived_questions(_image((5, 5, 45, 45)), "size") == [("is the shape small or large?", "large")]
    side = int(((lo + hi) / 2) ** 0.5)  # an area between the thresholds gets no question
    assert vqa_data.derived_questions(_image((10, 10, 9 + side, 9 + side)), "size") == []


def test_default_kinds_are_todays_items():
    for kw in ({}, {"limit": 40, "seed": 3}):
        a, b = vqa_data.easy_vqa_items("test", **kw), vqa_data.easy_vqa_items("test", kinds=("easy-vqa",), **kw)
        assert [(id(i), q, x) for i, q, x in a] == [(id(i), q, x) for i, q, x in b]
    assert len(vqa_data.easy_vqa_items("test")) == 9673


def test_kinds_are_seeded_balanced_and_split_by_image():
    items = vqa_data.easy_vqa_items("test", limit=300, seed=1, kinds=("size", "position", "easy-vqa"))
    again = vqa_data.easy_vqa_items("test", limit=300, seed=1, kinds=["easy-vqa", "position", "size", "size"])
    assert [(id(i), q, a) for i, q, a in items] == [(id(i), q, a) for i, q, a in again]
    assert {vqa_data.kind_of(q) for _, q, _ in items} == {"easy-vqa", "position", "size"}
    assert items != vqa_data.easy_vqa_items("test", limit=300, seed=2, kinds=("easy-vqa", "position", "size"))

    train = vqa_data.easy_vqa_items("train", kinds=("position", "size"))
    counts = Counter(a for _, _, a in train)
    for x, y in (("left", "right"), ("top", "bottom"), ("small", "large")):
        assert 0.4 < counts[x] / (counts[x] + counts[y]) < 0.6, counts
    test_images = {id(vqa_data._image(p)) for p in vqa_data._split("test")[1].values()}
    derived = vqa_data.easy_vqa_items("test", kinds=("position", "size"))
    assert derived and all(id(im) in test_images for im, _, _ in derived)
    assert not test_images & {id(im) for im, _, _ in train}


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="colour"):
        vqa_data.easy_vqa_items("test", limit=4, kinds=("colour",))


def test_training_vocabulary_covers_the_derived_kinds():
    """The shipped vocabulary is the script's for the shipped kinds; ``--kinds`` adds exactly the new words."""
    import easy_vqa

    spec = importlib.util.spec_from_file_location("_train_tiny_llava", REPO / "evals" / "train" / "train_tiny_llava.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tq, ta, _ = easy_vqa.get_train_questions()
    default = script.build_processor(tq, ta, script.derived_texts(["easy-vqa"])).tokenizer
    shipped = REPO / "tokenprune" / "zoo" / "weights" / "tiny-llava"
    if (shipped / "tokenizer.json").is_file():
        import json

        from transformers import PreTrainedTokenizerFast

        kinds = json.loads((shipped / "training_metrics.json").read_text()).get("kinds", ["easy-vqa"])
        want = script.build_processor(tq, ta, script.derived_texts(kinds)).tokenizer
        assert want.get_vocab() == PreTrainedTokenizerFast.from_pretrained(shipped).get_vocab()
    tok = script.build_processor(tq, ta, script.derived_texts(["easy-vqa", "position", "size"])).tokenizer
    for qs in vqa_data.DERIVED_QUESTIONS.values():
        for q, answers in qs:
            ids = tok(vqa_data.build_prompt(q) + " " + " ".join(answers))["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.unk_token_id in default(q)["input_ids"] or set(answers) - set(default.get_vocab())


def test_vqa_task_and_eval_cli_take_kinds_and_weights(tmp_path):
    import json

    from tokenprune.evals import runner
    from tokenprune.evals.tasks import VQATask

    weights = REPO / "tokenprune" / "zoo" / "weights" / "tiny-llava"
    if not (weights / "model.safetensors").is_file():
        pytest.skip("tiny-llava weights not trained")
    task = VQATask(limit=6, kinds=["size"], weights=str(weights), progress=False)
    task.setup()
    assert len(task.items) == 6 and {vqa_data.kind_of(q) for _, q, _ in task.items} == {"size"}
    assert task.describe()["kinds"] == ("size",)
    assert VQATask(limit=6, progress=False).describe().get("kinds") is None  # default: today's task

    out = tmp_path / "eval"
    runner.main(["--model", "tiny-llava", "--kinds", "position", "--weights", str(weights), "--methods", "random",
                 "--budgets", "0.5", "--limit", "4", "--repeats", "0", "--no-memory", "--no-progress", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["dense", "random"] and res["rows"][0]["n_items"] == 4
    assert res["meta"]["tasks"][0]["kinds"] == ["position"]
    for bad in (["--model", "tiny-vit", "--kinds", "size"], ["--model", "tiny-llava", "--kinds", "colour"]):
        with pytest.raises(SystemExit):
            runner.main(bad)


def test_vqa_task_keeps_each_methods_default_layer_unless_given():
    from tokenprune.evals.tasks import VQATask

    task = VQATask(limit=1, progress=False)
    assert task.method_defaults("visionzip") == {"segment": "visual"}  # layer 0: before the language model
    assert task.method_defaults("fastv") == {"segment": "visual"}
    assert VQATask(limit=1, progress=False, pruning_layer=0).method_defaults("random") == {"layer": 0, "segment": "visual"}
