"""``fastvlm::linear_residual_layernorm``: ``LayerNorm(x @ W^T + b + residual)`` as one custom op (the Q-Former's
``*SelfOutput`` / ``*Output``: dense -> dropout (eval: identity) -> LayerNorm(h + input)).

Reads top to bottom: validation -> the two forward paths (the Triton launcher fastvlm.kernels.linear_norm, the
PyTorch path fastvlm.reference.linear_norm.linear_norm_eager) -> backward -> torch.library registration (fake +
autograd) -> the public functional.

    x [M, K], W [N, K], b [N], residual [M, N], ln_weight / ln_bias [N]  ->  y [M, N]

Backward runs in PyTorch ops and saves only the inputs: it recomputes ``h = x W^T + b + residual`` (one GEMM) and the
row statistics in fp32, then the LayerNorm and linear gradients. Nothing of size [M, N] is kept between forward and
backward (eager keeps h, its statistics and the LayerNorm input).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from fastvlm import _dispatch, _hot, choice
from fastvlm.ops import _checks, compiled
from fastvlm.reference.linear_norm import linear_norm_eager

OP_NAME = "fastvlm::linear_residual_layernorm"
PRECISIONS = ("", "tf32x3", "tf32", "ieee")  # "" = the kernel's default (fastvlm._hot.fp32_precision)


def _validate(x, w, b, residual, ln_w, ln_b, precision):
    if x.dim() != 2:
        raise ValueError(f"linear_residual_layernorm: x must be 2-D [rows, features], got {tuple(x.shape)}")
    M, K = x.shape
    if w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"linear_residual_layernorm: weight must be [out, {K}], got {tuple(w.shape)}")
    N = w.shape[0]
    for name, t, shape in (("bias", b, (N,)), ("residual", residual, (M, N)), ("ln_weight", ln_w, (N,)),
                           ("ln_bias", ln_b, (N,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"linear_residual_layernorm: {name} must be {list(shape)}, got {tuple(t.shape)}")
    if ln_w is None:
        raise ValueError("linear_residual_layernorm: ln_weight is required")
    if precision not in PRECISIONS:
        raise ValueError(f"linear_residual_layernorm: precision must be one of {PRECISIONS}, got {precision!r}")


def _kernel_reasons(x, named):
    """Why the Triton kernels cannot run these inputs (empty list when they can); shapes, dtypes and devices only
    (cached per shape key: autocast's state is added per call in ``_forward``)."""
    return _dispatch.dtype_device_reasons(x, named)


def _reasons(x, w, b, residual, ln_w, ln_b):
    named = (("weight", w), ("bias", b), ("residual", residual), ("ln_weight", ln_w), ("ln_bias", ln_b))
    return tuple(_kernel_reasons(x, named))


@functools.lru_cache(maxsize=None)
def _launcher():
    from fastvlm.kernels.linear_norm import linear_norm  # (imports triton: on first use)

    return linear_norm


def _forward(x, w, b, residual, ln_w, ln_b, eps, precision, reasons=None):
    """``reasons``: the kernel's reasons for these inputs when the caller has them from its checked key."""
    if reasons is None:
        reasons = _reasons(x, w, b, residual, ln_w, ln_b)
    reasons = list(reasons) + _checks.autocast_reasons(x.device)  # per call, never cached with the shape key
    def kernel():
        return _launcher()(x, w, b, residual, ln_w, ln_b, eps, precision=precision or None)

    def eager():
        return linear_norm_eager(x, w, b, residual, ln_w, ln_b, eps)

    detail = lambda: f"x{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} -> {w.shape[0]}"  # noqa: E731
    fast_key = lambda: (x.shape, w.shape, x.dtype, x.device, b is None, residual is None, ln_w is None, precision)  # noqa: E731
    per_shape = choice.per_shape(OP_NAME, x.device, fast_key, lambda: f"{detail()} precision={precision}", kernel,
                                 eager)
    return kernel() if _dispatch.choose_backend(OP_NAME, x.device, reasons, detail, per_shape) == "triton" else eager()


def _backward(saved, gy, eps, needs):
    """Gradients of (x, w, b, residual, ln_w, ln_b) from dL/dy, recomputing h and its statistics in fp32."""
    x, w, b, residual, ln_w, ln_b = saved
    need_x, need_w, need_b, need_r, need_lw, need_lb = needs
    ct = torch.promote_types(x.dtype, torch.float32)
    h = F.linear(x.to(ct), w.to(ct), None if b is None else b.to(ct))
    if residual is not None:
        h = h + residual.to(ct)
    mean = h.mean(-1, keepdim=True)
    # var_mean's population variance as a mean of squares: the same value, and no degrees-of-freedom warning on 0 rows
    rstd = torch.rsqrt((h - h.mean(-1, keepdim=True)).square().mean(-1, keepdim=True) + eps)
    xhat = (h - mean) * rstd
    g = gy.to(ct)
    glw = (g * xhat).sum(0).to(ln_w.dtype) if need_lw else None
    glb = g.sum(0).to(ln_b.dtype) if need_lb else None
    gx = gw = gb = gr = None
    if need_x or need_w or need_b or need_r:
        gxh = g * ln_w.to(ct)
        gh = rstd * (gxh - gxh.mean(-1, keepdim=True) - xhat * (gxh * xhat).mean(-1, keepdim=True))
        if need_r:
            gr = gh.to(residual.dtype)
        if need_b:
            gb = gh.sum(0).to(b.dtype)
        if need_w:
            gw = (gh.t() @ x.to(ct)).to(w.dtype)
        if need_x:
            gx = (gh @ w.to(ct)).to(x.dtype)
    return gx, gw, gb, gr, glw, glb


@torch.library.custom_op(OP_NAME, mutates_args=())
def linear_residual_layernorm_op(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                                 residual: Optional[torch.Tensor], ln_weight: torch.Tensor,
                                 ln_bias: Optional[torch.Tensor], eps: float, precision: str) -> torch.Tensor:
    return _forward(x, w, b, residual, ln_weight, ln_bias, eps, precision)


@linear_residual_layernorm_op.register_fake
def _(x, w, b, residual, ln_weight, ln_bias, eps, precision):
    return x.new_empty((x.shape[0], w.shape[0]))


def _setup_context(ctx, inputs, output):
    x, w, b, residual, ln_w, ln_b, eps, precision = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, w, b, residual, ln_w, ln_b)


def _op_backward(ctx, gy):
    return (*_backward(ctx.saved_tensors, gy, ctx.eps, ctx.needs_input_grad[:6]), None, None)


linear_residual_layernorm_op.register_autograd(_op_backward, setup_context=_setup_context)
compiled.register(linear_residual_layernorm_op)  # its triton_op twin (fastvlm.ops.compiled)
_NAMES = ("weight", "bias", "residual", "ln_weight", "ln_bias")


class _LinearNormFunction(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher's per-call cost (eager mode only)."""

    @staticmethod
    def forward(ctx, x, w, b, residual, ln_w, ln_b, eps, precision):
        ctx.eps = eps
        ctx.save_for_backward(x, w, b, residual, ln_w, ln_b)
        return _forward(x, w, b, residual, ln_w, ln_b, eps, precision)

    @staticmethod
    def backward(ctx, gy):
        return (*_backward(ctx.saved_tensors, gy, ctx.eps, ctx.needs_input_grad[:6]), None, None)


def linear_residual_layernorm(x, weight, bias=None, residual=None, ln_weight=None, ln_bias=None, eps=1e-12, *,
                              precision=""):
    """``F.layer_norm(x @ weight^T + bias + residual, ln_weight, ln_bias, eps)`` over the last dimension of ``x``
    (any leading dimensions; ``residual`` has the output's shape). ``precision``: fp32 dot precision of the kernel
    ("" = tf32x3, tf32 under allow_tf32, or FASTVLM_FP32_PRECISION when set; "ieee"). Eager calls skip the
    dispatcher; under torch.compile the call is the registered custom op."""
    if x.dim() == 0 or (residual is not None and residual.dim() == 0):
        raise ValueError("linear_residual_layernorm: x and residual need a feature dimension [..., features], got a "
                         "0-D tensor")
    lead = x.shape[:-1]
    x2 = _checks.as_rows(x)
    r2 = None if residual is None else _checks.as_rows(residual)
    tensors = (x2, weight, bias, r2, ln_weight, ln_bias)
    key = None if torch.compiler.is_compiling() else (precision, _hot.devices_key(tensors))
    reasons = _CHECKED.get(key) if key is not None else None
    if reasons is None:  # a new shape key: the checks (shapes, dtypes, devices only) and the kernel's reasons
        _validate(x2, weight, bias, r2, ln_weight, ln_bias, precision)
        reasons = _reasons(*tensors)
        if key is not None:
            _hot.remember(_CHECKED, key, reasons)
    bias, ln_weight, ln_bias = _checks.dense(bias, ln_weight, ln_bias)  # per call (a no-op for parameters)
    tensors = (x2, weight, bias, r2, ln_weight, ln_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if torch.compiler.is_compiling() or _checks.is_meta(x2):  # meta: shape tracing, answered by the fake
        op = compiled.op_for(OP_NAME, x2, tuple(zip(_NAMES, tensors[1:]))) if torch.compiler.is_compiling() \
            else torch.ops.fastvlm.linear_residual_layernorm
        y = op(*tensors, float(eps), precision)
    elif needs_grad:
        y = _LinearNormFunction.apply(*tensors, float(eps), precision)
    else:
        y = _forward(*tensors, float(eps), precision, reasons)
    return y.reshape(*lead, weight.shape[0])


_CHECKED = {}  # (precision, tensors' metadata) -> the kernel's reasons (the checks passed for this key)
