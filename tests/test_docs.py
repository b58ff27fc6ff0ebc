"""The README runs: its Python blocks, its `tokenprune run` commands and its add-a-method guide."""
import contextlib
import io
import os
import re
import shlex

import pytest
import torch

import tokenprune as tp
from tokenprune.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
GUIDE = next(code for code in PYTHON if '@register_pruner("norm")' in code)


def run(code: str, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), torch.no_grad():
        exec(compile(code, "README.md", "exec"), namespace)
    return out.getvalue()


def printed_after(code: str) -> str:
    """The output block that follows ``code`` in the README ("" when there is none)."""
    rest = README[README.index(code) + len(code) + 3:]
    m = re.match(r"\s*(?:[^`\n]*\n\s*)?```\n(.*?)```", rest, flags=re.S)
    return m.group(1) if m else ""


def test_readme_python_blocks_run_and_print_what_the_readme_shows():
    namespace = {}
    usage = [code for code in PYTHON if code is not GUIDE]
    assert len(usage) >= 5  # LLM, ViT, CLIP, LVLM, text-to-image
    for i, code in enumerate(usage):
        out = run(code, namespace)
        shown = printed_after(code)
        for line in shown.splitlines():
            if line.startswith("tokens/layer"):  # analytic counts: exactly what the README shows
                assert line.split("(dense")[1] in out, (i, line, out)
        if i == 0:  # the first example must prune for real, and say so
            assert "nothing was pruned" not in out
            assert float(re.search(r"FLOPs [\d.]+G vs [\d.]+G \(([\d.]+)%\)", out).group(1)) < 70


def test_summary_says_when_nothing_was_prunable_and_why():
    model, tok = _smollm2()
    ids = tok(["Hello there"], return_tensors="pt")
    with torch.no_grad(), tp.pruning(model, tp.FastV(layer=4, keep_ratio=0.5)) as handle:
        model(**ids)
        text = handle.stats.summary()
    assert "nothing was pruned" in text and "protect_last" in text
    assert not handle.stats.pruned_anything


def _smollm2():
    from tokenprune.evals.compare import load_model

    loaded = load_model("smollm2-135m")
    return loaded.model, loaded.processor


def test_readme_command_lines_run(capsys):
    commands = [line for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()
                if line.startswith("tokenprune run ")]
    assert len(commands) == 3
    for line in commands:
        argv = shlex.split(line)[1:] + ["--repeats", "1"]
        assert cli(argv) == 0, line
        out = capsys.readouterr().out
        assert "nothing was pruned" not in out and ("FLOPs" in out or '"flops"' in out)


def test_add_a_method_guide_matches_the_code():
    from tokenprune.pruner import _REGISTRY

    contract = open(os.path.join(ROOT, "tests", "test_contract.py"), encoding="utf-8").read()
    methods_init = open(os.path.join(ROOT, "tokenprune", "methods", "__init__.py"), encoding="utf-8").read()
    assert "CASES = {" in contract and "def test_every_registered_method_has_a_contract_case" in contract
    assert "from .fastv import FastV" in methods_init and "__all__" in methods_init
    namespace = {}
    try:
        run(GUIDE, namespace)
        assert "norm" in tp.list_pruners()
        model, tok = _smollm2()
        ids = tok(["The Python programming language was created by Guido van Rossum and first released in "
                   "1991. It emphasises code readability with significant indentation."], return_tensors="pt")
        with torch.no_grad():
            dense = model(**ids).logits
            with tp.pruning(model, tp.build_pruner("norm", layer=2, keep_ratio=1.0)):
                assert torch.equal(model(**ids).logits, dense)
            with tp.pruning(model, tp.build_pruner("norm", layer=2, keep_ratio=0.5)) as handle:
                model(**ids)
            assert handle.stats.pruned_anything and handle.stats.flops_ratio < 0.8
            assert torch.equal(model(**ids).logits, dense)  # removed: dense again
        with pytest.raises(tp.TokenPruneError):
            tp.build_pruner("norm", keep_ratio=2.0)
    finally:
        _REGISTRY.pop("norm", None)  # the registry is global: leave no unlisted method behind
