"""Sampler sweep for ``tiny-t2i``: faithfulness and Frechet distance per guidance scale and step count.

    .venv/bin/python -m tokenprune.evals.t2i_sweep --guidance 1.0 1.5 2.0 3.0 --steps 25 --limit 96 \\
        --threads 1 --out results/tiny-t2i/sampler_sweep.json

Every setting scores the same prompts (``t2i.eval_prompts(limit, kinds)``) from the same initial
noise (``t2i.t2i_scores``, batches of ``--batch-size``). ``--unet`` scores another U-Net folder (e.g. a
training run's output) with the shipped judge.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--steps", type=int, nargs="+", default=[25])
    ap.add_argument("--limit", type=int, default=96)
    ap.add_argument("--kinds", nargs="+", default=["color-shape"])
    ap.add_argument("--unet", default=None, help="U-Net folder (default: the shipped tiny-t2i)")
    ap.add_argument("--batch-size", type=int, default=48, help="prompts per pipeline call (t2i_scores' default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import tokenprune as tp
    from tokenprune.zoo import t2i

    pipe, judge = tp.zoo.load("tiny-t2i")
    if args.unet:
        from diffusers import UNet2DConditionModel

        pipe = t2i.build_pipeline(UNet2DConditionModel.from_pretrained(args.unet, local_files_only=True).eval(),
                                  pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    prompts = t2i.eval_prompts(args.limit, args.kinds)
    rows = []
    for steps in args.steps:
        for g in args.guidance:
            t0 = time.time()
            r = t2i.t2i_scores(pipe, prompts, judge, num_inference_steps=steps, guidance_scale=g,
                             batch_size=args.batch_size)
            r.update(steps=steps, guidance=g, seconds=round(time.time() - t0, 1))
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(command="python -m tokenprune.evals.t2i_sweep " + " ".join(
            argv if argv is not None else __import__("sys").argv[1:]), unet=args.unet or "shipped", rows=rows), indent=1))


if __name__ == "__main__":
    main()
