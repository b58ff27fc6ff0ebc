"""lm-evaluation-harness model type ``tokenprune``: any lm-eval task on a pruned model.

    python -m tokenprune.evals.lm_eval_model run --model tokenprune \\
        --model_args pretrained=smollm2-135m,pruner=fastv,layer=4,keep_ratio=0.5 \\
        --tasks tokenprune_facts tokenprune_qa --include_path evals/lm_eval_tasks
    tokenprune lm-eval run ...          # the same

    import lm_eval, tokenprune.evals.lm_eval_model   # the import registers the model type
    lm_eval.simple_evaluate(model="tokenprune", model_args="pretrained=smollm2-135m,pruner=fastv",
                            tasks=["tokenprune_facts"], task_manager=lm_eval.tasks.TaskManager(
                                include_path=tokenprune.evals.lm_eval_model.TASKS_DIR))

lm-eval 0.4 has no plugin discovery for model types, so its own ``lm_eval`` command only knows
``tokenprune`` when this module was imported: use the two commands above, which register it and
then run lm-eval's command line unchanged.

``model_args``: ``pretrained`` is a bundled model name (``tokenprune models``), a local causal-LM
directory, or (Python API) a loaded transformers model with ``tokenizer=`` beside it; ``pruner`` a registered method (``tokenprune methods``; none: the dense model); every
other key that is a config field of the method configures it (defaults as in ``tokenprune eval``:
layer = 1/8 of the depth, segment text). Requests run one at a time. Only the context of a
request is prunable: loglikelihood scores its continuation tokens, which are marked as
generated and never pruned; ``generate_until`` prunes the prompt as ``model.generate`` does.
``loglikelihood_rolling`` scores every token, so nothing is prunable there.

``lm.totals`` holds the summed FLOPs and KV bytes of all requests, pruned and dense. The pruner
is attached for each request only, under the model's lock, so a model shared with other
callers (``load_model`` caches bundled models) never runs pruned outside a request.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import TokenPruneError
from ..handle import pruning
from ..pruner import build_pruner
from ..state import Segment
from .compare import Loaded, load_model, method_defaults, model_lock
from .tasks import config_fields

#: the small offline tasks the repo ships (``--include_path``): tokenprune_facts, tokenprune_qa
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")

#: lm-eval passes these to every model type; one request at a time needs none of them
_HARNESS_KEYS = {"batch_size", "max_batch_size", "device"}


@register_model("tokenprune")
class TokenPruneLM(LM):
    def __init__(self, pretrained="smollm2-135m", pruner: str | None = None, max_length: int = 2048,
                 tokenizer=None, **options):
        super().__init__()
        options = {k: v for k, v in options.items() if k not in _HARNESS_KEYS}
        if pruner and set(options) - config_fields(pruner):
            raise TokenPruneError(f"{pruner}: unknown model_args {sorted(set(options) - config_fields(pruner))}; "
                                  f"its options are {sorted(config_fields(pruner))}")
        if not pruner and options:
            raise TokenPruneError(f"model_args {sorted(options)} need a pruner=NAME")
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise TokenPruneError("pass tokenizer= with a loaded model")
            loaded = Loaded(type(pretrained).__name__, "llm", pretrained, tokenizer)
        else:
            loaded = load_model(str(pretrained))
        if loaded.kind != "llm":
            raise TokenPruneError(f"{pretrained} is a {loaded.kind} model; the lm-eval model type needs an LLM")
        self.pruner = None
        if pruner:
            config = {**method_defaults(loaded, pruner), **options}
            if isinstance(config.get("layer"), str):  # "2;4" -> a schedule (commas separate model_args)
                config["layer"] = tuple(int(x) for x in config["layer"].split(";"))
            self.pruner = build_pruner(pruner, **config)
        self.model, self.tokenizer = loaded.model, loaded.processor
        self.max_length = int(max_length)
        self.totals = {"requests": 0, "flops": 0, "dense_flops": 0, "kv_bytes": 0, "dense_kv_bytes": 0}

    @contextmanager
    def _request(self):
        """One request: the model's lock, the pruner attached (yields its handle, or None), accounting."""
        with model_lock(self.model):
            if self.pruner is None:
                yield None
                self.totals["requests"] += 1
                return
            with pruning(self.model, self.pruner) as handle:
                yield handle
                stats = handle.stats
            self.totals["requests"] += 1
            if stats is not None:
                for k in ("flops", "dense_flops", "kv_bytes", "dense_kv_bytes"):
                    self.totals[k] += getattr(stats, k)

    @property
    def _start_id(self) -> int:
        """The token that stands for an empty context."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # ---- loglikelihood ------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, context_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
        ids = (context_ids + cont_ids)[-(self.max_length + 1):]
        n = len(cont_ids)
        if n == 0 or len(ids) <= n:
            raise TokenPruneError("a loglikelihood request needs a non-empty context and continuation")
        inp = torch.tensor([ids[:-1]])
        seg = torch.full(inp.shape, int(Segment.TEXT))
        if n > 1:  # continuation tokens in the input: scored, so never pruned
            seg[:, -(n - 1):] = int(Segment.GENERATED)
        kwargs = dict(use_cache=False, logits_to_keep=n)
        with self._request() as handle:
            if handle is not None:
                with handle.segments(seg):  # the scored tokens are never pruned
                    logits = self.model(inp, **kwargs).logits
            else:
                logits = self.model(inp, **kwargs).logits
        logp = logits[0, -n:].float().log_softmax(-1)
        target = torch.tensor(ids[-n:])
        ll = float(logp.gather(1, target[:, None]).sum())
        return ll, bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for req in self._bar(requests, disable_tqdm, "loglikelihood"):
            context, continuation = req.args
            # split like lm-eval's HF model: a trailing space of the context belongs to the continuation
            spaces = len(context) - len(context.rstrip())
            if spaces:
                continuation = context[-spaces:] + continuation
                context = context[:-spaces]
            whole, ctx = self._encode(context + continuation), self._encode(context)
            out.append(self._score(ctx or [self._start_id], whole[len(ctx):]))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for req in self._bar(requests, disable_tqdm, "loglikelihood_rolling"):
            ids = self._encode(req.args[0])
            total, start = 0.0, 0
            while start < len(ids):
                window = ids[start: start + self.max_length]
                context = [self._start_id] if start == 0 else ids[start - 1: start]
                total += self._score(context, window)[0]
                start += len(window)
            out.append(total)
        return out

    # ---- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in self._bar(requests, disable_tqdm, "generate_until"):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
            ids = self._encode(context)[-self.max_length:] or [self._start_id]
            inp = torch.tensor([ids])
            sample = dict(do_sample=True, temperature=temperature) if do_sample and temperature > 0 else {}
            with self._request():
                result = self.model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new,
                                             do_sample=bool(sample), pad_token_id=self.tokenizer.pad_token_id,
                                             **sample)
            text = self.tokenizer.decode(result[0, inp.shape[1]:], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out

    # ---- helpers ------------------------------------------------------------------------
    @staticmethod
    def _bar(requests, disable: bool, desc: str):
        from tqdm import tqdm

        return tqdm(requests, desc=f"tokenprune {desc}", disable=disable)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenprune").replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def main(argv=None):
    """lm-eval's own command line, with the ``tokenprune`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else list(argv)
    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    sys.exit(main())
