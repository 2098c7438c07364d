"""``fastvlm::mlp_projector``: [norm] -> linear_1 -> act -> [linear_2] as one custom op.

Reads top to bottom: validation -> the two forward paths (Triton launchers in fastvlm.kernels.gemm, the PyTorch path
in fastvlm.reference.projector) -> backward -> torch.library registration (fake + autograd) -> the public functional.

What is fused (Triton path, two launches plus one tiny statistics pass when there is a norm):
    stats  = row_stats(x)                                      fp32 mean/rstd per norm row
    a, h   = GEMM(x -> norm on load, W1, + b1 -> [h stored only when training] -> act)
    y      = GEMM(a, W2, + b2)
The normalised input and the post-activation tensor never need to be kept for backward:

    saved for backward   x (already held by the caller), fp32 stats (8 B per norm row), pre-activation h
    recomputed           norm(x) from the stats, act(h)
    eager transformers   keeps norm(x), h and act(h)

Backward runs in PyTorch ops (cuBLAS GEMMs, fp32 elementwise math); a Triton backward is future work.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastvlm import _dispatch
from fastvlm.reference.activations import ACTIVATIONS, act_grad_ref, act_ref
from fastvlm.reference.projector import norm_ref, norm_stats_ref

OP_NAME = "fastvlm::mlp_projector"
NORMS = ("none", "layernorm", "rmsnorm")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------ validation


def _validate(x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, act):
    """Shape errors that the original modules would also reject, named after the tensor at fault."""
    if x.dim() != 2:
        raise ValueError(f"mlp_projector: x must be 2-D [tokens, features] here, got shape {tuple(x.shape)}")
    M, K = x.shape
    if w1.dim() != 2 or w1.shape[1] != K:
        raise ValueError(f"mlp_projector: linear_1.weight must be [out, {K}] for input features of width {K}, "
                         f"got {tuple(w1.shape)}")
    if b1 is not None and b1.shape != (w1.shape[0],):
        raise ValueError(f"mlp_projector: linear_1.bias must be [{w1.shape[0]}], got {tuple(b1.shape)}")
    if w2 is not None:
        if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
            raise ValueError(f"mlp_projector: linear_2.weight must be [out, {w1.shape[0]}], got {tuple(w2.shape)}")
        if b2 is not None and b2.shape != (w2.shape[0],):
            raise ValueError(f"mlp_projector: linear_2.bias must be [{w2.shape[0]}], got {tuple(b2.shape)}")
    elif b2 is not None:
        raise ValueError("mlp_projector: linear_2.bias given without linear_2.weight")
    if act not in ACTIVATIONS:
        raise ValueError(f"mlp_projector: act must be one of {ACTIVATIONS}, got {act!r}")
    if norm not in NORMS:
        raise ValueError(f"mlp_projector: norm must be one of {NORMS}, got {norm!r}")
    if norm != "none":
        if norm_group <= 0 or K % norm_group:
            raise ValueError(f"mlp_projector: the norm width {norm_group} must divide the input width {K}")
        if norm_weight is None or norm_weight.shape != (norm_group,):
            raise ValueError(f"mlp_projector: norm weight must be [{norm_group}], got "
                             f"{None if norm_weight is None else tuple(norm_weight.shape)}")
        if norm_bias is not None and (norm != "layernorm" or norm_bias.shape != (norm_group,)):
            raise ValueError(f"mlp_projector: norm bias must be [{norm_group}] and only with a layernorm")


def _kernel_reasons(x, w1, b1, w2, b2, norm_weight, norm_bias):
    """Why the Triton kernels cannot run these inputs (empty list when they can)."""
    reasons = []
    if x.dtype not in KERNEL_DTYPES:
        reasons.append(f"x dtype {x.dtype} is not one of float16/bfloat16/float32")
    named = (("linear_1.weight", w1), ("linear_1.bias", b1), ("linear_2.weight", w2), ("linear_2.bias", b2),
             ("norm.weight", norm_weight), ("norm.bias", norm_bias))
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            reasons.append(f"{name} is {t.dtype} but x is {x.dtype} (the kernel needs one dtype)")
        if t.device != x.device:
            reasons.append(f"{name} is on {t.device} but x is on {x.device}")
    return reasons


def _needs_h(w2, act):
    return w2 is not None or act != "none"


# ------------------------------------------------------------------------------------------------ forward paths


def _empty(x, dtype=None):
    return x.new_empty((0,), dtype=dtype or x.dtype)


def _forward_triton(x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act, save):
    from fastvlm.kernels.gemm import fused_linear
    from fastvlm.kernels.norm_stats import row_stats

    mean = rstd = None
    if norm != "none":
        if x.stride(1) != 1 or (norm_group != x.shape[1] and not x.is_contiguous()):
            x = x.contiguous()
        mean, rstd = row_stats(x.reshape(-1, norm_group) if norm_group != x.shape[1] else x, eps, norm == "rmsnorm")
    store_pre = save and _needs_h(w2, act)
    first = fused_linear(x, w1, b1, act=act, norm=norm, norm_group=norm_group, mean=mean, rstd=rstd,
                         norm_weight=norm_weight, norm_bias=norm_bias, store_pre=store_pre)
    a, h = first if store_pre else (first, None)
    y = a if w2 is None else fused_linear(a, w2, b2)
    return y, h, mean, rstd


def _forward_torch(x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act, save):
    xn = norm_ref(x, norm, norm_weight, norm_bias, norm_group, eps)
    h = F.linear(xn, w1, b1)
    y = act_ref(h, act)
    if w2 is not None:
        y = F.linear(y, w2, b2)
    mean = rstd = None
    if save and norm != "none":
        mean, rstd = norm_stats_ref(x, norm, norm_group, eps)
    return y, (h if save and _needs_h(w2, act) else None), mean, rstd


def _pack(x, y, h, mean, rstd, save):
    """The custom op must return tensors: absent ones become empty tensors (the fake gives the same shapes)."""
    f32 = torch.promote_types(x.dtype, torch.float32)
    if not save:
        return y, _empty(x), _empty(x, f32), _empty(x, f32)
    return (y, h if h is not None else _empty(x), mean if mean is not None else _empty(x, f32),
            rstd if rstd is not None else _empty(x, f32))


def _forward(x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act, save):
    """(y, h, mean, rstd); h/mean/rstd are None when not saved."""
    detail = f"x{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} -> {(w2 if w2 is not None else w1).shape[0]}"
    reasons = _kernel_reasons(x, w1, b1, w2, b2, norm_weight, norm_bias)
    backend = _dispatch.choose_backend(OP_NAME, x.device, reasons, detail)
    impl = _forward_triton if backend == "triton" else _forward_torch
    return impl(x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act, save)


# ------------------------------------------------------------------------------------------------ backward


def _norm_from_stats(x, mean, rstd, norm_weight, norm_bias, norm, norm_group):
    """Recompute the prologue's normalised input (x's dtype) from the saved fp32 statistics."""
    ct = rstd.dtype  # fp32, or fp64 for fp64 inputs
    xg = x.reshape(-1, norm_group).to(ct)
    if norm == "layernorm":
        y = (xg - mean[:, None]) * rstd[:, None] * norm_weight.to(ct)
        if norm_bias is not None:
            y = y + norm_bias.to(ct)
        return y.to(x.dtype).reshape(x.shape)
    y = norm_weight * (xg * rstd[:, None]).to(x.dtype)
    return y.reshape(x.shape)


def _norm_backward(gxn, x, mean, rstd, norm_weight, norm, norm_group, need_x, need_w, need_b):
    ct = rstd.dtype
    g = gxn.reshape(-1, norm_group).to(ct)
    xg = x.reshape(-1, norm_group).to(ct)
    xhat = (xg - mean[:, None]) * rstd[:, None] if norm == "layernorm" else xg * rstd[:, None]
    gw = gb = gx = None
    if need_w:
        gw = ((g * xhat).sum(0) if norm == "layernorm" else (g * xhat.to(x.dtype).to(ct)).sum(0))
        gw = gw.to(norm_weight.dtype)
    if need_b:
        gb = g.sum(0)
    if need_x:
        gs = g * norm_weight.to(ct)
        proj = (gs * xhat).mean(-1, keepdim=True)
        gx = gs - xhat * proj
        if norm == "layernorm":
            gx = gx - gs.mean(-1, keepdim=True)
        gx = (gx * rstd[:, None]).to(x.dtype).reshape(x.shape)
    return gx, gw, gb


def _acc_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def _backward(cfg, saved, gy, needs):
    """Gradients of (x, w1, b1, w2, b2, norm_weight, norm_bias) given dL/dy; ``needs`` flags which are wanted."""
    norm, norm_group, act = cfg
    x, w1, w2, norm_weight, norm_bias, h, mean, rstd = saved
    need_x, need_w1, need_b1, need_w2, need_b2, need_nw, need_nb = needs
    gy = gy.contiguous()
    gx = gw1 = gb1 = gw2 = gb2 = gnw = gnb = None
    if w2 is not None:
        if need_w2:
            a = act_ref(h, act)
            gw2 = (gy.t() @ a).to(w2.dtype)
        if need_b2:
            gb2 = gy.to(_acc_dtype(gy)).sum(0).to(w2.dtype)
        ga = gy @ w2
    else:
        ga = gy
    gh = act_grad_ref(h, ga, act) if act != "none" else ga
    if need_b1:
        gb1 = gh.to(_acc_dtype(gh)).sum(0).to(w1.dtype)
    if need_w1:
        xn = x if norm == "none" else _norm_from_stats(x, mean, rstd, norm_weight, norm_bias, norm, norm_group)
        gw1 = (gh.t() @ xn).to(w1.dtype)
    if need_x or need_nw or need_nb:
        gxn = gh @ w1
        if norm == "none":
            gx = gxn
        else:
            gx, gnw, gnb = _norm_backward(gxn, x, mean, rstd, norm_weight, norm, norm_group, need_x, need_nw, need_nb)
            if gnb is not None:
                gnb = gnb.to(norm_bias.dtype)
    return gx, gw1, gb1, gw2, gb2, gnw, gnb


# ------------------------------------------------------------------------------------------------ registration


@torch.library.custom_op(OP_NAME, mutates_args=())
def mlp_projector_op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: Optional[torch.Tensor],
                     b2: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                     norm_bias: Optional[torch.Tensor], norm: str, norm_group: int, eps: float, act: str,
                     save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h, mean, rstd). h/mean/rstd are what backward needs (empty unless ``save``)."""
    return _pack(x, *_forward(x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act, save), save)


@mlp_projector_op.register_fake
def _(x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act, save):
    M, K = x.shape
    y = x.new_empty((M, (w2 if w2 is not None else w1).shape[0]))
    f32 = torch.promote_types(x.dtype, torch.float32)
    h = x.new_empty((M, w1.shape[0])) if save and _needs_h(w2, act) else x.new_empty((0,))
    rows = M * (K // norm_group) if norm != "none" else 0
    mean = x.new_empty((rows if save and norm == "layernorm" else 0,), dtype=f32)
    rstd = x.new_empty((rows if save and norm != "none" else 0,), dtype=f32)
    return y, h, mean, rstd


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act, save = inputs
    _, h, mean, rstd = output
    ctx.cfg = (norm, norm_group, act)
    ctx.save_for_backward(x, w1, w2, norm_weight, norm_bias, h, mean, rstd)
    ctx.mark_non_differentiable(h, mean, rstd)


def _op_backward(ctx, gy, _gh, _gmean, _grstd):
    n = ctx.needs_input_grad
    grads = _backward(ctx.cfg, ctx.saved_tensors, gy, (n[0], n[1], n[2], n[3], n[4], n[5], n[6]))
    return (*grads, None, None, None, None, None)


mlp_projector_op.register_autograd(_op_backward, setup_context=_setup_context)


class _MLPProjectorFunction(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher's per-call cost (eager mode only)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act):
        y, h, mean, rstd = _forward(x, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, eps, act, True)
        ctx.cfg = (norm, norm_group, act)
        ctx.save_for_backward(x, w1, w2, norm_weight, norm_bias, h, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        n = ctx.needs_input_grad
        return (*_backward(ctx.cfg, ctx.saved_tensors, gy, n[:7]), None, None, None, None)


# ------------------------------------------------------------------------------------------------ functional


def mlp_projector(x, w1, b1=None, w2=None, b2=None, *, act="gelu", norm="none", norm_weight=None, norm_bias=None,
                  norm_group=None, eps=1e-5):
    """Fused ``linear_2(act(linear_1(norm(x))))`` over the last dimension of ``x``.

    ``norm_group`` is the width the norm runs over (default: all of x's last dimension); a smaller group normalises
    each group of columns separately, as Qwen2-VL's merger does before its 2x2 merge. ``w2=None`` gives a single
    (optionally activated) linear. Eager calls skip the torch.library dispatcher; under torch.compile the call is the
    registered custom op, so it is one opaque node with a fake implementation and autograd.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    norm_group = int(norm_group or x2.shape[1]) if norm != "none" else x2.shape[1]
    _validate(x2, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, act)
    args = (x2, w1, b1, w2, b2, norm_weight, norm_bias, norm, norm_group, float(eps), act)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7])
    if torch.compiler.is_compiling():
        y = torch.ops.fastvlm.mlp_projector(*args, needs_grad)[0]
    elif needs_grad:
        y = _MLPProjectorFunction.apply(*args)
    else:
        y = _forward(*args, False)[0]
    return y.reshape(*lead, y.shape[-1])
