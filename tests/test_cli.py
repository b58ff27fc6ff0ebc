"""The ``tokenprune`` command: every subcommand has --help, bad input exits 2 with one line, `run` works."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tokenprune.cli import COMMANDS, main

PASSAGE = ("Read the passage and answer the question.\n\nThe Python programming language was created by Guido "
           "van Rossum and first released in 1991. It emphasises code readability with significant indentation. "
           "Python is dynamically typed and garbage-collected.\n\nQuestion: Who created Python?")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower() and len(out.splitlines()) >= 3


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main([]) == 2  # no command: usage on stderr, status 2


BAD = {
    "unknown command": (["nope"], "invalid choice"),
    "unknown model": (["run", "--model", "nope", "--prompt", "x"], "unknown model 'nope'"),
    "ratio out of range": (["run", "--model", "tiny-vit", "--keep-ratio", "1.5"], "--keep-ratio must be in [0, 1]"),
    "unknown method": (["run", "--model", "tiny-vit", "--method", "nope"], "unknown method 'nope'"),
    "layer beyond the model": (["run", "--model", "tiny-vit", "--layer", "9"], "beyond the model"),
    "bad method option": (["run", "--model", "tiny-vit", "--method", "tome:bogus=1"], "unknown option"),
    "missing prompt": (["run", "--model", "smollm2-135m"], "needs --prompt"),
    "bad image spec": (["run", "--model", "tiny-vit", "--image", "test:x"], "test:N needs a number"),
    "missing image file": (["run", "--model", "tiny-vit", "--image", "/nonexistent.png"], "cannot read image"),
    "bad layer syntax": (["run", "--model", "tiny-vit", "--layer", "two"], "invalid layer"),
    "eval unknown model": (["eval", "--model", "nope"], "unknown model"),
    "eval bad budget": (["eval", "--model", "tiny-vit", "--budgets", "2"], "budgets must be in [0, 1]"),
    "bench unknown family": (["bench", "nope"], "invalid choice"),
    "methods takes no arguments": (["methods", "extra"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_clear_line(case, capsys):
    argv, message = BAD[case]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_run_llm_json_shows_a_real_reduction(capsys):
    status = main(["run", "--model", "smollm2-135m", "--method", "fastv", "--layer", "4", "--keep-ratio", "0.5",
                   "--prompt", PASSAGE, "--max-new-tokens", "4", "--repeats", "1", "--json"])
    assert status == 0
    r = json.loads(capsys.readouterr().out)
    assert r["pruner"] == {**r["pruner"], "name": "fastv", "layer": 4, "keep_ratio": 0.5, "segment": "text"}
    per_layer = [row[0] for row in r["stats"]["tokens_per_layer"]]
    n = r["prompt_tokens"]
    assert per_layer[:4] == [n] * 4  # layers before `layer` see every token
    candidates = n - 1 - 4  # fastv protects the first and the last 4 prompt tokens
    assert per_layer[4:] == [n - candidates + int(candidates * 0.5 + 0.5)] * 26
    assert r["stats"]["flops_ratio"] < 0.8 and r["stats"]["pruned_anything"]
    assert r["dense_answer"] and r["pruned_answer"]
    assert r["time"]["dense_s"] > 0 and r["time"]["pruned_s"] > 0


def test_run_vit_text_output(capsys):
    assert main(["run", "--model", "tiny-vit", "--method", "zero-tprune:layer=[2,4]", "--keep-ratio", "0.5",
                 "--image", "test:0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "dense top classes:  ankle boot" in out  # Fashion-MNIST test image 0 is an ankle boot
    assert "pruned top classes:" in out
    assert "tokens/layer [65, 65, 33, 33, 17, 17]" in out


def test_run_clip_labels_and_a_short_prompt_says_nothing_was_pruned(capsys):
    assert main(["run", "--model", "tiny-clip", "--method", "tome", "--image", "test:0",
                 "--labels", "ankle boot,bag,dress", "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {name for name, _ in r["dense_top"]} == {"ankle boot", "bag", "dress"}
    # four prompt tokens, all protected: the summary must say so instead of a silent "100%"
    assert main(["run", "--model", "smollm2-135m", "--prompt", "Hi", "--no-chat", "--max-new-tokens", "2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "nothing was pruned" in out and "protect_last" in out


def test_run_text_to_image_saves_both_images(tmp_path, capsys):
    assert main(["run", "--model", "tiny-t2i", "--method", "tome-sd", "--keep-ratio", "0.5", "--prompt",
                 "a red circle", "--save-images", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "the judge reads the dense image as:  red circle" in out and "FLOPs 0.154G vs 0.198G (77.7%)" in out
    assert sorted(os.listdir(tmp_path)) == ["dense.png", "pruned.png"]


def test_run_on_a_local_model_directory(tmp_path, capsys):
    import transformers as T

    from tokenprune.evals.compare import load_model

    tok = load_model("smollm2-135m").processor
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert main(["run", "--model", str(tmp_path), "--method", "random", "--layer", "1", "--keep-ratio", "0.25",
                 "--prompt", PASSAGE, "--max-new-tokens", "2", "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["stats"]["tokens_per_layer"]) == 4 and r["stats"]["flops_ratio"] < 0.6


def test_console_script_exit_status():
    proc = subprocess.run([sys.executable, "-m", "tokenprune.cli", "run", "--model", "nope", "--prompt", "x"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tokenprune run: error: unknown model 'nope': neither a bundled model (smollm2-135m, tiny-clip, tiny-llava, "
        "tiny-t2i, tiny-vit) nor a local model directory"]
