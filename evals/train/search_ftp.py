"""Search FTP's per-block sparsity schedule for SmolLM2-135M under a total budget (genetic search).

A schedule gives each block ``i`` the share ``s_i`` of the prompt's tokens that skip it (block 0:
0); its mean over the blocks is the budget (default: 0.25 / 0.375 / 0.5, what the eval runs ftp at
for 0.2 / 0.3 / 0.4 of its pass, the scored tail running every block). Fitness = next-token NLL of
the routed model (the shipped router, hard routing) of the generated tail (the last 20%: the eval's
scored positions) on the calibration split of ``pydoc_data.topics`` (``train_ftp.text_split``:
neither the training text nor the held-out text the perplexity eval reads). The population starts from
the uniform schedule, depth ramps, two schedules that skip most where ShortGPT's block influence
(measured on calibration text, shipped for ``shortgpt``) is lowest, and log-normal perturbations of
the uniform one; with ``--route-generated`` (the tail routed too) fitness adds ``--penalty`` x the
shortfall of the generated tokens' skipped share below the budget (a schedule must not buy quality
by skipping fewer scored tokens); each generation keeps the
best ``--elite``, and fills the rest with children of tournament-picked parents (uniform
crossover, then log-normal noise on a few blocks), each projected back onto the budget.

Writes, per budget, ``ftp-<budget>.json`` (``tp.build_pruner(**json.load(f))``) and the search log
``search.json`` (``search-route-generated.json`` with ``--route-generated``) to ``--out``; ``schedules.json`` collects the schedules ``ftp(schedule="searched")``
loads.

    .venv/bin/python evals/train/search_ftp.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time

import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tokenprune as tp  # noqa: E402
from tokenprune.methods.ftp import checkpoint_path, load_router, uniform_schedule  # noqa: E402
from train_ftp import EVAL_BLOCK, OUT_DIR, SoftRouting, routed_nll, text_split, token_blocks  # noqa: E402

MAX_BLOCK = 0.9


def project(schedule: list[float], budget: float) -> list[float]:
    """Block 0 at 0, every block in [0, MAX_BLOCK], mean = budget (rounded to 4 decimals)."""
    L = len(schedule)
    s = [0.0] + [min(MAX_BLOCK, max(0.0, x)) for x in schedule[1:]]
    for _ in range(50):
        total = budget * L - sum(s)
        free = [i for i in range(1, L) if (s[i] < MAX_BLOCK if total > 0 else s[i] > 0)]
        if abs(total) < 1e-9 or not free:
            break
        for i in free:
            s[i] = min(MAX_BLOCK, max(0.0, s[i] + total / len(free)))
    s = [round(x, 4) for x in s]
    s[max(range(1, L), key=lambda i: s[i])] += round(budget * L - sum(s), 4)  # exact mean after rounding
    return s


def initial(rng: random.Random, budget: float, L: int, size: int, spread: float,
            influence: list[float] | None = None) -> list[list[float]]:
    base = uniform_schedule(budget, L)
    pop = [base,
           project([0.0] + [budget * (0.5 + i / (L - 1)) for i in range(1, L)], budget),  # more skipping deeper
           project([0.0] + [budget * (1.5 - i / (L - 1)) for i in range(1, L)], budget)]  # ... shallower
    if influence is not None:  # more skipping where a block changes its input least (ShortGPT's BI)
        order = sorted(range(1, L), key=lambda i: influence[i])
        rank = {b: r / (L - 2) for r, b in enumerate(order)}
        pop.append(project([0.0] + [budget * 2 * (1 - rank[i]) for i in range(1, L)], budget))
        pop.append(project([0.0] + [MAX_BLOCK if rank[i] < budget * L / (L - 1) else 0.0 for i in range(1, L)], budget))
    while len(pop) < size:
        pop.append(mutate(rng, base, budget, spread, share=1.0))
    return pop[:size]


def mutate(rng: random.Random, s: list[float], budget: float, spread: float, share: float = 0.3) -> list[float]:
    out = [x * math.exp(rng.gauss(0.0, spread)) if i and rng.random() < share else x for i, x in enumerate(s)]
    return project(out, budget)


def crossover(rng: random.Random, a: list[float], b: list[float], budget: float) -> list[float]:
    return project([x if rng.random() < 0.5 else y for x, y in zip(a, b)], budget)


def search(fitness, rng: random.Random, budget: float, L: int, population: int, generations: int, elite: int,
           spread: float, progress: bool, desc: str, influence: list[float] | None = None):
    """(best schedule, its fitness, history of (generation, best, mean))."""
    cache: dict[tuple, float] = {}

    def score(s):
        key = tuple(s)
        if key not in cache:
            cache[key] = fitness(s)
            bar.update(1)
            bar.set_postfix(best=f"{min(cache.values()):.4f}")
        return cache[key]

    bar = tqdm(total=population + (population - elite) * (generations - 1), desc=desc, disable=not progress)
    pop = initial(rng, budget, L, population, spread, influence)
    history = []
    for g in range(generations):
        scored = sorted(((score(s), s) for s in pop), key=lambda t: t[0])
        history.append((g, scored[0][0], sum(f for f, _ in scored) / len(scored)))
        if g == generations - 1:
            break

        def pick():
            a, b = rng.sample(scored, 2)
            return a[1] if a[0] <= b[0] else b[1]

        pop = [s for _, s in scored[:elite]]
        while len(pop) < population:
            pop.append(mutate(rng, crossover(rng, pick(), pick(), budget), budget, spread))
    bar.close()
    best = min(cache.items(), key=lambda kv: kv[1])
    return list(best[0]), best[1], history, cache.get(tuple(uniform_schedule(budget, L)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.375, 0.5],
                    help="schedule means: the prompt's share (the eval's 0.2 / 0.3 / 0.4 of its 512 + 128-token pass)")
    ap.add_argument("--route-generated", action="store_true",
                    help="route the generated tail too, as ftp(route_generated=True) (default: it runs every block)")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--elite", type=int, default=2)
    ap.add_argument("--spread", type=float, default=0.4, help="sigma of the log-normal mutation")
    ap.add_argument("--blocks", type=int, default=2, help="calibration blocks in the fitness")
    ap.add_argument("--length", type=int, default=EVAL_BLOCK, help="tokens per block (the last 20%% routed as generated)")
    ap.add_argument("--checkpoint", default="smollm2-135m", help="router (shipped name or path)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--penalty", type=float, default=50.0,
                    help="fitness += penalty x the shortfall of the generated tokens' skipped share below the budget")
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args()
    progress = not os.environ.get("TQDM_DISABLE")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = tp.zoo.load("smollm2-135m")
    model.requires_grad_(False).eval()
    L = model.config.num_hidden_layers
    calib = token_blocks(tok, text_split(tok)["calibration"], args.length)[: args.blocks]
    path = checkpoint_path(args.checkpoint)
    router = load_router(path)
    soft = SoftRouting(model, router, route_generated=args.route_generated)
    if args.route_generated and not router.thresholds:
        raise SystemExit(f"{path} has no generated-token thresholds: train it with evals/train/train_ftp.py")
    os.makedirs(args.out, exist_ok=True)
    log = {"command": ".venv/bin/python evals/train/search_ftp.py " + shlex.join(sys.argv[1:]),
           "args": vars(args), "calibration_blocks": len(calib), "budgets": {}}
    from tokenprune.methods.shortgpt import shipped_scores

    influence = shipped_scores("smollm2-135m")
    with soft:
        dense = routed_nll(model, soft, calib, [0.0] * L)
        for budget in args.budgets:
            t1 = time.time()
            rng = random.Random(args.seed)
            def fitness(schedule):
                nll, share = routed_nll(model, soft, calib, schedule, share=True)
                shares[tuple(schedule)] = share
                return nll + (args.penalty * max(0.0, budget - share) if args.route_generated else 0.0)

            shares = {}
            best, fit, history, uniform = search(fitness, rng, budget, L, args.population, args.generations,
                                                 args.elite, args.spread, progress, f"search {budget}", influence)
            config = {"name": "ftp", "sparsity": budget, "schedule": best, "checkpoint": args.checkpoint,
                      "route_generated": args.route_generated}
            tp.build_pruner(**config)  # the shipped config must load
            with open(os.path.join(args.out, f"ftp-{budget:g}.json"), "w") as f:
                json.dump(config, f, indent=1)
            log["budgets"][f"{budget:g}"] = dict(schedule=best, fitness=fit, uniform_fitness=uniform, dense_nll=dense,
                                                 generated_share=shares[tuple(best)],
                                                 uniform_generated_share=shares.get(tuple(uniform_schedule(budget, L))),
                                                 history=history, seconds=time.time() - t1)
            print(f"budget {budget}: fitness {fit:.4f} (uniform {uniform:.4f}, dense NLL {dense:.4f}), generated "
                  f"tokens' skipped share {shares[tuple(best)]:.3f} "
                  f"in {time.time() - t1:.0f} s", flush=True)
    schedules_path = os.path.join(args.out, "schedules.json")
    shipped = json.load(open(schedules_path)) if os.path.isfile(schedules_path) else {}
    shipped.update({k: v["schedule"] for k, v in log["budgets"].items()})
    with open(schedules_path, "w") as f:
        json.dump(shipped, f, indent=1)
    log["total_seconds"] = time.time() - t0
    with open(os.path.join(args.out, "search-route-generated.json" if args.route_generated else "search.json"), "w") as f:
        json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
