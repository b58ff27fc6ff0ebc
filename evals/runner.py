"""Evaluate pruning methods over a grid of models x methods x budgets, next to the dense model.

Every (model, method, budget) cell is one row with the task's quality, its fidelity to the
dense model on the same inputs, and its cost (FLOPs, KV bytes, latency, peak memory), each
also relative to the dense row, which is always measured first in the same run. Writes
``results.json``, ``results.csv`` and ``accuracy_vs_flops.png`` into the output folder.

Python API::

    from tokenprune.evals.runner import run_grid
    from tokenprune.evals.tasks import PerplexityTask
    rows = run_grid([PerplexityTask(model=m, token_ids=ids, context=24, name="tiny")],
                    methods=["fastv", "random"], budgets=[0.5, 0.25], out="results/tiny")

Command line: ``tokenprune eval --help``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..errors import TokenPruneError, UnsupportedModelError
from ..pruner import _REGISTRY, build_pruner, list_pruners
from .metrics import Meter, latency, mean_cosine, peak_memory, time_call, top1_agreement
from .tasks import TASKS, EvalOutput, Task, TaskUnavailable, make_task

#: Which config field a budget sets, per method. Methods not listed here get the first of
#: :data:`BUDGET_FIELD_FALLBACK` their config has.
BUDGET_FIELDS = {"fastv": "keep_ratio", "random": "keep_ratio", "tome-sd": "ratio", "unet-static": "keep"}
#: Methods whose budget field is the share REMOVED (tomesd's merge ``ratio``): set to 1 - budget.
#: Skip methods (ftp, shortgpt, skip-rank, skip-random) take ``sparsity``, the share of token-block
#: computations skipped, so a budget (the share kept) sets ``sparsity = 1 - budget`` too.
BUDGET_REMOVED = {"tome-sd"}
BUDGET_FIELD_FALLBACK = ("keep_ratio", "budget", "flops_budget", "target_ratio", "sparsity")
#: Methods whose size comes from their checkpoint (APTP's router picks a width per prompt): the
#: row records the budget, the config does not take it (run them with a single budget).
BUDGET_FREE = {"aptp"}


def budget_is_removed(method: str) -> bool:
    return method in BUDGET_REMOVED or budget_field(method) == "sparsity"


# ---- method specs ------------------------------------------------------------------------
def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``"layer=[1,2],keep=0.5"`` -> two parts."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


@dataclass
class MethodSpec:
    """A method name plus config overrides: ``"fastv"``, ``"fastv:layer=2,protect_last=8"``,
    ``"tome:layer=[1,2,3]"`` (values are JSON when they parse as JSON, else strings)."""

    name: str
    overrides: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: "str | MethodSpec") -> "MethodSpec":
        if isinstance(spec, MethodSpec):
            return spec
        name, _, rest = str(spec).partition(":")
        overrides = {}
        for part in filter(None, _split_top(rest)):
            key, eq, val = part.partition("=")
            if not eq:
                raise TokenPruneError(f"method spec {spec!r}: expected key=value, got {part!r}")
            overrides[key.strip()] = _value(val.strip())
        return cls(name.strip(), overrides)

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.overrides.items()) + ")"


def budget_field(method: str) -> str:
    if method in BUDGET_FIELDS:
        return BUDGET_FIELDS[method]
    cls = _REGISTRY.get(method)
    if cls is None:
        raise TokenPruneError(f"unknown pruning method {method!r}; registered: {', '.join(list_pruners())}")
    names = {f.name for f in dataclasses.fields(cls)}
    for f in BUDGET_FIELD_FALLBACK:
        if f in names:
            return f
    raise TokenPruneError(f"{method}: no budget field known (add it to tokenprune.evals.runner.BUDGET_FIELDS)")


def method_config(task: Task, spec: MethodSpec, budget: float) -> dict:
    """Config of one grid cell: the task's defaults for the method, the spec's overrides, the budget."""
    if spec.name in BUDGET_FREE:
        return {**task.method_defaults(spec.name), **spec.overrides}
    value = round(1 - budget, 10) if budget_is_removed(spec.name) else budget
    config = {**task.method_defaults(spec.name), **spec.overrides, budget_field(spec.name): value}
    if budget_field(spec.name) == "sparsity":  # a skip method: the task may move it to equal compute
        probe = build_pruner(spec.name, **{**config, "sparsity": 0.0})  # (0: no schedule to look up)
        config["sparsity"] = task.skip_sparsity(value, probe.spares_generated)
    return config


# ---- one measurement ---------------------------------------------------------------------
@dataclass
class Measurement:
    output: EvalOutput
    meter: Meter
    eval_s: float
    latency_s: float | None
    latency_min_s: float | None
    peak_mem_bytes: int | None
    mem_method: str | None
    latency_dense_s: float | None = None  # the dense model timed interleaved with this one

    @property
    def flops(self) -> int:
        return self.meter.flops


def measure(task: Task, handle=None, repeats: int = 3, memory: bool = True) -> Measurement:
    """Quality pass over the task's subset (FLOPs counted per call), then latency and memory of one probe call.

    The quality pass is the warm-up of the latency measurement (same model, same first batch).
    """
    meter = Meter(task.model, handle, analytic=task.flops_source == "analytic-decoder")
    t0 = time.perf_counter()
    out = task.evaluate(meter, handle)
    eval_s = time.perf_counter() - t0
    lat = {"median_s": None, "min_s": None}
    if repeats > 0:
        lat = latency(task.probe(handle), repeats=repeats, device=task.device, warmup=0)
    mem = peak_memory(task.probe(handle), device=task.device) if memory else {"peak_bytes": None, "method": None}
    return Measurement(out, meter, eval_s, lat["median_s"], lat["min_s"], mem["peak_bytes"], mem["method"])


def paired_latency(task: Task, pruner, repeats: int) -> dict:
    """Dense and pruned probe calls timed alternately, so both see the same background load.

    Attaching and removing the pruner between the two calls is outside the timed region.
    Both are warm: the dense and the pruned quality passes ran before.
    """
    dense, pruned = [], []
    for _ in range(max(1, repeats)):
        dense.append(time_call(task.probe(None), task.device))
        handle = attach(task, pruner)
        try:
            pruned.append(time_call(task.probe(handle), task.device))
        finally:
            handle.remove()
    return {"dense_median_s": statistics.median(dense), "median_s": statistics.median(pruned), "min_s": min(pruned)}


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _row_base(task: Task, method: str, label: str, budget, config) -> dict:
    return {"model": task.name, "task": task.task, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "method": method, "label": label, "budget": budget, "config": config, "status": "ok", "reason": "",
            "device": str(task.device), "limit": task.limit, "seed": task.seed}


def result_row(task: Task, m: Measurement, dense: Measurement | None, method="dense", label="dense", budget=None,
               config=None) -> dict:
    ref = dense or m
    row = _row_base(task, method, label, budget, config)
    q = m.output.quality
    row.update(quality=q, quality_delta=q - ref.output.quality)
    if m.output.predictions is not None and ref.output.predictions is not None:
        row["agreement"] = top1_agreement(m.output.predictions, ref.output.predictions)
    else:
        row["agreement"] = None
    if m.output.features is not None and ref.output.features is not None:
        row["cosine"] = mean_cosine(m.output.features, ref.output.features)
    else:
        row["cosine"] = None
    meter, dmeter = m.meter, ref.meter
    row.update(
        flops=m.flops, flops_rel=_ratio(m.flops, ref.flops), flops_source=task.flops_source,
        flops_counted=meter.flops_counted, flops_counted_rel=_ratio(meter.flops_counted, dmeter.flops_counted),
    )
    row.update(adapter_flops=meter.adapter_flops if meter.has_stats else None,
               adapter_dense_flops=meter.adapter_dense_flops if meter.has_stats else None)
    if meter.has_stats and meter.dense_kv_bytes and dmeter.has_stats:
        kv, dkv = meter.kv_bytes / max(meter.calls, 1), dmeter.kv_bytes / max(dmeter.calls, 1)
        row.update(kv_bytes=kv, kv_rel=_ratio(kv, dkv))
    else:
        row.update(kv_bytes=None, kv_rel=None)
    row.update(
        latency_s=m.latency_s, latency_min_s=m.latency_min_s,
        latency_dense_s=m.latency_dense_s if m.latency_dense_s is not None else ref.latency_s,
        latency_rel=_ratio(m.latency_s, m.latency_dense_s if m.latency_dense_s is not None else ref.latency_s),
        peak_mem_bytes=m.peak_mem_bytes, peak_mem_rel=_ratio(m.peak_mem_bytes, ref.peak_mem_bytes),
        mem_method=m.mem_method, n_items=m.output.n_items, calls=meter.calls, eval_s=round(m.eval_s, 3),
    )
    if meter.tokens_per_layer is not None:
        row["tokens_per_layer"] = meter.tokens_per_layer
    row.update(m.output.extra)
    return row


def failed_row(task: Task, status: str, reason: str, method="dense", label="dense", budget=None, config=None) -> dict:
    row = _row_base(task, method, label, budget, config)
    row.update(status=status, reason=reason)
    return row


def attach(task: Task, pruner):
    """``tp.prune`` on the first of the task's prune targets that an adapter supports."""
    from ..handle import prune

    reasons = []
    for target in task.prune_targets():
        try:
            return prune(target, pruner)
        except UnsupportedModelError as e:
            reasons.append(str(e))
    raise UnsupportedModelError(" | ".join(dict.fromkeys(reasons)))


# ---- the grid ----------------------------------------------------------------------------
def run_grid(tasks, methods=("fastv", "random"), budgets=(0.75, 0.5, 0.25), out: str | None = None,
             repeats: int = 3, memory: bool = True, progress: bool = True, limit: int | None = None,
             seed: int = 0, device=None, log=None, meta: dict | None = None,
             task_options: dict | None = None) -> list[dict]:
    """Run dense + every (method, budget) on every task; returns the rows (and writes them to ``out``).

    ``tasks``: :class:`~tokenprune.evals.tasks.Task` objects or zoo model names (built with
    ``limit``, ``seed``, ``device`` and ``task_options[name]``, e.g. ``{"tiny-llava": {"kinds":
    ["size"]}}``). ``methods``: names or ``"name:key=value,..."`` specs.
    A method the engine cannot attach (``UnsupportedModelError``) gives a ``skipped`` row, an
    invalid config or input (``TokenPruneError``) an ``error`` row, a missing model an
    ``unavailable`` row; the grid goes on. Other exceptions are bugs and propagate (rows so far
    are written first).
    """
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg) if progress else print(msg, flush=True))
    specs = [MethodSpec.parse(m) for m in methods]
    budgets = [float(b) for b in budgets]
    task_options = task_options or {}
    tasks = [t if isinstance(t, Task) else make_task(t, limit=limit, seed=seed, device=device, progress=progress,
                                                     **task_options.get(t, {}))
             for t in tasks]
    rows: list[dict] = []
    started = time.time()
    meta = {**(meta or {}), **environment(), "methods": [s.label for s in specs], "budgets": budgets,
            "repeats": repeats, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))}
    total = len(tasks) * (1 + len(specs) * len(budgets))
    bar = tqdm(total=total, desc="eval grid", position=0, dynamic_ncols=True, disable=not progress)

    def emit(row):
        rows.append(row)
        bar.update(1)
        log(format_row(row))
        if out:
            write_tables(rows, out, {**meta, "elapsed_s": round(time.time() - started, 1)})

    try:
        for task in tasks:
            bar.set_description(f"eval {task.name}: setup")
            try:
                task.setup()
            except TaskUnavailable as e:
                emit(failed_row(task, "unavailable", str(e)))
                bar.update(len(specs) * len(budgets))
                continue
            meta.setdefault("tasks", []).append(task.describe())
            bar.set_description(f"eval {task.name}: dense")
            dense = measure(task, None, repeats, memory)
            emit(result_row(task, dense, None))
            for spec in specs:
                for b in budgets:
                    bar.set_description(f"eval {task.name}: {spec.label} @ {b:g}")
                    config = None
                    try:
                        config = method_config(task, spec, b)
                        pruner = build_pruner(spec.name, **config)
                        config = pruner.to_dict()
                        handle = attach(task, pruner)
                    except UnsupportedModelError as e:
                        emit(failed_row(task, "skipped", str(e), spec.name, spec.label, b, config))
                        continue
                    except TokenPruneError as e:
                        emit(failed_row(task, "error", str(e), spec.name, spec.label, b, config))
                        continue
                    try:
                        m = measure(task, handle, 0, memory)
                    except TokenPruneError as e:
                        emit(failed_row(task, "error", str(e), spec.name, spec.label, b, config))
                        continue
                    finally:
                        handle.remove()
                    if repeats > 0:
                        lat = paired_latency(task, pruner, repeats)
                        m.latency_s, m.latency_min_s = lat["median_s"], lat["min_s"]
                        m.latency_dense_s = lat["dense_median_s"]
                    emit(result_row(task, m, dense, spec.name, spec.label, b, config))
    finally:
        bar.close()
        if out:
            meta["elapsed_s"] = round(time.time() - started, 1)
            write_outputs(rows, out, meta)
    return rows


def environment() -> dict:
    import transformers

    return {"tokenprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ---- outputs -----------------------------------------------------------------------------
CSV_COLUMNS = ["model", "task", "metric", "higher_is_better", "method", "label", "budget", "status", "reason",
               "quality", "quality_delta", "agreement", "cosine", "flops", "flops_rel", "flops_source",
               "flops_counted", "flops_counted_rel", "kv_bytes", "kv_rel", "latency_s", "latency_rel", "latency_min_s",
               "latency_dense_s",
               "peak_mem_bytes", "peak_mem_rel", "mem_method", "n_items", "calls", "eval_s", "device", "limit",
               "seed", "adapter_flops", "adapter_dense_flops", "config"]


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (torch.Tensor,)):
        return v.tolist()
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return v.item()
    return v


def write_tables(rows: list[dict], out: str, meta: dict) -> None:
    os.makedirs(out, exist_ok=True)
    clean = [{k: _jsonable(v) for k, v in r.items()} for r in rows]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": clean}, f, indent=1)
    extra = [k for r in clean for k in r if k not in CSV_COLUMNS and k != "tokens_per_layer"]
    columns = CSV_COLUMNS + list(dict.fromkeys(extra))
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in clean:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})


def write_outputs(rows: list[dict], out: str, meta: dict) -> None:
    write_tables(rows, out, meta)
    if any(r["status"] == "ok" for r in rows):
        plot_accuracy_vs_flops(rows, os.path.join(out, "accuracy_vs_flops.png"))


def plot_accuracy_vs_flops(rows: list[dict], path: str) -> str:
    """One panel per model: a line per method (quality vs FLOPs relative to dense), the dense point as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    cols = min(len(models), 3)
    nrows = math.ceil(len(models) / cols)
    most = max(len({r["label"] for r in ok if r["model"] == m}) for m in models)
    # legend under each panel, so it never hides points
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, (4.4 + 0.2 * most) * nrows), squeeze=False)
    markers = "osD^vP*X"
    for ax, model in zip(axes.flat, models):
        mrows = [r for r in ok if r["model"] == model]
        dense = next((r for r in mrows if r["method"] == "dense"), None)
        labels = list(dict.fromkeys(r["label"] for r in mrows if r["method"] != "dense"))
        for i, label in enumerate(labels):
            pts = sorted((r for r in mrows if r["label"] == label and r["flops_rel"] is not None),
                         key=lambda r: r["flops_rel"])
            if not pts:
                continue
            xs, ys = [r["flops_rel"] for r in pts], [r["quality"] for r in pts]
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=label)
            for r in pts:
                ax.annotate(f"{r['budget']:g}", (r["flops_rel"], r["quality"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color="0.35")
        if dense is not None:
            ax.plot([1.0], [dense["quality"]], marker="*", markersize=14, color="black", linestyle="none",
                    label=f"dense ({dense['quality']:.4g})")
            ax.axhline(dense["quality"], color="black", linewidth=0.6, linestyle=":")
        first = mrows[0]
        direction = "higher" if first["higher_is_better"] else "lower"
        ax.set_title(f"{model}: {first['task']} ({first['n_items']} items, seed {first['seed']})", fontsize=10)
        ax.set_xlabel(f"FLOPs relative to dense ({first['flops_source']})")
        ax.set_ylabel(f"{first['metric']} ({direction} is better)")
        values = [r["quality"] for r in mrows if r["quality"] is not None and r["quality"] > 0]
        if values and max(values) > 20 * min(values):  # e.g. perplexities from 13 to 7e4: log, or all on one line
            ax.set_yscale("log")
            ax.set_ylabel(f"{first['metric']} ({direction} is better, log scale)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, title="method (labels: budget)", title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(0.0, -0.14))
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_row(r: dict) -> str:
    head = f"{r['model']:<14} {r['label']:<12} {('-' if r['budget'] is None else format(r['budget'], 'g')):>5}"
    if r["status"] != "ok":
        return f"{head}  {r['status'].upper()}: {r['reason']}"
    mem = None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20
    return (f"{head}  {r['metric']} {_fmt(r['quality'], '.4f')}  agree {_fmt(r['agreement'], '.3f')}  "
            f"cos {_fmt(r['cosine'], '.4f')}  FLOPs {_fmt(r['flops_rel'], '.3f')}  KV {_fmt(r['kv_rel'], '.3f')}  "
            f"latency {_fmt(r['latency_s'], '.3f')}s ({_fmt(r['latency_rel'], '.2f')})  "
            f"mem {_fmt(mem, '.1f')}MiB ({_fmt(r['peak_mem_rel'], '.2f')})")


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (for READMEs / reports)."""
    head = ("| model | method | budget | quality | agreement | cosine | FLOPs rel | KV rel | latency s (rel) "
            "| peak mem MiB (rel) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        b = "-" if r["budget"] is None else f"{r['budget']:g}"
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['label']} | {b} | {r['status']}: {r['reason']} |" + " |" * 6)
            continue
        mem = None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20
        lines.append(
            f"| {r['model']} | {r['label']} | {b} | {r['metric']} {_fmt(r['quality'], '.3f')} | "
            f"{_fmt(r['agreement'], '.3f')} | {_fmt(r['cosine'], '.4f')} | {_fmt(r['flops_rel'], '.3f')} | "
            f"{_fmt(r['kv_rel'], '.3f')} | {_fmt(r['latency_s'], '.3f')} ({_fmt(r['latency_rel'], '.2f')}) | "
            f"{_fmt(mem, '.1f')} ({_fmt(r['peak_mem_rel'], '.2f')}) |")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------
DESCRIPTION = """\
Evaluate token-pruning methods against the dense model: a grid of models x methods x budgets.

For every model the dense model runs first, then every (method, budget). Each row holds
  quality    the model's task metric on a fixed, seeded subset (--limit items, --seed)
  fidelity   agreement: share of discrete predictions equal to the dense model's
             (next tokens / classes / answers); cosine: mean cosine similarity of output
             vectors to the dense model's (last-token logits / class logits / embeddings)
  cost       FLOPs over the subset, KV-cache bytes per request, latency (median of --repeats
             calls of the first batch; each pruned config is timed interleaved with the dense
             model, dense/pruned/dense/..., so both see the same background load) and peak
             memory of that call, absolute and relative to dense.

models (task, quality metric, where the FLOPs come from):
  smollm2-135m  perplexity of 128 held tokens (Python's docs) after a 512-token context that
                the pruner may reduce; lower is better. FLOPs: exact analytic count of the
                decoder layers (handle.stats; the same formula for the dense run).
  tiny-vit      Fashion-MNIST top-1 accuracy. FLOPs: torch.utils.flop_counter (all ops).
  tiny-clip     zero-shot Fashion-MNIST top-1 accuracy (image tower pruned). FLOPs: flop_counter.
  tiny-llava    easy-vqa exact-match accuracy, greedy generate; pruners default to the visual
                tokens (segment=visual) at each method's own default layer. FLOPs: analytic,
                language model layers.
  tiny-t2i      prompt faithfulness of generated images (judged color and shape match the
                prompt), plus Frechet distances to real images and to the dense model's images;
                pruners attach to pipe.unet. FLOPs: flop_counter (whole pipeline calls).
  Models whose weights or loader are missing here are reported as 'unavailable'.

methods and budgets:
  --methods takes registered method names (`tokenprune methods`), optionally with config
  overrides: fastv:layer=2,protect_last=8 or tome:layer=[1,2,3] (JSON values).
  A budget is the share of prunable tokens KEPT. It sets the method's keep_ratio (fastv,
  random, tome, zero-tprune: any method with a keep_ratio field): the share of candidate
  tokens kept at each listed layer. Candidates are the pruned segment's tokens minus the
  protected first/last prompt tokens; the reduced set is used from `layer` on.
  Defaults per model: smollm2-135m layer = depth/8 (4 of 30 layers), segment text (the
  context; the scored tokens are never pruned); tiny-vit / tiny-clip segment visual (patches;
  CLS is never pruned), the method's own layer; tiny-llava layer 2, segment visual.
  Relative FLOPs are therefore above the budget: layers before `layer`, protected and
  scored tokens stay dense. A method the engine cannot attach to a model is recorded as
  'skipped' with the reason, an invalid config or input as 'error'; the grid goes on.

outputs (in --out):
  results.json          every row plus run metadata (versions, device, task settings, time)
  results.csv           the same rows, one per line
  accuracy_vs_flops.png one panel per model: quality vs FLOPs relative to dense, one line
                        per method (points labelled with their budget), dense as a star
"""

EPILOG = """\
measurement notes (details: evals/metrics.py, i.e. tokenprune.evals.metrics):
  peak memory: CUDA max_memory_allocated on a GPU; on the CPU, the peak size of the tensors
  created during the call and alive together (RSS / tracemalloc cannot see this reliably).
  FLOPs: flop_counter plus a formula for the CPU SDPA kernel, which the stock counter skips.
  On a busy shared CPU use --threads 1: several threads waiting for each other make
  latencies swing by 5x.

examples:
  tokenprune eval --model smollm2-135m --methods fastv random --budgets 0.75 0.5 0.25 \\
                  --limit 8 --threads 1 --out results/smollm2
  tokenprune eval --model tiny-vit tiny-clip --methods zero-tprune tome random --budgets 0.5 0.25
  tokenprune eval --model tiny-llava --kinds position size --weights DIR --methods random visionzip \\
                  --budgets 0.1 0.05
  tokenprune eval --list
"""


def build_parser(prog: str = "tokenprune eval") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--models", nargs="+", dest="models", metavar="NAME",
                    help=f"zoo model(s) to evaluate: {', '.join(TASKS)}")
    ap.add_argument("--methods", nargs="+", default=["fastv", "random"], metavar="SPEC",
                    help="pruning methods, NAME or NAME:key=value,... (default: fastv random)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5, 0.25], metavar="B",
                    help="share of prunable tokens kept, in [0, 1] (default: 0.75 0.5 0.25)")
    ap.add_argument("--out", default=None, help="output folder (default: results/<first model>)")
    ap.add_argument("--limit", type=int, default=None,
                    help="subset size: text blocks / images / questions / prompts "
                         "(default per model: smollm2 16, vit/clip 1000, llava 128, t2i 24)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats for latency; 0 skips it (default 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice). On a busy shared CPU, 1 thread gives "
                         "far steadier latencies than several threads waiting for each other")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--list", action="store_true", help="list models (with availability) and methods, then exit")
    ap.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                    help="tiny-llava: question kinds (easy-vqa, position, size; default easy-vqa); tiny-t2i: "
                         "prompt kinds (color-shape, size, position, size-position; default color-shape), "
                         "see tokenprune.zoo.vqa_data.easy_vqa_items")
    ap.add_argument("--weights", default=None, metavar="DIR",
                    help="tiny-llava only: load the model from this folder instead of the shipped weights")
    return ap


def _list() -> None:
    from .tasks import zoo_names

    have = set(zoo_names())
    print("models:")
    for name in TASKS:
        t = make_task(name, progress=False)
        status = "loader registered" if name in have else "no loader in tp.zoo yet"
        print(f"  {name:<14} {t.task:<26} {t.metric:<22} {status}")
    print("methods (budget field):")
    for m in list_pruners():
        if m in BUDGET_FREE:
            print(f"  {m:<14} none (its checkpoint sets the size; the budget is only recorded)")
            continue
        print(f"  {m:<14} {budget_field(m)}" + (" (1 - budget: the share removed)" if budget_is_removed(m) else ""))


def main(argv=None, prog: str = "tokenprune eval"):
    args = build_parser(prog).parse_args(argv)
    if args.list:
        _list()
        return 0
    if not args.models:
        build_parser(prog).error("--model is required (see --list)")
    for m in args.models:
        if m not in TASKS:
            build_parser(prog).error(f"unknown model {m!r}; choose from {', '.join(TASKS)}")
    for b in args.budgets:
        if not 0.0 <= b <= 1.0:
            build_parser(prog).error(f"budgets must be in [0, 1], got {b}")
    if args.kinds and args.models == ["tiny-t2i"]:  # prompt kinds of the text-to-image task
        from ..zoo.t2i import KINDS as T2I_KINDS

        bad = [k for k in args.kinds if k not in T2I_KINDS]
        if bad:
            build_parser(prog).error(f"unknown --kinds {bad}; choose from {', '.join(T2I_KINDS)}")
    llava = {k: v for k, v in (("kinds", args.kinds), ("weights", args.weights)) if v}
    t2i = {"tiny-t2i": {"kinds": llava.pop("kinds")}} if args.models == ["tiny-t2i"] and args.kinds else {}
    if llava and args.models != ["tiny-llava"]:
        build_parser(prog).error("--kinds / --weights apply to --model tiny-llava (or --kinds to tiny-t2i) alone")
    if args.kinds and not t2i:
        from ..zoo.vqa_data import KINDS

        bad = [k for k in args.kinds if k not in KINDS]
        if bad:
            build_parser(prog).error(f"unknown --kinds {bad}; choose from {', '.join(KINDS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("results", args.models[0])
    meta = {"command": shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])}
    t0 = time.perf_counter()
    rows = run_grid(args.models, args.methods, args.budgets, out=out, repeats=args.repeats,
                    memory=not args.no_memory, progress=not args.no_progress, limit=args.limit, seed=args.seed,
                    device=device, meta=meta, task_options={"tiny-llava": llava} if llava else (t2i or None))
    print()
    print(markdown_table(rows))
    print(f"\nwrote {out}/results.json, results.csv, accuracy_vs_flops.png in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    main(prog="python -m tokenprune.evals.runner")
