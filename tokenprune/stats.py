"""What a pruned call cost next to the dense model: tokens per layer, FLOPs, KV-cache bytes."""
from __future__ import annotations

from dataclasses import dataclass, field


def decoder_layer_flops(cfg, queries: int, keys: int) -> int:
    """FLOPs of one Llama-style decoder layer for ``queries`` new tokens over ``keys`` keys.

    Counts matmuls as 2*m*n*k, the convention of ``torch.utils.flop_counter`` (which also
    counts full, not causal, attention matrices); checked against it in the tests.
    """
    d = cfg.hidden_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    hq, hkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    proj = 2 * queries * d * hd * (2 * hq + 2 * hkv)  # q, o and k, v projections
    attn = 4 * queries * keys * hq * hd  # q k^T and p v
    mlp = 2 * queries * 3 * d * cfg.intermediate_size  # gate, up, down
    return proj + attn + mlp


def kv_bytes_per_token(cfg, dtype_bytes: int) -> int:
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * hkv * hd * dtype_bytes


@dataclass
class Stats:
    """Accounting of one request (a forward, or a whole ``generate``), readable from the handle.

    ``tokens_per_layer[l][b]``: real tokens of row b entering layer l at prefill.
    FLOPs cover the decoder layers (what pruning changes), summed over prefill and decode.
    """

    dense_tokens: list[int] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    flops: int = 0
    dense_flops: int = 0
    kv_bytes: int = 0
    dense_kv_bytes: int = 0
    forward_calls: int = 0
    vision: "Stats | None" = None  # an LVLM's vision tower, when a pruner targets it
    # where the token set changed at prefill: layer -> per row, the original positions entering it,
    # and the (source, target) original positions of tokens merged before it (for plots and the app)
    kept: dict[int, list[list[int]]] = field(default_factory=dict)
    merged: dict[int, list[list[tuple[int, int]]]] = field(default_factory=dict)
    codes: list[int] | None = None  # routed width pruning (APTP): the expert (code) of each row

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.dense_kv_bytes if self.dense_kv_bytes else 1.0

    @property
    def pruned_anything(self) -> bool:
        """False when every layer saw every token (the pruned call did the dense model's work).

        Judged by FLOPs where they are counted: a U-Net's layers hold fewer tokens at lower
        resolutions without any pruning.
        """
        if self.vision is not None and self.vision.pruned_anything:
            return True
        if self.dense_flops:
            return self.flops < self.dense_flops
        dense = sum(self.dense_tokens)
        return any(sum(row) < dense for row in self.tokens_per_layer)

    def summary(self) -> str:
        per_layer = [sum(row) for row in self.tokens_per_layer]
        text = (
            f"tokens/layer {per_layer} (dense {sum(self.dense_tokens)}), "
            f"FLOPs {self.flops / 1e9:.3f}G vs {self.dense_flops / 1e9:.3f}G ({self.flops_ratio:.1%})"
        )
        if self.dense_kv_bytes:  # encoders and U-Nets keep no KV cache
            text += f", KV {self.kv_bytes / 2**20:.2f} MiB vs {self.dense_kv_bytes / 2**20:.2f} MiB ({self.kv_ratio:.1%})"
        if self.codes is not None:
            text += f", code per row {self.codes}"
        if self.tokens_per_layer and not self.pruned_anything:
            # say why, or a user reads "100%" as a broken pruner
            text += (
                "\nnothing was pruned: every layer saw the dense model's tokens. Pruners reduce only their "
                "candidates: tokens of their segment minus the first protect_first and last protect_last prompt "
                "tokens (a prompt this short may have none), before their layers or blocks (tome-sd: attention "
                "levels up to max_downsample); keep_ratio 1.0 keeps them all."
            )
        return text

    def to_dict(self) -> dict:
        return {
            "dense_tokens": self.dense_tokens,
            "tokens_per_layer": self.tokens_per_layer,
            "flops": self.flops,
            "dense_flops": self.dense_flops,
            "flops_ratio": self.flops_ratio,
            "kv_bytes": self.kv_bytes,
            "dense_kv_bytes": self.dense_kv_bytes,
            "kv_ratio": self.kv_ratio,
            "kept": {str(k): v for k, v in self.kept.items()},
            "merged": {str(k): v for k, v in self.merged.items()},
            "codes": self.codes,
        }
