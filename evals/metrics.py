"""Metrics of a pruned run next to the dense one: fidelity, FLOPs, latency, memory, KV bytes.

Fidelity to dense (the same inputs through the pruned and the dense model):

* :func:`top1_agreement` -- share of discrete predictions (next tokens, classes, answers)
  that equal the dense model's;
* :func:`mean_cosine` -- mean row-wise cosine similarity of output vectors (last-token
  logits, class logits, image embeddings) to the dense model's.

Efficiency, and where each number comes from (see :class:`Meter`):

* **FLOPs, analytic** (``flops_source="analytic-decoder"``, decoder LLMs / LVLM language
  models): pruned runs add up ``handle.stats.flops`` of every request; the dense run counts
  the same formula (``tokenprune.stats.decoder_layer_flops``, checked against
  ``torch.utils.flop_counter`` in the tests) from the shapes each forward receives. Decoder
  layers only: embeddings, the LM head, a vision tower and the pruner's own scoring are
  not in it (they are in the counted FLOPs below).
* **FLOPs, counted** (``flops_counted``; the primary number when
  ``flops_source="flop_counter"``, e.g. ViT / CLIP): ``torch.utils.flop_counter.FlopCounterMode``
  around every model call, so it is everything that actually ran, including the pruner's
  overhead. The stock counter has no formula for the CPU SDPA kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``) and silently counts 0 for it; we
  register the standard SDPA formula for that op (:data:`EXTRA_FLOP_FORMULAS`), so SDPA
  models need not be switched to eager attention. Like the analytic count, attention is
  counted as a full (not causal) ``q k^T`` and ``p v``; matmuls are ``2*m*n*k``.
* **Latency** (:func:`latency`, :func:`time_call`): median of ``repeats`` calls after a
  warm-up; ``time.perf_counter`` on the CPU, CUDA events on a GPU. The runner times each
  pruned configuration *interleaved* with the dense model (dense, pruned, dense, pruned, ...;
  ``runner.paired_latency``) and reports the ratio of those two medians, because on a shared machine the background load
  drifts between measurements taken minutes apart.
* **Peak memory** (:class:`PeakMemory`): on CUDA, ``torch.cuda.max_memory_allocated`` above
  what was allocated before the call. On the CPU there is no allocator statistic, ``tracemalloc``
  does not see torch's allocations and RSS (``ru_maxrss`` / psutil) mostly reflects the
  allocator's reuse of pages freed by earlier calls, so instead we trace tensor storages:
  the peak total size of the tensors created during the call that are alive at the same time
  (weights and inputs excluded). Scratch buffers internal to a kernel are invisible to it.
* **KV bytes**: ``handle.stats.kv_bytes`` (per request: what the KV cache holds, or would
  hold for a ``use_cache=False`` forward); the dense run counts ``layers x tokens`` from the
  shapes it saw, as the adapter does for ``dense_kv_bytes``.
"""
from __future__ import annotations

import statistics
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from ..stats import decoder_layer_flops, kv_bytes_per_token


# ---- fidelity ------------------------------------------------------------------------------
def top1_agreement(pred: Sequence, ref: Sequence) -> float:
    """Share of positions where ``pred`` equals ``ref`` (tensors, arrays or lists of labels/strings)."""
    if torch.is_tensor(pred) or torch.is_tensor(ref):
        pred, ref = torch.as_tensor(pred).reshape(-1), torch.as_tensor(ref).reshape(-1)
        if pred.shape != ref.shape:
            raise ValueError(f"prediction counts differ: {tuple(pred.shape)} vs {tuple(ref.shape)}")
        return float((pred == ref).float().mean()) if pred.numel() else float("nan")
    pred, ref = list(pred), list(ref)
    if len(pred) != len(ref):
        raise ValueError(f"prediction counts differ: {len(pred)} vs {len(ref)}")
    return sum(a == b for a, b in zip(pred, ref)) / len(pred) if pred else float("nan")


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of ``a[i]`` and ``b[i]`` (rows flattened, float64)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` (the FID formula).

    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))``. With few samples the covariance
    estimates are noisy: compare numbers computed on the same sample sizes only.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets of the same D, got {x.shape} and {y.shape}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    # tr (S_x S_y)^(1/2) = tr (S_x^(1/2) S_y S_x^(1/2))^(1/2): a symmetric PSD form, so eigh is
    # stable where sqrtm of the non-symmetric product can return complex noise
    w, v = np.linalg.eigh(s_x)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s_y @ root)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * tr_covmean)


# ---- FLOPs -------------------------------------------------------------------------------
def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu``: full (non-causal) q k^T and p v."""
    b, hq, sq, d = query_shape
    vb, _, sk, dv = value_shape
    assert key_shape[0] == b == vb and key_shape[2] == sk and key_shape[3] == d
    return 2 * b * hq * sq * sk * d + 2 * b * hq * sq * sk * dv


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """``aten._native_multi_head_attention`` (``nn.MultiheadAttention``'s inference fast path, e.g.
    open_clip towers): q / k / v in-projections, q k^T, p v and the out-projection, batch first."""
    b, sq, d = query_shape
    sk = key_shape[1]
    return 2 * b * d * embed_dim * (sq + 2 * sk) + 4 * b * sq * sk * embed_dim + 2 * b * sq * embed_dim * embed_dim


#: Formulas the stock FlopCounterMode lacks (it would count 0 FLOPs for these ops).
EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_sdpa_flops
if hasattr(torch.ops.aten, "_native_multi_head_attention"):
    EXTRA_FLOP_FORMULAS[torch.ops.aten._native_multi_head_attention] = _native_mha_flops


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no printing) that also counts the CPU SDPA kernel."""
    return FlopCounterMode(display=False, custom_mapping=dict(EXTRA_FLOP_FORMULAS))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` as counted by :func:`flop_counter`."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


class DenseDecoderCounter:
    """Analytic FLOPs and KV bytes of an *unpruned* decoder, from the shapes its forwards see.

    Hooks the module that owns the decoder layers (``LlamaModel``, a LLaVA's language model)
    and applies ``decoder_layer_flops`` per forward, exactly as the adapter does for
    ``Stats.dense_flops``; ``kv_bytes`` is the cache size at the end of the last forward.
    """

    def __init__(self, model):
        from ..adapters.decoder import find_decoder

        self.base = find_decoder(model)
        if self.base is None:
            raise ValueError(f"{type(model).__name__}: no Llama-style decoder layers to count")
        self.config = self.base.config
        self.num_layers = len(self.base.layers)
        self.flops = 0
        self.kv_bytes = 0

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = embeds if embeds is not None else ids
        B, N = x.shape[:2]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        self.flops += self.num_layers * B * decoder_layer_flops(self.config, N, past + N)
        dtype_bytes = (embeds.element_size() if embeds is not None
                       else next(self.base.parameters()).element_size())
        self.kv_bytes = B * self.num_layers * (past + N) * kv_bytes_per_token(self.config, dtype_bytes)

    @contextmanager
    def counting(self):
        h = self.base.register_forward_pre_hook(self._pre, with_kwargs=True)
        try:
            yield self
        finally:
            h.remove()


class Meter:
    """Cost of one evaluation, accumulated over its top-level model calls.

    A task wraps each top-level call (one ``model(...)``, one ``generate``, one pipeline call) in
    ``with meter.call():``. The meter then adds

    * ``flops_counted``: ``FlopCounterMode`` over the call (everything that ran);
    * ``adapter_flops`` / ``adapter_dense_flops`` / ``kv_bytes`` / ``dense_kv_bytes`` /
      ``tokens_per_layer``: the attached adapter's own accounting (``handle.stats``), pruned runs;
    * with ``analytic=True`` (Llama-style decoders) and no handle: the same accounting for the
      dense model from :class:`DenseDecoderCounter`.

    ``flops`` is the analytic count (adapter or dense counter) when ``analytic``, else the
    counted one. ``handle.stats`` describes the *last request*, so one ``with meter.call()``
    must hold exactly one request (one forward or one ``generate``).
    """

    def __init__(self, model, handle=None, analytic: bool = False, count: bool = True):
        self.model, self.handle, self.analytic, self.count = model, handle, analytic, count
        self.calls = 0
        self.flops_counted = 0
        self.adapter_flops = 0
        self.adapter_dense_flops = 0
        self.kv_bytes = 0
        self.dense_kv_bytes = 0
        self.has_stats = False
        self.tokens_per_layer: list[int] | None = None  # summed over calls and rows
        self._dense = DenseDecoderCounter(model) if analytic and handle is None else None

    @property
    def flops(self) -> int:
        return self.adapter_flops if self.analytic else self.flops_counted

    @property
    def dense_flops(self) -> int:
        return self.adapter_dense_flops

    @contextmanager
    def call(self):
        counter = flop_counter() if self.count else None
        dense = self._dense
        if dense is not None:
            dense.flops = dense.kv_bytes = 0
        with (counter if counter is not None else _null()), (dense.counting() if dense else _null()):
            yield
        self.calls += 1
        if counter is not None:
            self.flops_counted += int(counter.get_total_flops())
        if dense is not None:
            self.has_stats = True
            self.adapter_flops += dense.flops
            self.adapter_dense_flops += dense.flops
            self.kv_bytes += dense.kv_bytes
            self.dense_kv_bytes += dense.kv_bytes
            return
        stats = self.handle.stats if self.handle is not None else None
        if stats is None:
            if self.handle is not None and self.analytic:
                raise RuntimeError("the pruned model reported no stats for this call (did the adapter run?)")
            return
        self.has_stats = True
        self.adapter_flops += stats.flops
        self.adapter_dense_flops += stats.dense_flops
        self.kv_bytes += stats.kv_bytes
        self.dense_kv_bytes += stats.dense_kv_bytes
        per_layer = [sum(r) for r in stats.tokens_per_layer]
        if self.tokens_per_layer is None:
            self.tokens_per_layer = per_layer
        elif len(per_layer) == len(self.tokens_per_layer):
            self.tokens_per_layer = [a + b for a, b in zip(self.tokens_per_layer, per_layer)]

    def to_dict(self) -> dict:
        d = {"calls": self.calls, "flops": self.flops, "flops_counted": self.flops_counted}
        if self.has_stats:
            d.update(adapter_flops=self.adapter_flops, adapter_dense_flops=self.adapter_dense_flops,
                     kv_bytes_per_call=self.kv_bytes / max(self.calls, 1),
                     dense_kv_bytes_per_call=self.dense_kv_bytes / max(self.calls, 1))
        if self.tokens_per_layer is not None:
            d["tokens_per_layer"] = self.tokens_per_layer
        return d


@contextmanager
def _null():
    yield


# ---- latency -----------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: "torch.device | str" = "cpu") -> float:
    """Seconds of one ``fn()``: CUDA events on a GPU, ``time.perf_counter`` on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def latency(fn: Callable[[], object], repeats: int = 3, device: "torch.device | str" = "cpu",
            warmup: int = 1) -> dict:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    CUDA events on a GPU, ``time.perf_counter`` on the CPU. Returns
    ``{"median_s", "min_s", "times_s"}``.
    """
    for _ in range(warmup):
        fn()
    _sync(torch.device(device))
    times = [time_call(fn, device) for _ in range(max(1, repeats))]
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


# ---- memory ------------------------------------------------------------------------------
class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and alive at the same time.

    Storages that already existed (weights, inputs, views of them, in-place results) are not
    counted; a storage stops counting when it is freed.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int):
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            if st in self._seen or (st.data_ptr() in inputs and st.data_ptr() != 0):
                continue
            n = st.nbytes()
            self._seen[st] = n
            self.current += n
            weakref.finalize(st, self._free, n)
            if self.current > self.peak:
                self.peak = self.current
        return out


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` and ``m.method``.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the block.
    CPU: :class:`TensorMemoryTracker` (see the module docstring for why not RSS).
    """

    def __init__(self, device: "torch.device | str" = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = "cuda.max_memory_allocated" if self.device.type == "cuda" else "tensor-storage-trace"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = TensorMemoryTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._tracker.__exit__(*exc)
            self.peak_bytes = int(self._tracker.peak)
        return False


def peak_memory(fn: Callable[[], object], device: "torch.device | str" = "cpu") -> dict:
    """Peak extra memory of one ``fn()`` call: ``{"peak_bytes", "method"}``."""
    with PeakMemory(device) as m:
        fn()
    return {"peak_bytes": m.peak_bytes, "method": m.method}
