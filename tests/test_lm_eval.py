"""The lm-evaluation-harness model type ``tokenprune`` on the small tasks the repo ships, offline."""
import socket
from types import SimpleNamespace

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

import tokenprune as tp
from tokenprune.evals import lm_eval_model
from tokenprune.evals.compare import load_model
from tokenprune.evals.lm_eval_model import TASKS_DIR, TokenPruneLM


@pytest.fixture
def offline(monkeypatch):
    """Any connection to a non-loopback address fails the test (nothing may download)."""
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")):
            raise AssertionError(f"network access attempted: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def test_simple_evaluate_runs_both_request_types_pruned(offline):
    lm = TokenPruneLM(pretrained="smollm2-135m", pruner="fastv", layer=4, keep_ratio=0.5)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tokenprune_facts", "tokenprune_qa"], limit=2,
                                  task_manager=TaskManager(include_path=TASKS_DIR))
    res = out["results"]
    assert 0.0 <= res["tokenprune_facts"]["acc,none"] <= 1.0
    assert 0.0 <= res["tokenprune_qa"]["exact_match,first-word"] <= 1.0
    # 2 questions x 4 choices of loglikelihood, then 2 generations; each request was pruned
    assert lm.totals["requests"] == 10
    assert 0.3 < lm.totals["flops"] / lm.totals["dense_flops"] < 0.8


def test_keep_everything_is_the_dense_model_and_pruning_changes_scores(offline):
    model, tok = load_model("smollm2-135m").model, load_model("smollm2-135m").processor
    ctx = ("The river in our town is called the Willow. In spring it often floods the fields near the old mill, "
           "and in summer children swim in it.\nQuestion: What is the river called?\nAnswer:")
    reqs = [SimpleNamespace(args=(ctx, " Willow")), SimpleNamespace(args=(ctx, " Thames"))]
    dense = TokenPruneLM(pretrained=model, tokenizer=tok).loglikelihood(reqs, disable_tqdm=True)
    keep_all = TokenPruneLM(pretrained=model, tokenizer=tok, pruner="fastv", keep_ratio=1.0)
    assert keep_all.loglikelihood(reqs, disable_tqdm=True) == dense  # bit-exact
    half = TokenPruneLM(pretrained=model, tokenizer=tok, pruner="fastv", layer=4, keep_ratio=0.25)
    pruned = half.loglikelihood(reqs, disable_tqdm=True)
    assert pruned != dense and half.totals["flops"] < half.totals["dense_flops"]

    # dense scores are the model's own log-probabilities of the continuation
    ids = tok(ctx + " Willow", add_special_tokens=False).input_ids
    n = len(ids) - len(tok(ctx, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, -n - 1:-1].float().log_softmax(-1)
    assert dense[0][0] == pytest.approx(float(logp.gather(1, torch.tensor(ids[-n:])[:, None]).sum()), abs=1e-4)
    assert dense[0][0] > dense[1][0]  # the passage names the Willow

    gen = [SimpleNamespace(args=(ctx, {"until": ["\n"], "max_gen_toks": 6}))]
    assert keep_all.generate_until(gen, disable_tqdm=True) == TokenPruneLM(
        pretrained=model, tokenizer=tok).generate_until(gen, disable_tqdm=True)
    assert "\n" not in half.generate_until(gen, disable_tqdm=True)[0]


def test_lm_eval_command_line_knows_the_model_type(offline, capsys):
    lm_eval_model.main(["run", "--model", "tokenprune", "--model_args",
                        "pretrained=smollm2-135m,pruner=random,layer=2;4,keep_ratio=0.5", "--tasks",
                        "tokenprune_facts", "--include_path", TASKS_DIR, "--limit", "1"])
    out = capsys.readouterr().out
    assert "tokenprune_facts" in out and "acc" in out


def test_bad_model_args_name_the_problem():
    with pytest.raises(tp.TokenPruneError, match=r"keep_ratio must be a number in \[0, 1\]"):
        TokenPruneLM(pretrained="smollm2-135m", pruner="fastv", keep_ratio=1.5)
    with pytest.raises(tp.TokenPruneError, match="unknown model_args"):
        TokenPruneLM(pretrained="smollm2-135m", pruner="fastv", keep=0.5)
    with pytest.raises(tp.TokenPruneError, match="need a pruner"):
        TokenPruneLM(pretrained="smollm2-135m", keep_ratio=0.5)
    with pytest.raises(tp.TokenPruneError, match="needs an LLM"):
        TokenPruneLM(pretrained="tiny-vit")
