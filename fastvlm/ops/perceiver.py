"""Idefics2's Perceiver resampler as fused ops: ``fastvlm::norm_linear`` (RMSNorm prologue -> GEMM -> [gated pair]
-> [+ residual], one custom op) composed with ``fastvlm::attention`` in its grouped-query, two-source form.

Reads top to bottom: ``norm_linear`` (validation -> forward paths -> backward -> registration -> functional), then
``perceiver_resampler``, the functional the fused modules of fastvlm.nn.perceiver call.

One perceiver layer (transformers' ``Idefics2PerceiverLayer``) on latents L [B*n, H] and the context C [B*P, H]:

    q   = norm_linear(L, Wq, norm=input_latents_norm)              RMSNorm applied as the GEMM loads A
    k1  = norm_linear(C, Wk, norm=input_context_norm)               context keys / values: the normed context
    v1  = norm_linear(C, Wv, norm=input_context_norm)               is never written
    k2  = norm_linear(L, Wk, norm=input_latents_norm)               latent keys / values: a separate small GEMM,
    v2  = norm_linear(L, Wv, norm=input_latents_norm)               so concat(context, latents) is never built
    o   = attention(q, k1, v1, key_mask=patch_mask, k2=k2, v2=v2)   GQA: query head h reads kv head h // group
    L   = norm_linear(o, Wo, residual=L)                            residual in the GEMM's epilogue
    a   = norm_linear(L, Wgate, w_up=Wup, act=silu, norm=post_attention_layernorm)    gated pair (SwiGLU)
    L   = norm_linear(a, Wdown, residual=L)
and after the last layer the final RMSNorm (torch ops: no GEMM follows it inside the module).

The first layer's latents are the same for every batch row: their q/k/v are computed once on [n, H] and read with a
stride-0 batch by the attention kernel. RMS statistics are computed once and shared: the context's by the six k/v
GEMMs of all layers (the context never changes; the statistics do not depend on the norm weight), the latents' by
q, k2 and v2 of each layer.

Backward: each op has its own (PyTorch ops: cuBLAS GEMMs and fp32 elementwise math). ``norm_linear`` keeps x, the
fp32 row statistics and, for a gated pair, the two pre-activations; it recomputes the normed input.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from fastvlm import _dispatch, _hot, choice
from fastvlm.ops import _checks, compiled
from fastvlm.ops.attention import attention
from fastvlm.reference.activations import ACTIVATIONS, act_grad_ref, act_ref
from fastvlm.reference.projector import norm_ref, norm_stats_ref

OP_NAME = "fastvlm::norm_linear"


# ------------------------------------------------------------------------------------------------ validation


def _validate(x, w, w_up, nw, res, act):
    if x.dim() != 2:
        raise ValueError(f"norm_linear: x must be 2-D [rows, features], got {tuple(x.shape)}")
    K = x.shape[1]
    if w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"norm_linear: weight must be [out, {K}], got {tuple(w.shape)}")
    if w_up is not None and w_up.shape != w.shape:
        raise ValueError(f"norm_linear: up weight must be {tuple(w.shape)} like the gate weight, got "
                         f"{tuple(w_up.shape)}")
    if nw is not None and nw.shape != (K,):
        raise ValueError(f"norm_linear: norm weight must be [{K}], got {tuple(nw.shape)}")
    if res is not None and res.shape != (x.shape[0], w.shape[0]):
        raise ValueError(f"norm_linear: residual must be [{x.shape[0]}, {w.shape[0]}], got {tuple(res.shape)}")
    if act not in ACTIVATIONS or (act != "none" and w_up is None):
        raise ValueError(f"norm_linear: act must be one of {ACTIVATIONS} and needs an up weight (gated pair), "
                         f"got {act!r}")


def _kernel_reasons(x, named):
    """Why the Triton kernels cannot run these inputs (empty list when they can); shapes, dtypes and devices only
    (cached per shape key: autocast's state is added per call in ``_forward``)."""
    return _dispatch.dtype_device_reasons(x, named)


# ------------------------------------------------------------------------------------------------ forward paths


@functools.lru_cache(maxsize=None)
def _kernels():
    """The launchers (imported on first use: fastvlm.kernels imports triton)."""
    from fastvlm.kernels.gemm import fused_linear
    from fastvlm.kernels.norm_stats import row_stats

    return fused_linear, row_stats


def _forward_triton(x, w, w_up, nw, res, eps, act, save, rstd=None):
    fused_linear, row_stats = _kernels()

    if x.stride(1) != 1:
        x = x.contiguous()
    norm = {}
    if nw is not None:
        if rstd is None:
            _, rstd = row_stats(x, eps, True)
        norm = dict(norm="rmsnorm", norm_group=x.shape[1], rstd=rstd, norm_weight=nw)
    store = save and w_up is not None
    out = fused_linear(x, w, None, act=act, up_weight=w_up, residual=res, store_pre=store, **norm)
    y, h = out if store else (out, None)
    return y, h, rstd if save else None


def _forward_torch(x, w, w_up, nw, res, eps, act, save, rstd=None):
    if nw is None:
        a = x
    elif rstd is not None:
        a = _normed(x, rstd, nw)
    else:
        a = norm_ref(x, "rmsnorm", nw, None, x.shape[1], eps)
    h = None
    if w_up is not None:
        up, gate = F.linear(a, w_up), F.linear(a, w)
        y = act_ref(gate, act) * up
        h = torch.cat([up, gate], dim=-1) if save else None
    else:
        y = F.linear(a, w)
    if res is not None:
        y = res + y
    if rstd is None and save and nw is not None:
        rstd = norm_stats_ref(x, "rmsnorm", x.shape[1], eps)[1]
    return y, h, rstd if save and nw is not None else None


def _detail(x, w, w_up, nw, res, act):
    return (f"x{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} -> {w.shape[0]}"
            + (" rmsnorm" if nw is not None else "") + (f" gated {act}" if w_up is not None else "")
            + (" +residual" if res is not None else ""))


def _reasons(x, w, w_up, nw, res):
    return tuple(_kernel_reasons(x, (("weight", w), ("up weight", w_up), ("norm weight", nw), ("residual", res))))


def _forward(x, w, w_up, nw, res, eps, act, save, rstd=None, reasons=None):
    """(y, h [M, 2N] = [up | gate] pre-activations of a gated pair, rstd [M]); h / rstd None unless saved.
    ``reasons``: the kernel's reasons for these inputs when the caller has them from its checked key."""
    if reasons is None:
        reasons = _reasons(x, w, w_up, nw, res)
    reasons = list(reasons) + _checks.autocast_reasons(x.device)  # per call, never cached with the shape key
    detail = lambda: _detail(x, w, w_up, nw, res, act)  # noqa: E731
    kernel, eager = (lambda impl=impl: impl(x, w, w_up, nw, res, eps, act, save, rstd)
                     for impl in (_forward_triton, _forward_torch))
    fast_key = lambda: (x.shape, w.shape, x.dtype, x.device, w_up is None, nw is None, res is None, act, save, rstd is None)  # noqa: E731
    per_shape = choice.per_shape(OP_NAME, x.device, fast_key, lambda: f"{detail()} save={save}", kernel, eager)
    return kernel() if _dispatch.choose_backend(OP_NAME, x.device, reasons, detail, per_shape) == "triton" else eager()


def rms_rstd(x, eps):
    """fp32 (fp64 for fp64 inputs) RMSNorm statistics ``rsqrt(mean(x^2) + eps)`` of each row of 2-D ``x``, in one
    read of x (fp32 accumulation, no upcast copy). The perceiver computes them once per connector call for the context
    (every layer's context norm and both k/v GEMMs share them) and once per layer for the latents."""
    ct = torch.promote_types(x.dtype, torch.float32)
    n = torch.linalg.vector_norm(x, ord=2, dim=-1, dtype=ct)
    return torch.rsqrt(n * n / x.shape[-1] + eps)


# ------------------------------------------------------------------------------------------------ backward


def _normed(x, rstd, nw):
    """RMSNorm output recomputed from the saved statistics, with transformers' cast point."""
    return nw * (x.to(rstd.dtype) * rstd[:, None]).to(x.dtype)


def _backward(saved, gy, act, needs):
    """Gradients of (x, w, w_up, norm_weight, residual) given dL/dy."""
    x, w, w_up, nw, h, rstd = saved
    need_x, need_w, need_wu, need_nw, need_res = needs
    ct = torch.promote_types(x.dtype, torch.float32)
    gy = gy.contiguous()
    gx = gw = gwu = gnw = None
    gres = gy if need_res else None
    if w_up is not None:
        up, gate = h.chunk(2, dim=-1)
        g_gate = act_grad_ref(gate, (gy.to(ct) * up.to(ct)).to(gy.dtype), act)
        g_up = (gy.to(ct) * act_ref(gate.to(ct), act)).to(gy.dtype)
        pairs = ((g_gate, w), (g_up, w_up))
    else:
        pairs = ((gy, w),)
    if need_w or need_wu:
        a = _normed(x, rstd, nw) if nw is not None else x
        gw = (pairs[0][0].t() @ a).to(w.dtype) if need_w else None
        if w_up is not None and need_wu:
            gwu = (pairs[1][0].t() @ a).to(w_up.dtype)
    if need_x or need_nw:
        ga = sum(g @ wt for g, wt in pairs)
        if nw is None:
            gx = ga
        else:
            xhat = x.to(ct) * rstd[:, None]
            g = ga.to(ct)
            if need_nw:
                gnw = (g * xhat.to(x.dtype).to(ct)).sum(0).to(nw.dtype)
            if need_x:
                gs = g * nw.to(ct)
                gx = ((gs - xhat * (gs * xhat).mean(-1, keepdim=True)) * rstd[:, None]).to(x.dtype)
    return gx, gw, gwu, gnw, gres


# ------------------------------------------------------------------------------------------------ registration


@torch.library.custom_op(OP_NAME, mutates_args=())
def norm_linear_op(x: torch.Tensor, w: torch.Tensor, w_up: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], eps: float, act: str,
                   save: bool, rstd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h, rstd); h and rstd are what backward needs (empty unless ``save``). ``rstd``: x's RMS statistics
    when the caller already has them (``rms_rstd(x, eps)``; not differentiated: they are a function of x, whose
    gradient includes that path)."""
    given = rstd is not None
    y, h, rstd = _forward(x, w, w_up, norm_weight, residual, eps, act, save, rstd)
    e = lambda dt: x.new_empty((0,), dtype=dt)  # noqa: E731
    # a given rstd is not returned (an op output may not alias an input); setup_context saves the input instead
    return (y, h if h is not None else e(x.dtype),
            rstd if rstd is not None and not given else e(torch.promote_types(x.dtype, torch.float32)))


@norm_linear_op.register_fake
def _(x, w, w_up, norm_weight, residual, eps, act, save, rstd=None):
    M, N = x.shape[0], w.shape[0]
    h = x.new_empty((M, 2 * N) if save and w_up is not None else (0,))
    rstd = x.new_empty((M,) if save and norm_weight is not None and rstd is None else (0,),
                       dtype=torch.promote_types(x.dtype, torch.float32))
    return x.new_empty((M, N)), h, rstd


def _setup_context(ctx, inputs, output):
    x, w, w_up, nw, res, eps, act, save, rstd_in = inputs
    _, h, rstd = output
    if rstd_in is not None:
        rstd = rstd_in
    ctx.act = act
    ctx.save_for_backward(x, w, w_up, nw, h, rstd)
    ctx.mark_non_differentiable(h, rstd)


def _op_backward(ctx, gy, _gh, _grstd):
    n = ctx.needs_input_grad
    gx, gw, gwu, gnw, gres = _backward(ctx.saved_tensors, gy, ctx.act, (n[0], n[1], n[2], n[3], n[4]))
    return gx, gw, gwu, gnw, gres, None, None, None, None


norm_linear_op.register_autograd(_op_backward, setup_context=_setup_context)
compiled.register(norm_linear_op)  # its triton_op twin, taken while compiling (fastvlm.ops.compiled)


class _NormLinearFunction(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher's per-call cost (eager mode only)."""

    @staticmethod
    def forward(ctx, x, w, w_up, nw, res, eps, act, rstd):
        y, h, rstd = _forward(x, w, w_up, nw, res, eps, act, True, rstd)
        ctx.act = act
        ctx.save_for_backward(x, w, w_up, nw, h, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        n = ctx.needs_input_grad
        return (*_backward(ctx.saved_tensors, gy, ctx.act, n[:5]), None, None, None)


# ------------------------------------------------------------------------------------------------ functional


def norm_linear(x, w, *, w_up=None, norm_weight=None, residual=None, eps=1e-6, act="none", rstd=None):
    """``[residual +] linear(rmsnorm(x))`` or, with ``w_up``, ``[residual +] act(rmsnorm(x) @ w^T) *
    (rmsnorm(x) @ w_up^T)`` (a gated pair: Idefics2's gate_proj / up_proj). No biases (Idefics2's perceiver has
    none). The RMSNorm is transformers' (``w * (x * rstd).to(x.dtype)``), applied while the GEMM loads x; the residual
    is added in the GEMM's epilogue. ``x`` [..., K] with any leading dimensions; ``residual`` has the output's shape.
    ``rstd``: x's row statistics from ``rms_rstd(x, eps)`` when several GEMMs normalise the same x (computed here
    otherwise).
    Eager calls skip the torch.library dispatcher; under torch.compile the call is the registered custom op."""
    if x.dim() == 0 or (residual is not None and residual.dim() == 0):
        raise ValueError("norm_linear: x and residual need a feature dimension [..., features], got a 0-D tensor")
    lead = x.shape[:-1]
    x2 = _checks.as_rows(x)
    r2 = _checks.as_rows(residual) if residual is not None else None
    if rstd is not None:
        rstd = rstd.reshape(-1).detach()
    key = None if torch.compiler.is_compiling() else (act, _hot.devices_key((x2, w, w_up, norm_weight, r2, rstd)))
    reasons = _CHECKED.get(key) if key is not None else None
    if reasons is None:  # a new shape key: the checks (shapes, dtypes, devices only) and the kernel's reasons
        _validate(x2, w, w_up, norm_weight, r2, act)
        if rstd is not None and (norm_weight is None or rstd.shape != (x2.shape[0],) or not rstd.is_floating_point()):
            raise ValueError(f"norm_linear: rstd must be a float [{x2.shape[0]}] tensor and needs a norm weight")
        reasons = _reasons(x2, w, w_up, norm_weight, r2)
        if key is not None:
            _hot.remember(_CHECKED, key, reasons)
    norm_weight, rstd = _checks.dense(norm_weight, rstd)  # per call (a no-op for parameters)
    tensors = (x2, w, w_up, norm_weight, r2)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if torch.compiler.is_compiling() or _checks.is_meta(x2):  # meta: shape tracing, answered by the fake
        op = compiled.op_for(OP_NAME, x2, (("w", w), ("w_up", w_up), ("norm_weight", norm_weight), ("residual", r2))) \
            if torch.compiler.is_compiling() else torch.ops.fastvlm.norm_linear
        y = op(*tensors, float(eps), act, needs_grad, rstd)[0]
    elif needs_grad:
        y = _NormLinearFunction.apply(*tensors, float(eps), act, rstd)
    else:
        y = _forward(*tensors, float(eps), act, False, rstd, reasons)[0]
    return y.reshape(*lead, y.shape[-1])


_CHECKED = {}  # (act, tensors' metadata) -> the kernel's reasons (the checks passed for this key)


# ------------------------------------------------------------------------------------------------ the resampler


def perceiver_resampler(context, key_mask, latents, layers, norm_weight, *, eps, heads, kv_heads, head_dim,
                        act="silu"):
    """Idefics2's Perceiver resampler: ``context`` [B, P, H], ``key_mask`` [B, P] keep-flags (or None), ``latents``
    [n, H]; ``layers``: one dict per layer with the weights ``latents_norm``, ``context_norm``, ``q``, ``k``, ``v``,
    ``o``, ``post_norm``, ``gate``, ``up``, ``down``; ``norm_weight``: the final RMSNorm's. Returns [B, n, H]."""
    B, P, Hd = context.shape
    n = latents.shape[0]
    ctx = context.reshape(B * P, Hd)
    scale = head_dim ** -0.5
    ctx_rstd = rms_rstd(ctx, eps) if layers else None  # the context never changes: one statistics pass for all
    lat = None  # [B * n, Hd] after the first layer
    for i, ly in enumerate(layers):
        if lat is None:
            # the first layer's latents are shared by the batch: project them once, read with a stride-0 batch
            src, bq = latents, 1
        else:
            src, bq = lat, B
        nl = dict(norm_weight=ly["latents_norm"], eps=eps, rstd=rms_rstd(src, eps))  # shared by q, k2, v2
        q = norm_linear(src, ly["q"], **nl).view(bq, n, heads, head_dim).transpose(1, 2)
        k2 = norm_linear(src, ly["k"], **nl).view(bq, n, kv_heads, head_dim).transpose(1, 2)
        v2 = norm_linear(src, ly["v"], **nl).view(bq, n, kv_heads, head_dim).transpose(1, 2)
        if bq != B:
            q, k2, v2 = (t.expand(B, *t.shape[1:]) for t in (q, k2, v2))
        nc = dict(norm_weight=ly["context_norm"], eps=eps, rstd=ctx_rstd)
        k1 = norm_linear(ctx, ly["k"], **nc).view(B, P, kv_heads, head_dim).transpose(1, 2)
        v1 = norm_linear(ctx, ly["v"], **nc).view(B, P, kv_heads, head_dim).transpose(1, 2)
        o = attention(q, k1, v1, key_mask=key_mask, k2=k2, v2=v2, scale=scale)  # [B, n, heads, head_dim]
        residual = lat if lat is not None else latents.unsqueeze(0).expand(B, n, Hd).reshape(B * n, Hd)
        lat = norm_linear(o.reshape(B * n, heads * head_dim), ly["o"], residual=residual)
        a = norm_linear(lat, ly["gate"], w_up=ly["up"], norm_weight=ly["post_norm"], eps=eps, act=act)
        lat = norm_linear(a, ly["down"], residual=lat)
    if lat is None:  # depth 0
        lat = latents.unsqueeze(0).expand(B, n, Hd).reshape(B * n, Hd)
    out = norm_ref(lat, "rmsnorm", norm_weight, None, Hd, eps)
    return out.view(B, n, Hd)


# ------------------------------------------------------------------------------------------------ audit


_GEMM_VARIANTS = (  # (name, base variant of kernels/gemm.py's audit, flags): what norm_linear launches
    ("perceiver_rmsnorm_linear", "rmsnorm_linear", dict(HAS_BIAS=False)),  # q / k / v projections
    ("perceiver_linear+res", "rmsnorm_linear", dict(NORM="none", NORM_ALIGNED=False, HAS_BIAS=False,
                                                     HAS_RES=True)),  # o_proj, down_proj
    ("perceiver_rmsnorm_swiglu", "swiglu_gated+res", dict(NORM="rmsnorm", NORM_ALIGNED=True, HAS_RES=False)),
    ("perceiver_rmsnorm_swiglu+pre", "swiglu_gated+res", dict(NORM="rmsnorm", NORM_ALIGNED=True, HAS_RES=False,
                                                              STORE_PRE=True)),  # training
)


def audit_cases():
    """sm_90a compile cases for the fused-GEMM variants ``norm_linear`` launches (bf16, every config the GEMM's
    pruner keeps for that variant), derived from kernels/gemm.py's cases with the perceiver's flags."""
    from fastvlm.kernels import gemm

    base = gemm.audit_cases()
    cases = []
    for name, src, flags in _GEMM_VARIANTS:
        for c in base:
            if c["name"].startswith(f"fused_linear[{src}]"):
                cases.append(dict(c, name=c["name"].replace(f"[{src}]", f"[{name}]"),
                                  constexprs=dict(c["constexprs"], **flags)))
    return cases
