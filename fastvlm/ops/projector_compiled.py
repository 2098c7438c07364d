"""``fastvlm::mlp_projector_launch``: the projector's plain linears as a ``torch.library.triton_op``, so that under
``torch.compile`` Inductor launches the GEMM kernel itself (kernels/gemm_traced.py) instead of calling an opaque op
that runs fastvlm's launcher at run time. docs/design-launch.md, "torch.compile".

Used by ``mlp_projector`` while compiling, for inference calls (no input needs a gradient) of the plain projector
(strided A, no norm, not gated: LLaVA-style MLPs, single linears) whose Triton kernel would run: the backend rule
(FASTVLM_BACKEND, the device, dtypes, autocast) is applied when the graph is traced. Every other call (training, a
fallback, a norm or merge) keeps the opaque ``fastvlm::mlp_projector`` custom op, which decides and reports at run
time as before. ``FASTVLM_COMPILE_LAUNCH=op`` keeps the custom op for every call (read when tracing).

Under the Triton interpreter (TRITON_INTERPRET=1, the CPU tests) ``wrap_triton`` cannot trace the kernel, so the
custom op is used there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from fastvlm import _dispatch, _hot
from fastvlm.ops import _checks

OP_NAME = "fastvlm::mlp_projector_launch"
MODES = ("inductor", "op")


def launch_mode() -> str:
    value = _dispatch.getenv("FASTVLM_COMPILE_LAUNCH", "inductor").strip().lower() or "inductor"
    if value not in MODES:
        raise ValueError(f"FASTVLM_COMPILE_LAUNCH must be one of {MODES}, got {value!r}")
    return value


def wanted(x, spec, rows, w_up, reasons) -> bool:
    """Whether a compiled call of ``mlp_projector`` takes this op (see the module docstring); ``reasons``: the
    kernel's own reasons for these inputs (dtypes, devices)."""
    if rows is not None or w_up is not None or spec.a_mode != "strided" or spec.norm != "none" or spec.gated:
        return False
    if launch_mode() != "inductor" or _dispatch.requested_backend() == "torch" or reasons:
        return False
    if _dispatch.environment_reasons(x.device) or _checks.autocast_on(x.device):
        return False
    from fastvlm.kernels.gemm_traced import traceable

    return traceable()


def precision_of(x) -> str:
    """The GEMM's fp32 precision, as ``fused_linear`` picks it (read when tracing)."""
    return _hot.fp32_precision() if x.dtype == torch.float32 else "ieee"


@triton_op(OP_NAME, mutates_args=())
def mlp_projector_launch(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: Optional[torch.Tensor],
                         b2: Optional[torch.Tensor], act: str, act2: str, precision: str) -> torch.Tensor:
    """``act2(linear_2(act(linear_1(x))))`` (``w2`` None: the first linear only) for a 2-D ``x``, checked by
    ``mlp_projector``."""
    from fastvlm.kernels.gemm_traced import traced_linear

    y = traced_linear(x, w1, b1, act, precision)
    if w2 is not None:
        y = traced_linear(y, w2, b2, act2, precision)
    return y
