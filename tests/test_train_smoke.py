"""The evals/train/ scripts made the committed zoo testbeds and must keep running: ~2 steps each, output must load."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenprune.zoo import data

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "tokenprune" / "zoo" / "weights"
no_fmnist = pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR),
                               reason="apt-get install dataset-fashion-mnist")
no_easy_vqa = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="pip install easy-vqa")


def check_vit(out):
    from transformers import ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification.from_pretrained(out, local_files_only=True).eval()
    px = ViTImageProcessor.from_pretrained(out)(images=[Image.new("L", (28, 28))], return_tensors="pt")["pixel_values"]
    return model(pixel_values=px).logits


def check_clip(out):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(out))
    img = model.eval().encode_image(preprocess(Image.new("RGB", (64, 64)))[None])
    return torch.cat([img, model.encode_text(open_clip.get_tokenizer("local-dir:" + str(out))(["a red circle"]))])


def check_llava(out):
    from tokenprune.zoo.llava import load_tiny_llava
    from tokenprune.zoo.vqa_data import build_prompt

    model, processor = load_tiny_llava(path=str(out))
    x = processor(images=np.zeros((64, 64, 3), np.uint8), text=build_prompt("what color is the shape?"),
                  return_tensors="pt")
    return model(**x).logits


def check_llava_kinds(out):
    import json

    from tokenprune.zoo.llava import load_tiny_llava

    vocab = load_tiny_llava(path=str(out))[1].tokenizer.get_vocab()
    assert {"left", "right", "top", "bottom", "small", "large"} <= set(vocab)
    trained = json.loads((out / "training_metrics.json").read_text())
    assert "position" in trained["by_type"] and "size" in trained["by_type"] and "yes/no" in trained["by_type"]
    assert trained["args"]["patch_position"] and not trained["args"]["hflip"]
    # --eval-only: the saved model evaluated again, its training record kept, the card rewritten
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, str(REPO / "evals" / "train" / "train_tiny_llava.py"), "--eval-only",
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    again = json.loads((out / "training_metrics.json").read_text())
    assert again["test_questions"] == trained["test_questions"] == 8 and again["steps"] == trained["steps"]
    assert "--eval-only" in again["eval_command"] and "re-evaluated by" in (out / "README.md").read_text()
    return check_llava(out)


def check_t2i(out):
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    from tokenprune.zoo import t2i

    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True).eval()
    ddim = DDIMScheduler.from_config(t2i.ddim_config(dict(DDPMScheduler.from_pretrained(out / "scheduler").config)))
    images = t2i.build_pipeline(unet, scheduler=ddim)(["a red circle"], num_inference_steps=2, output_type="pt").images
    shape_logits, color_logits = t2i.load_judge(out / "judge")(images * 2 - 1)
    return torch.cat([images.flatten(), shape_logits.flatten(), color_logits.flatten()])


def check_atp(out):
    import tokenprune as tp
    from tokenprune.zoo.llava import load_tiny_llava
    from tokenprune.zoo.vqa_data import build_prompt

    model, processor = load_tiny_llava()
    x = processor(images=np.zeros((64, 64, 3), np.uint8), text=build_prompt("what color is the shape?"),
                  return_tensors="pt")
    assert (out / "README.md").is_file() and (out / "metrics.json").is_file()
    with tp.pruning(model, tp.build_pruner("atp", checkpoint=str(out), layer=[2, 4], keep_ratio=0.25)) as h:
        logits = model(**x).logits
    assert h.stats.tokens_per_layer[4][0] < h.stats.tokens_per_layer[0][0]
    return logits


SCRIPTS = [  # script, smallest flags (~2 optimisation steps each), loader check
    pytest.param("train_tiny_vit.py", ["--epochs", "1", "--teacher-epochs", "1", "--train-limit", "128",
                                       "--eval-limit", "16"], check_vit, marks=no_fmnist, id="vit"),
    pytest.param("train_tiny_clip.py", ["--steps", "2", "--batch-size", "8", "--train-limit", "16",
                                        "--eval-limit", "16"], check_clip, marks=[no_fmnist, no_easy_vqa], id="clip"),
    # its locality check always scores 1000 test questions x 5 masks: 1-layer towers keep that ~10 s
    pytest.param("train_tiny_llava.py", ["--vision-epochs", "1", "--vision-batch", "4", "--epochs", "1",
                                         "--images-per-batch", "4", "--limit-images", "8", "--eval-limit", "8",
                                         "--vision-layers", "1", "--text-layers", "1"], check_llava,
                 marks=no_easy_vqa, id="llava"),
    pytest.param("train_tiny_llava.py", ["--vision-epochs", "1", "--vision-batch", "4", "--epochs", "1",
                                         "--images-per-batch", "4", "--limit-images", "8", "--eval-limit", "8",
                                         "--vision-layers", "1", "--text-layers", "1",
                                         "--kinds", "easy-vqa", "position", "size"], check_llava_kinds,
                 marks=no_easy_vqa, id="llava-kinds"),
    pytest.param("train_tiny_t2i.py", ["--steps", "2", "--batch", "8", "--judge-epochs", "1", "--eval-n", "24",
                                       "--eval-steps", "1", "--eval-guidance", "1.0"], check_t2i,
                 marks=no_easy_vqa, id="t2i"),
    pytest.param("train_atp.py", ["--steps", "2", "--batch", "4", "--train-items", "16", "--eval-items", "8",
                                  "--eval-layers", "[[2, 4]]", "--threads", "1", "--kinds", "easy-vqa", "position",
                                  "size"], check_atp, marks=no_easy_vqa, id="atp"),
]


@pytest.mark.parametrize("script, flags, check", SCRIPTS)
def test_train_script_smoke(script, flags, check, tmp_path):
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in WEIGHTS.rglob("*")}
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, str(REPO / "evals" / "train" / script), *flags, "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in WEIGHTS.rglob("*")} == before, "smoke run touched the shipped weights"
    with torch.no_grad():
        y = check(out)
    assert y.numel() > 0 and torch.isfinite(y).all()
