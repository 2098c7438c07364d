"""Hot-path helpers shared by the launchers (fastvlm.kernels) and the ops: call keys and bounded caches.

A launcher or op checks its arguments once per *key* and trusts the result for every later call with the same key.
The key holds everything the checks read: each tensor's shape, strides and dtype, and the device (see
``tensors_key``). Values are never part of a check (reading them would synchronise the host).
"""
from __future__ import annotations

import threading

from fastvlm import _dispatch


def tensors_key(device, tensors):
    """``device`` and the (shape, strides, dtype) of each tensor, None for None: what a launcher's checks depend on
    (with every tensor on ``device``), so that a launcher can check a key once and trust it after."""
    return device, tuple([None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors])


MAX_ENTRIES = 4096

_traced = threading.local()


def traced() -> bool:
    """Whether this thread is inside ``fastvlm.kernels._launch.traced()``: launches traced by torch.compile (a
    triton_op's body). Read by code that must not read values or time candidates then (the dispatch's per-shape
    choice, index checks) and by the launchers."""
    return getattr(_traced, "depth", 0) > 0


def remember(cache, key, value):
    """``cache[key] = value``, emptying the cache first when it has grown past MAX_ENTRIES (inputs of ever new
    shapes); a reader then recomputes its entry."""
    if len(cache) >= MAX_ENTRIES:
        cache.clear()
    cache[key] = value


def devices_key(tensors):
    """(shape, strides, dtype, device) of each tensor, None for None: for checks that also compare devices."""
    return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors])


def _allow_tf32_attr():
    import torch

    return torch.backends.cuda.matmul.allow_tf32


def allow_tf32():
    """``torch.backends.cuda.matmul.allow_tf32`` (part of the GEMM ops' keys: it picks the kernel's precision), read
    with the C call that attribute makes (its module-level ``__getattr__`` costs a few µs per call)."""
    return _ALLOW_TF32()


def _tf32_new_api():
    """TF32 for cuBLAS matmuls as torch's ``fp32_precision`` API states it (torch >= 2.9): the legacy readers raise
    once a program has set that API to "tf32" (torch refuses to answer for a mix of the two APIs)."""
    import torch

    return getattr(torch.backends.cuda.matmul, "fp32_precision", "none") == "tf32"


def _pick_tf32_reader():
    import torch

    reader = getattr(torch._C, "_get_cublas_allow_tf32", None)
    if reader is None:
        reader = _allow_tf32_attr

    def read():
        try:
            return reader()
        except RuntimeError:  # the legacy flag and torch.backends.cuda.matmul.fp32_precision both set
            return _tf32_new_api()

    return read


class _LazyReader:
    def __call__(self):
        global _ALLOW_TF32
        _ALLOW_TF32 = _pick_tf32_reader()
        return _ALLOW_TF32()


_ALLOW_TF32 = _LazyReader()


FP32_PRECISIONS = ("tf32x3", "tf32", "ieee")
FP32_ENV = "FASTVLM_FP32_PRECISION"


def fp32_precision() -> str:
    """The precision of fp32 dots in the GEMM-shaped kernels (fused GEMM, linear_norm) when the caller names none:
    ``FASTVLM_FP32_PRECISION`` when set ("tf32x3", "tf32" or "ieee", read at every call); else "tf32" when torch
    allows TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision("high")``
    or ``fp32_precision = "tf32"``); else "tf32x3" (three TF32 tensor-core dots, about fp32-accurate). "ieee" (FMA
    units, no tensor cores) only on request."""
    value = _dispatch.getenv(FP32_ENV, "")
    if value:
        if value not in FP32_PRECISIONS:
            raise ValueError(f"{FP32_ENV} must be one of {FP32_PRECISIONS}, got {value!r}")
        return value
    return "tf32" if _ALLOW_TF32() else "tf32x3"
