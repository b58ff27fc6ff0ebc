"""Calibrate VFlowOpt on an LVLM: an optuna study over its schedule, as the paper does.

The objective is the paper's: mean cosine similarity between the last prompt token's final
hidden state (the language model's output, after its final norm) with and without the pruner,
over a small calibration set, here easy-vqa TRAIN questions (the results use test questions).
The study searches the number of stages (1-3) and their layers, the keep ratios, ``alpha``,
``global_threshold``, ``text_queries`` and ``recycle_grid``; seeded TPE, one forward per trial.

Budget (``kind``):

- ``"tokens"`` (default): the share of visual tokens kept, averaged over decoder layers
  1..L-1 (layer 0 runs dense for VFlowOpt, which scores from the previous layer's attention). It is the reference code's constraint
  (its ``TARGET_AVERAGE``: kept share per layer, averaged over the depth) and is proportional
  to the visual tokens' decoder compute, so budget b costs what FastV(layer=1, keep_ratio=b)
  costs. Each trial's ratios are solved so the schedule spends the budget in whole tokens
  without exceeding it (the reference solves its last ratio the same way); a trial whose
  measured share exceeds it is rejected.
- ``"flops"``: the decoder's prefill FLOPs relative to dense (``handle.stats``). It is turned
  into a token budget once (bisection on a one-stage schedule at layer 1), then trials are
  searched as above and rejected if their measured FLOPs exceed the budget. The written
  config's ``budget`` is then this FLOPs share (the shipped ``keep<B>.json`` are token budgets).

Python::

    from tokenprune.calibrate import calibrate
    result = calibrate(model, processor, budget=0.1)     # dict: config, objective, ...
    pruner = tp.build_pruner(**result["config"])

Command line: ``tokenprune calibrate vflowopt --model tiny-llava --budget 0.1 --out cfg.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

from .errors import TokenPruneError
from .handle import pruning
from .methods.vflowopt import VFlowOpt

KINDS = ("tokens", "flops")
RECYCLE_GRIDS = (0, 2, 3, 4, 8)
TEXT_QUERIES = (0, 1, 2, 4, 8)


# ---- calibration set and objective -------------------------------------------------------------
def calibration_inputs(processor, items: int = 32, seed: int = 0, kinds=("easy-vqa",)) -> dict:
    """One left-padded batch of easy-vqa TRAIN questions (never the test split the results use);
    ``kinds`` as in ``vqa_data.easy_vqa_items`` (position / size questions need the layout)."""
    from .zoo import vqa_data

    chosen = vqa_data.easy_vqa_items("train", limit=items, seed=seed, kinds=kinds)
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return dict(processor(images=[c[0] for c in chosen], text=[vqa_data.build_prompt(c[1]) for c in chosen],
                              return_tensors="pt", padding=True))
    finally:
        tok.padding_side = side


def last_hidden(model, inputs: dict) -> torch.Tensor:
    """(B, D) final hidden state of each row's last prompt token (rows are left-padded)."""
    with torch.no_grad():
        return model.model(**inputs).last_hidden_state[:, -1].float()


def evaluate(model, inputs: dict, dense: torch.Tensor, pruner) -> dict:
    """Objective and cost of one pruner on the calibration batch."""
    with pruning(model, pruner) as handle:
        out = last_hidden(model, inputs)
        stats = handle.stats
    cos = torch.nn.functional.cosine_similarity(out, dense, dim=-1).nan_to_num(0.0)
    visual = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    other = inputs["attention_mask"].sum(1) - visual
    counts = torch.tensor(stats.tokens_per_layer[1:], dtype=torch.float64)  # (L-1, B), layers 1..L-1
    share = ((counts - other[None]) / visual[None]).mean()
    return {"objective": float(cos.mean()), "kept_share": float(share), "flops_rel": stats.flops / stats.dense_flops,
            "min_visual_tokens": int(visual.min())}


# ---- the search space ----------------------------------------------------------------------------
def schedules(num_layers: int, budget: float, max_stages: int = 3) -> list[tuple[int, ...]]:
    """Stage-layer tuples whose dense prefix (layers 1..l1-1) fits the budget."""
    P = num_layers - 1
    out = []
    for s in range(1, min(max_stages, P) + 1):
        for layers in itertools.combinations(range(1, num_layers), s):
            if layers[0] - 1 <= budget * P + 1e-9:
                out.append(layers)
    return out


def solve_ratios(layers: tuple[int, ...], num_layers: int, budget: float, u: list[float],
                 tokens: int | None = None) -> tuple[float, ...]:
    """Per-stage keep ratios whose kept share, averaged over layers 1..L-1, equals ``budget``.

    ``u`` (one number in [0, 1] per stage but the last) places each cumulative share between
    the least that can still spend the budget and the most that does not overspend it; the
    last stage takes what is left (the reference solves its last ratio the same way). With
    ``tokens`` (visual tokens per prompt), the shares are whole token counts that never exceed
    the budget (each ratio is count / previous count, which the pruner's rounding keeps exact).
    """
    lengths = [b - a for a, b in zip(layers, list(layers[1:]) + [num_layers])]
    rest = budget * (num_layers - 1) - (layers[0] - 1)
    shares, prev = [], 1.0
    for i, length in enumerate(lengths):
        if i == len(lengths) - 1:
            c = min(prev, max(0.0, rest / length))
        else:
            lo = rest / sum(lengths[i:])
            hi = min(prev, rest / length)
            c = min(lo, hi) + u[i] * max(0.0, hi - lo)
        shares.append(c)
        rest -= c * length
        prev = c
    if tokens is not None:  # whole tokens: floor each stage's count, the last takes what is left
        counts, spent, prev_k = [], 0, tokens
        allowed = int(budget * (num_layers - 1) * tokens + 1e-9) - (layers[0] - 1) * tokens
        for i, (c, length) in enumerate(zip(shares, lengths)):
            k = int(c * tokens + 1e-9) if i < len(lengths) - 1 else (allowed - spent) // length
            k = max(0, min(prev_k, k))
            counts.append(k)
            spent += k * length
            prev_k = k
        shares = [k / tokens for k in counts]
    ratios, prev = [], 1.0
    for c in shares:
        ratios.append(min(1.0, c / prev) if prev > 0 else 0.0)
        prev = c
    return tuple(round(r, 6) for r in ratios)


def suggest(trial, num_layers: int, budget: float, choices: list[tuple[int, ...]], tokens: int) -> VFlowOpt:
    key = trial.suggest_categorical("layers", [",".join(map(str, c)) for c in choices])
    layers = tuple(int(x) for x in key.split(","))
    u = [trial.suggest_float(f"u{i}", 0.0, 1.0) for i in range(2)][: len(layers) - 1]
    return VFlowOpt(layer=layers, keep_ratio=solve_ratios(layers, num_layers, budget, u, tokens),
                    alpha=trial.suggest_float("alpha", -1.0, 1.0),
                    global_threshold=trial.suggest_float("global_threshold", 0.0, 50.0),
                    text_queries=trial.suggest_categorical("text_queries", TEXT_QUERIES),
                    recycle_grid=trial.suggest_categorical("recycle_grid", RECYCLE_GRIDS),
                    segment="visual", target="language")


def token_budget_for_flops(model, inputs, dense, flops: float, steps: int = 12) -> float:
    """Kept-visual-token share (layers 1..L-1) whose one-stage schedule costs ``flops`` of dense prefill."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = evaluate(model, inputs, dense, VFlowOpt(layer=1, keep_ratio=mid, recycle_grid=0, target="language"))
        lo, hi = (mid, hi) if got["flops_rel"] <= flops else (lo, mid)
    return lo


def check_args(budget, kind, trials, items) -> None:
    if kind not in KINDS:
        raise TokenPruneError(f"calibrate: kind must be one of {KINDS}, got {kind!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget < 1.0:
        raise TokenPruneError(f"calibrate: budget must be a number in (0, 1), got {budget!r}")
    if trials < 1 or items < 1:
        raise TokenPruneError("calibrate: trials and items must be >= 1")


# ---- the study ---------------------------------------------------------------------------------
def calibrate(model, processor, budget: float, kind: str = "tokens", trials: int = 80, items: int = 32,
              seed: int = 0, progress: bool = True, kinds=("easy-vqa",)) -> dict:
    """Run the study; returns ``{"config": ..., "objective": ..., "kept_share": ..., ...}``."""
    try:
        import optuna
    except ImportError as e:  # pragma: no cover
        raise TokenPruneError("calibration needs optuna: pip install 'tokenprune[eval]'") from e
    from tqdm import tqdm

    check_args(budget, kind, trials, items)
    if getattr(model.config, "image_token_id", None) is None:
        raise TokenPruneError(f"calibrate: {type(model).__name__} is not an LVLM with image tokens")
    t0 = time.perf_counter()
    num_layers = model.config.text_config.num_hidden_layers
    inputs = calibration_inputs(processor, items, seed, kinds)
    dense = last_hidden(model, inputs)
    tokens = budget if kind == "tokens" else token_budget_for_flops(model, inputs, dense, budget)
    choices = schedules(num_layers, tokens)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum(1).min())

    def objective(trial):
        pruner = suggest(trial, num_layers, tokens, choices, n_visual)
        got = evaluate(model, inputs, dense, pruner)
        for k, v in got.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("config", pruner.to_dict())
        over = got["kept_share"] > tokens + 1e-9 if kind == "tokens" else got["flops_rel"] > budget + 1e-9
        trial.set_user_attr("over_budget", bool(over))
        return got["objective"] - (2.0 if over else 0.0)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(16, max(1, trials // 3)), multivariate=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    # start from the plain schedule: one stage at layer 1, attention only, no recycling
    study.enqueue_trial({"layers": "1", "alpha": 0.0, "global_threshold": 7.0, "text_queries": 1, "recycle_grid": 0})
    bar = tqdm(total=trials, desc=f"calibrate vflowopt ({kind} budget {budget:g})", unit="trial", disable=not progress)

    def tick(study, trial):
        bar.update(1)
        if study.best_trial is not None:
            bar.set_postfix(best=f"{study.best_value:.4f}")

    try:
        study.optimize(objective, n_trials=trials, callbacks=[tick])
    finally:
        bar.close()
    ok = [t for t in study.trials if t.value is not None and not t.user_attrs.get("over_budget")]
    if not ok:
        raise TokenPruneError(f"calibrate: no trial met the budget {budget:g} ({kind})")
    best = max(ok, key=lambda t: t.value)
    config = {k: v for k, v in best.user_attrs["config"].items() if k not in ("calibrated",)}
    config["budget"] = float(budget)
    return {"config": config, "objective": best.value, "kept_share": best.user_attrs["kept_share"],
            "flops_rel": best.user_attrs["flops_rel"], "kind": kind, "budget": float(budget),
            "token_budget": tokens, "trials": trials, "items": items, "kinds": list(kinds), "seed": seed,
            "best_trial": best.number,
            "first_trial_objective": study.trials[0].value, "seconds": round(time.perf_counter() - t0, 1)}


# ---- command line ------------------------------------------------------------------------------
DESCRIPTION = __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("Budget (``kind``):")[1].split("Python::")[0]


def build_parser(prog: str = "tokenprune calibrate") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  tokenprune calibrate vflowopt --model tiny-llava --budget 0.1 --out cfg.json\n"
                                        "  python -c \"import json, tokenprune as tp; tp.build_pruner(**json.load(open('cfg.json')))\"")
    ap.add_argument("method", choices=["vflowopt"], help="the method to calibrate")
    ap.add_argument("--model", required=True, metavar="NAME|DIR", help="bundled LVLM (tiny-llava) or a local LLaVA directory")
    ap.add_argument("--budget", type=float, required=True, metavar="B", help="kept visual-token share (or FLOPs share, --kind flops)")
    ap.add_argument("--kind", choices=KINDS, default="tokens", help="what --budget limits (default: tokens)")
    ap.add_argument("--out", required=True, metavar="FILE.json", help="config JSON (the study's record goes to FILE.study.json)")
    ap.add_argument("--trials", type=int, default=80, help="optuna trials (default: 80)")
    ap.add_argument("--items", type=int, default=32, help="easy-vqa train questions in the calibration set (default: 32)")
    ap.add_argument("--seed", type=int, default=0, help="sampler and calibration-set seed (default: 0)")
    ap.add_argument("--kinds", nargs="+", default=["easy-vqa"], metavar="KIND",
                    help="question kinds of the calibration set: easy-vqa, position, size (default: easy-vqa)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    return ap


def main(argv=None, prog: str = "tokenprune calibrate") -> int:
    args = build_parser(prog).parse_args(argv)
    check_args(args.budget, args.kind, args.trials, args.items)
    from .zoo.vqa_data import KINDS as QUESTION_KINDS

    bad = [k for k in args.kinds if k not in QUESTION_KINDS]
    if bad:
        raise TokenPruneError(f"calibrate: unknown --kinds {bad}; choose from {', '.join(QUESTION_KINDS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import zoo

    model, processor = zoo.load(args.model) if not os.path.isdir(args.model) else zoo.load("tiny-llava", path=args.model)
    result = calibrate(model, processor, args.budget, kind=args.kind, trials=args.trials, items=args.items, seed=args.seed,
                       kinds=args.kinds)
    result["command"] = " ".join(["tokenprune calibrate"] + list(sys.argv[2:] if argv is None else argv))
    with open(args.out, "w") as f:
        json.dump(result["config"], f, indent=1)
        f.write("\n")
    record = os.path.splitext(args.out)[0] + ".study.json"
    with open(record, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"objective (mean cosine, last token's final hidden state) {result['objective']:.4f} "
          f"(plain one-stage schedule: {result['first_trial_objective']:.4f}); kept visual share {result['kept_share']:.3f}, "
          f"decoder FLOPs {result['flops_rel']:.3f} of dense; {result['seconds']:.0f} s")
    print(f"config -> {args.out}, study record -> {record}")
    return 0
