"""Hot-path helpers shared by the launchers (fastvlm.kernels) and the ops: call keys and bounded caches.

A launcher or op checks its arguments once per *key* and trusts the result for every later call with the same key.
The key holds everything the checks read: each tensor's shape, strides and dtype, and the device (see
``tensors_key``). Values are never part of a check (reading them would synchronise the host).
"""
from __future__ import annotations

import threading


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


def _pick_tf32_reader():
    import torch

    reader = getattr(torch._C, "_get_cublas_allow_tf32", None)
    return reader if reader is not None else _allow_tf32_attr


class _LazyReader:
    def __call__(self):
        global _ALLOW_TF32
        _ALLOW_TF32 = _pick_tf32_reader()
        return _ALLOW_TF32()


_ALLOW_TF32 = _LazyReader()
