"""Where learned method modules live (ATP heads, FTP and APTP routers): a shipped testbed's
``zoo/weights/<name>/<method>/`` folder by name, or a path the user gives."""
from __future__ import annotations

import json
import os

from ..errors import TokenPruneError

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoo", "weights")


def is_name(checkpoint: str) -> bool:
    return os.sep not in checkpoint and "/" not in checkpoint


def shipped(method: str, file: str) -> list[str]:
    """Testbed names that ship ``<name>/<method>/<file>``."""
    return sorted(d for d in os.listdir(WEIGHTS_DIR) if os.path.isfile(os.path.join(WEIGHTS_DIR, d, method, file)))


def checkpoint_file(method: str, checkpoint: str, file: str) -> str:
    """A shipped name's ``<method>/<file>``, or a path (the file, or a folder holding it)."""
    own = os.path.join(WEIGHTS_DIR, checkpoint, method, file)
    if is_name(checkpoint) and os.path.isfile(own):
        return own
    path = os.path.join(checkpoint, file) if os.path.isdir(checkpoint) else checkpoint
    if not os.path.isfile(path):
        raise TokenPruneError(f"{method}: no checkpoint {checkpoint!r}: give a path to an {file} or a shipped "
                              f"testbed name ({', '.join(shipped(method, file)) or 'none shipped'})")
    return path


def read_safetensors(method: str, path: str) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a checkpoint; anything unreadable is the library's error."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not a safetensors file
        raise TokenPruneError(f"{method}: cannot read checkpoint {path}: {e}") from None


def write_safetensors(module, path: str, info: dict, meta: dict) -> None:
    """Save ``module``'s tensors with ``info`` (the fields its loader checks) and JSON ``meta`` (card facts)."""
    from safetensors.torch import save_file

    metadata = {**info, **{k: json.dumps(v) for k, v in meta.items()}}
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, path, metadata=metadata)
