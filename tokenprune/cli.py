"""The ``tokenprune`` command: ``run``, ``eval``, ``bench``, ``lm-eval``, ``calibrate``, ``methods``, ``models``.

Each subcommand is one entry of :data:`COMMANDS` (name -> (help, handler(argv, prog))), so a
new one is a function and a line. Bad input exits with status 2 and one line naming the
problem (the library's ``TokenPruneError`` message), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

RUN_DESCRIPTION = """\
Run one input through a bundled model (or a local model directory) dense and pruned, and
print both answers, the pruned call's stats (tokens per layer, FLOPs, KV bytes) and the time
next to the dense model's.

  LLM   (smollm2-135m, or a local causal-LM directory): --prompt TEXT
  LVLM  (tiny-llava): --prompt QUESTION and an easy-vqa test image (--image test:N or a file)
  ViT   (tiny-vit, tiny-clip): an image (--image test:N picks a Fashion-MNIST test image, or a
        file); tiny-clip classifies zero-shot among --labels (default: Fashion-MNIST's classes)
  T2I   (tiny-t2i): --prompt "a red circle" (a color and a shape); the judge reads both images;
        --save-images DIR writes dense.png and pruned.png

The method takes options as in `tokenprune eval`: NAME or NAME:key=value,... (JSON values);
--layer and --keep-ratio set the two most used ones. Defaults fit the model: LLMs prune the
prompt ("text") from 1/8 of the depth, ViTs and LVLMs the image patches ("visual").
"""

RUN_EPILOG = """\
examples:
  tokenprune run --model smollm2-135m --method fastv --keep-ratio 0.5 \\
                 --prompt "Summarise: Python is a programming language that ..."
  tokenprune run --model tiny-vit --method zero-tprune:layer=[2,4] --keep-ratio 0.5 --image test:0
  tokenprune run --model tiny-clip --method tome --image test:3 --labels "sneaker,bag,dress" --json

times: the prefill (LLM, LVLM) or the forward (ViT) is timed dense and pruned in turns
(--repeats pairs, medians); on a busy CPU use --threads 1 for steadier numbers.
"""


class UsageError(Exception):
    """Bad command-line input found after parsing (exit status 2)."""


def _image(arg: str | None, kind: str):
    from .evals.compare import sample_image

    if arg is None or arg.startswith("test:"):
        index = arg.partition(":")[2] if arg else "0"
        if not index.isdigit():
            raise UsageError(f"--image test:N needs a number, got {arg!r}")
        return sample_image(kind, int(index))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(arg) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"cannot read image {arg!r}: {e}") from None


def _layer(text: str):
    value = json.loads(text) if text.strip().startswith("[") else int(text)
    if isinstance(value, list):
        return tuple(value)
    return value


_layer.__name__ = "layer (an integer or a JSON list)"


def run_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=RUN_DESCRIPTION, epilog=RUN_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, metavar="NAME|DIR",
                    help="bundled model (`tokenprune models`) or a local model directory")
    ap.add_argument("--method", default="fastv", metavar="SPEC",
                    help="pruning method, NAME or NAME:key=value,... (default: fastv; `tokenprune methods`)")
    ap.add_argument("--layer", type=_layer, default=None, metavar="L",
                    help="first layer that runs on the reduced set, or a JSON list like [2,4]")
    ap.add_argument("--keep-ratio", "--budget", type=float, default=None, dest="keep_ratio", metavar="R",
                    help="share of prunable tokens kept, in [0, 1] (default: the method's own)")
    ap.add_argument("--prompt", default=None, help="the prompt (LLM) or question (LVLM)")
    ap.add_argument("--image", default=None, metavar="PATH|test:N",
                    help="image file, or test:N for the N-th bundled test image (default test:0)")
    ap.add_argument("--labels", default=None, help="tiny-clip: comma-separated class names")
    ap.add_argument("--steps", type=int, default=25, help="tiny-t2i: denoising steps (default 25)")
    ap.add_argument("--seed", type=int, default=0, help="tiny-t2i: sampling seed (default 0)")
    ap.add_argument("--save-images", default=None, metavar="DIR", help="tiny-t2i: write dense.png, pruned.png")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="LLM / LVLM answer length (default 32)")
    ap.add_argument("--no-chat", action="store_true", help="LLM: send the prompt as is, without the chat template")
    ap.add_argument("--repeats", type=int, default=3, help="timed dense/pruned pairs (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap


def cmd_run(argv, prog):
    args = run_parser(prog).parse_args(argv)
    if args.keep_ratio is not None and not 0.0 <= args.keep_ratio <= 1.0:
        raise UsageError(f"--keep-ratio must be in [0, 1], got {args.keep_ratio}")
    if args.max_new_tokens < 1 or args.repeats < 1:
        raise UsageError("--max-new-tokens and --repeats must be at least 1")
    import torch

    from .evals import compare
    from .evals.runner import MethodSpec
    from .pruner import build_pruner, list_pruners

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = MethodSpec.parse(args.method)
    if spec.name not in list_pruners():
        raise UsageError(f"unknown method {spec.name!r}; registered: {', '.join(list_pruners())}")
    loaded = compare.load_model(args.model)
    if loaded.kind in ("llm", "lvlm", "t2i") and not args.prompt:
        raise UsageError(f"{args.model} needs --prompt")
    config = {**compare.method_defaults(loaded, spec.name), **spec.overrides}
    if args.layer is not None:
        config["layer"] = args.layer
    if args.keep_ratio is not None:  # ToMe-SD calls its budget `ratio` (the share merged away)
        config["ratio" if "ratio" in compare.config_fields(spec.name) else "keep_ratio"] = args.keep_ratio
    pruner = build_pruner(spec.name, **config)
    if loaded.kind == "llm":
        result = compare.compare_llm(loaded.model, loaded.processor, pruner, args.prompt, args.max_new_tokens,
                                     chat=not args.no_chat, repeats=args.repeats)
    elif loaded.kind == "t2i":
        result = compare.compare_t2i(loaded.model, loaded.processor, pruner, args.prompt, args.steps, args.seed)
        images = {k: result.pop(f"{k}_image") for k in ("dense", "pruned")}
        if args.save_images:
            import os

            os.makedirs(args.save_images, exist_ok=True)
            for k, im in images.items():
                im.save(os.path.join(args.save_images, f"{k}.png"))
    elif loaded.kind == "lvlm":
        result = compare.compare_lvlm(loaded.model, loaded.processor, pruner, _image(args.image, "lvlm"),
                                      args.prompt, args.max_new_tokens, repeats=args.repeats)
    else:
        labels = args.labels.split(",") if args.labels else None
        pixels, forward, labels = compare.classifier_inputs(loaded, _image(args.image, loaded.kind), labels)
        result = compare.compare_classifier(loaded.model, forward, pixels, labels, pruner, repeats=args.repeats)
    result = {"model": args.model, **result}
    if args.json:
        result.pop("tokens", None)
        print(json.dumps(result, indent=1))
    else:
        print(format_run(result))
    return 0


def format_run(r: dict) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in r["pruner"].items() if k != "name")
    lines = [f"model: {r['model']}    pruner: {r['pruner']['name']}({cfg})"]
    if r["kind"] in ("llm", "lvlm"):
        lines += [f"prompt: {r['prompt_tokens']} tokens", "", "--- dense answer ---", r["dense_answer"], "",
                  "--- pruned answer ---", r["pruned_answer"], ""]
    elif r["kind"] == "t2i":
        lines += [f"prompt: {r['prompt']}", f"the judge reads the dense image as:  {r['dense_reads']}",
                  f"the judge reads the pruned image as: {r['pruned_reads']}", ""]
    else:
        top = lambda rows: ", ".join(f"{name} {p:.1%}" for name, p in rows)  # noqa: E731
        lines += ["", f"dense top classes:  {top(r['dense_top'])}", f"pruned top classes: {top(r['pruned_top'])}", ""]
    lines.append("stats: " + r["stats"]["summary"])
    t = r["time"]
    lines.append(f"time ({t['what']}): pruned {t['pruned_s'] * 1e3:.1f} ms vs dense {t['dense_s'] * 1e3:.1f} ms "
                 f"({t['speedup']:.2f}x)")
    return "\n".join(lines)


def cmd_eval(argv, prog):
    from .evals.runner import main as run_eval

    return run_eval(argv, prog=prog)


def cmd_bench(argv, prog):
    from .evals.bench import main as bench

    return bench(argv)


def cmd_calibrate(argv, prog):
    from .calibrate import main as calibrate

    return calibrate(argv, prog=prog)


def cmd_lm_eval(argv, prog):
    from .evals.lm_eval_model import main as lm_eval_main

    return lm_eval_main(argv)


def _listing(what):
    def cmd(argv, prog):
        argparse.ArgumentParser(prog=prog, description=f"List {what}, one per line.").parse_args(argv)
        import tokenprune as tp

        print("\n".join(tp.list_pruners() if what == "registered pruning methods" else tp.zoo.names()))
        return 0

    return cmd


#: name -> (one-line help, handler(argv, prog) -> exit status). Add a subcommand here.
COMMANDS = {
    "run": ("one prompt / image through a pruned model: answers, stats, time vs dense", cmd_run),
    "eval": ("quality / fidelity / cost of methods x budgets vs dense, with plots", cmd_eval),
    "bench": ("speed benchmarks (llm prefill, vit throughput)", cmd_bench),
    "lm-eval": ("lm-evaluation-harness with the `tokenprune` model type registered", cmd_lm_eval),
    "calibrate": ("tune a method's schedule on calibration data (vflowopt: optuna study)", cmd_calibrate),
    "methods": ("list registered pruning methods", _listing("registered pruning methods")),
    "models": ("list bundled offline models (tp.zoo)", _listing("bundled offline models")),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="tokenprune", description="Token pruning for transformers models.",
                                 epilog="`tokenprune COMMAND --help` describes each command.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, _) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    if not argv:
        ap.print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        ap.parse_args(argv[:1])  # --help (status 0) or "invalid choice" (status 2)
    name, rest = argv[0], argv[1:]
    prog = f"tokenprune {name}"
    from .errors import TokenPruneError

    try:
        status = COMMANDS[name][1](rest, prog)
    except (TokenPruneError, UsageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
