"""The fused GEMM launched by torch.compile itself: ``wrap_triton`` inside a ``torch.library.triton_op``.

Under ``torch.compile`` an opaque custom op is one call that runs fastvlm's own launcher at run time (its plans,
its host work per call, outside any CUDA graph Inductor builds). Through ``wrap_triton`` instead, the traced graph
holds the kernel call itself (``triton_kernel_wrapper_functional``), and Inductor launches it with its own launcher
and can capture it in a CUDA graph (``mode="reduce-overhead"``).

What differs from the eager launcher (``fused_linear``), because the body is traced with fake tensors:

* nothing reads a data pointer, and nothing is cached per call: the arguments are built from shapes and strides;
* the tile config is chosen by rule, not timed: the first of ``GEMM_CONFIGS`` that fits the dtype (the same pruning
  the autotuner applies); the heuristics' values are computed here (they depend on constexprs only);
* only the variants the compiled projector uses: a strided A, no norm, optional bias, an activation.

Needs Triton's real JIT functions: under the interpreter (TRITON_INTERPRET=1) ``wrap_triton`` cannot trace the
kernel, and callers keep the opaque custom op (``traceable()``).
"""
from __future__ import annotations

import triton

from . import _launch
from .gemm import _FLAG_NAMES, _fused_linear_kernel
from .gemm_configs import GEMM_CONFIGS, _config_ok


def traceable() -> bool:
    """Whether the GEMM kernel is a JITFunction ``wrap_triton`` can put in a traced graph (not the interpreter's)."""
    return isinstance(_launch.jit_function(_fused_linear_kernel), triton.runtime.JITFunction)


def rule_config(elem_bytes):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the first config that fits ``elem_bytes`` inputs."""
    for cfg in GEMM_CONFIGS:
        if _config_ok(*cfg, elem_bytes, False):
            return cfg
    return GEMM_CONFIGS[-1]


def traced_linear(a, weight, bias, act, precision):
    """``act(a @ weight^T + bias)`` for a 2-D ``a`` (any strides) through ``wrap_triton``; returns a new [M, N]
    tensor of ``a``'s dtype. Shapes and dtypes are the caller's to have checked (the custom op's checks)."""
    from torch.library import wrap_triton

    M, K = a.shape
    N = weight.shape[0]
    out = a.new_empty((M, N))
    bm, bn, bk, warps, stages = rule_config(a.element_size())
    flags = (False, False, False, 0, False, "strided", "none", False, False, bias is not None, act, False, False, False,
             precision, 0)
    consts = dict(zip(_FLAG_NAMES, flags))
    consts.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NORM_ALIGNED=False, A_ALIGNED=False,
                  num_warps=warps, num_stages=stages)
    pointers = (a, weight, None, bias, None, None, out) + (None,) * 16
    ints = (M, N, K, _launch.next_pow2(M), None, None, a.stride(0), a.stride(1), weight.stride(0), weight.stride(1),
            None, None, None, None, out.stride(0), out.stride(1), None, None, None, K)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    wrap_triton(_launch.jit_function(_fused_linear_kernel))[grid](*pointers, *ints, **consts)
    return out
