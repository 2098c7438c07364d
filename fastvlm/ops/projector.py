"""``fastvlm::mlp_projector``: [merge/pool] -> [norm] -> linear_1 -> act -> [linear_2 -> act2] as one custom op.

Reads top to bottom: validation -> the two forward paths (the Triton launchers in fastvlm.kernels; the PyTorch path,
``Spec`` and the backward in fastvlm.ops.projector_torch) -> torch.library registration (fake + autograd) -> the
public functional.

The input ``x`` [T, D] holds vision tokens. The GEMM reads a *logical* A [M, K] from it (fastvlm.ops.layout):
    a_mode "strided"    A = x (a free view, e.g. Qwen2-VL's 2x2 merge ``x.view(-1, 4 * D)``)
    a_mode "concat"     A[m] = concat of x[rows[m, q]], q = 0..Q-1 (pixel shuffle, patch-major)
    a_mode "concat_cm"  the same merge in channel-major column order (F.unfold)
    a_mode "mean"       A[m] = mean of x[rows[m, q]] (k x k average pooling)
    a_mode "max"        A[m] = max of x[rows[m, q]] (k x k max pooling; no norm)
The norm runs on groups of ``norm_group`` columns of A, or, with ``norm_src``, on the rows of x before the merge.

What is fused (Triton path; one small statistics pass when there is a norm, then one launch per linear):
    stats  = row_stats(x or A)                  fp32 mean/rstd per norm row
    a, h   = GEMM(A -> norm on load, W1, + b1 -> [h stored only when training] -> act)
    y, z   = GEMM(a, W2, + b2 -> [z stored only when training and act2] -> act2)
Neither the merged/pooled A, nor its normalised form, nor act(h) is kept for backward:

    saved for backward   x (already held by the caller), the row table, fp32 stats, h, z (only with act2)
    recomputed           A and norm(A) from x and the stats, act(h)
    eager transformers   keeps the shuffled copy, norm(A), h and act(h)

Backward runs in PyTorch ops (cuBLAS GEMMs, fp32 elementwise math, index_add for the merge's adjoint); a Triton
backward is future work.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Optional

import torch

from fastvlm import _dispatch, _hot, choice
from fastvlm.ops import _checks, _fast, compiled
from fastvlm.ops.projector_torch import Spec, backward, forward_torch, saves_h
from fastvlm.reference.activations import ACTIVATIONS

OP_NAME = "fastvlm::mlp_projector"
NORMS = ("none", "layernorm", "rmsnorm", "rmsnorm_1p")
A_MODES = ("strided", "concat", "concat_cm", "mean", "max")



def _k_of(x, rows, a_mode):
    return x.shape[1] * rows.shape[1] if a_mode in ("concat", "concat_cm") else x.shape[1]


# ------------------------------------------------------------------------------------------------ validation


def _validate(x, w1, b1, w2, b2, norm_weight, norm_bias, rows, s: Spec, w_up=None, b_up=None):
    """Shape errors that the original modules would also reject, named after the tensor at fault."""
    if x.dim() != 2:
        raise ValueError(f"mlp_projector: x must be 2-D [tokens, features] here, got shape {tuple(x.shape)}")
    if s.a_mode not in A_MODES:
        raise ValueError(f"mlp_projector: a_mode must be one of {A_MODES}, got {s.a_mode!r}")
    K = x.shape[1] if s.a_mode == "strided" else _k_of(x, rows, s.a_mode)
    if w1.dim() != 2 or w1.shape[1] != K:
        raise ValueError(f"mlp_projector: linear_1.weight must be [out, {K}] for input features of width {K}, "
                         f"got {tuple(w1.shape)}")
    if b1 is not None and b1.shape != (w1.shape[0],):
        raise ValueError(f"mlp_projector: linear_1.bias must be [{w1.shape[0]}], got {tuple(b1.shape)}")
    if w_up is not None:  # a gated pair with its own up weight (Idefics2's gate_proj / up_proj)
        if w_up.shape != w1.shape:
            raise ValueError(f"mlp_projector: up_proj.weight must be {tuple(w1.shape)} like gate_proj, got "
                             f"{tuple(w_up.shape)}")
        if (b_up is None) != (b1 is None):
            raise ValueError("mlp_projector: give biases to both gate and up projections, or to neither")
    elif s.gated and w1.shape[0] % 2:
        raise ValueError(f"mlp_projector: a gated linear_1 needs an even output width, got {w1.shape[0]}")
    hidden = w1.shape[0] // 2 if (s.gated and w_up is None) else w1.shape[0]
    if w2 is not None:
        if w2.dim() != 2 or w2.shape[1] != hidden:
            raise ValueError(f"mlp_projector: linear_2.weight must be [out, {hidden}], got {tuple(w2.shape)}")
        if b2 is not None and b2.shape != (w2.shape[0],):
            raise ValueError(f"mlp_projector: linear_2.bias must be [{w2.shape[0]}], got {tuple(b2.shape)}")
    elif b2 is not None or s.act2 != "none":
        raise ValueError("mlp_projector: linear_2.bias / act2 given without linear_2.weight")
    for name, a in (("act", s.act), ("act2", s.act2)):
        if a not in ACTIVATIONS:
            raise ValueError(f"mlp_projector: {name} must be one of {ACTIVATIONS}, got {a!r}")
    if s.norm not in NORMS:
        raise ValueError(f"mlp_projector: norm must be one of {NORMS}, got {s.norm!r}")
    if s.a_mode == "max" and s.norm != "none":
        raise ValueError("mlp_projector: a_mode 'max' takes no norm (no connector normalises max-pooled rows)")
    if s.norm != "none":
        width = x.shape[1] if s.norm_src else K
        if s.norm_group <= 0 or width % s.norm_group:
            raise ValueError(f"mlp_projector: the norm width {s.norm_group} must divide the normalised width {width}")
        if s.norm_src and (s.a_mode not in ("concat", "concat_cm") or s.norm_group != x.shape[1]
                           or s.norm == "rmsnorm_1p"):
            raise ValueError("mlp_projector: norm_src (a norm before the merge) needs a concat a_mode, a norm over "
                             "each whole token row, and layernorm or rmsnorm")
        if norm_weight is None or norm_weight.shape != (s.norm_group,):
            raise ValueError(f"mlp_projector: norm weight must be [{s.norm_group}], got "
                             f"{None if norm_weight is None else tuple(norm_weight.shape)}")
        if norm_bias is not None and (s.norm != "layernorm" or norm_bias.shape != (s.norm_group,)):
            raise ValueError(f"mlp_projector: norm bias must be [{s.norm_group}] and only with a layernorm")


def _kernel_reasons(x, tensors):
    """Why the Triton kernels cannot run these inputs (empty list when they can); dtypes and devices only (cached per
    shape key: autocast's state is added per call in ``_forward``)."""
    return _dispatch.dtype_device_reasons(x, tensors)



# ------------------------------------------------------------------------------------------------ forward paths


# A pooled A-load ("mean"/"max") reads all Q source rows of every pooled row once per N tile of the GEMM (the GEMM's
# widest tile is 128 columns). Past one N tile it moves fewer bytes to pool first (one pass over x, writing the
# pooled A at 1/Q of its size) and run the plain GEMM on the pooled rows: docs/design-projector.md, "Pool first".
POOL_FIRST_MIN_N = 129


def _pool_first(x, rows, w1, s: Spec):
    """(x, rows, s) for the GEMM: the pooled rows as a strided A when that moves fewer bytes, else unchanged."""
    if s.a_mode not in ("mean", "max") or w1.shape[0] < POOL_FIRST_MIN_N:
        return x, rows, s
    from fastvlm.kernels.pool import pool_rows

    return pool_rows(x, rows, s.a_mode), None, _strided_spec(s)


@functools.lru_cache(maxsize=1024)
def _strided_spec(s: Spec):
    """``s`` with a strided A-load (the pooled rows); one object per spec (eager calls share Spec objects)."""
    return replace(s, a_mode="strided")


@functools.lru_cache(maxsize=None)
def _kernels():
    """The launchers (imported on first use: fastvlm.kernels imports triton)."""
    from fastvlm.kernels.gemm import fused_linear
    from fastvlm.kernels.norm_stats import row_stats

    return fused_linear, row_stats


def _forward_triton(x, w1, b1, w2, b2, nw, nb, rows, s: Spec, save, w_up=None, b_up=None, memo=None):
    """``memo``: a dict kept by the caller under its checked key (see ``fused_linear``'s ``memo``)."""
    fused_linear, row_stats = _kernels()
    m1 = m2 = None
    if memo is not None:
        m1, m2 = memo.get((1, save)), memo.get((2, save))
        if m1 is None:
            m1, m2 = memo[(1, save)], memo[(2, save)] = [None], [None]
        elif not save and m1[0] is not None and _plain(s, w_up):
            # the plain linear(s) of a repeat call: nothing below depends on more than the key (x's layout is part
            # of it; the launches were planned for unit column stride)
            y = fused_linear(x if x.stride(1) == 1 else x.contiguous(), w1, b1, act=s.act, memo=m1)
            if w2 is not None:
                y = fused_linear(y, w2, b2, act=s.act2, memo=m2)
            return y, None, None, None, None

    if x.stride(1) != 1:
        x = x.contiguous()
    x, rows, s = _pool_first(x, rows, w1, s)  # the caller keeps the original x and rows for the backward
    mean = rstd = None
    K = _k_of(x, rows, s.a_mode)
    if s.norm != "none":
        rms = s.norm != "layernorm"
        if s.norm_src:
            mean, rstd = row_stats(x, s.eps, rms)
        elif s.a_mode == "strided":
            if s.norm_group != K and not x.is_contiguous():
                x = x.contiguous()
            ms = memo.setdefault((0, save), [None]) if memo is not None and s.norm_group == K else None
            mean, rstd = row_stats(x.reshape(-1, s.norm_group) if s.norm_group != K else x, s.eps, rms, memo=ms)
        else:  # a norm over whole merged (concat) or pooled (mean) rows
            mean, rstd = row_stats(x, s.eps, rms, rows=rows, mode=s.a_mode)
    gate = {}
    if w_up is not None:  # separate gate and up weights
        gate = dict(up_weight=w_up, up_bias=b_up)
    elif s.gated:  # (up, gate) halves of one Linear: views, no copy
        half = w1.shape[0] // 2
        gate = dict(up_weight=w1[:half], up_bias=None if b1 is None else b1[:half])
        w1, b1 = w1[half:], None if b1 is None else b1[half:]
    first = fused_linear(x, w1, b1, act=s.act, norm=s.norm, norm_group=s.norm_group, mean=mean, rstd=rstd,
                         norm_weight=nw, norm_bias=nb, norm_src=s.norm_src, a_rows=rows, a_mode=s.a_mode,
                         store_pre=save and saves_h(w2, s), memo=m1, **gate)
    a, h = first if isinstance(first, tuple) else (first, None)
    z = None
    y = a
    if w2 is not None:
        second = fused_linear(a, w2, b2, act=s.act2, store_pre=save and s.act2 != "none", memo=m2)
        y, z = second if isinstance(second, tuple) else (second, None)
    return y, h, z, mean, rstd


def _detail(x, w1, w2, rows, s):
    detail = f"x{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} -> {(w2 if w2 is not None else w1).shape[0]}"
    if s.a_mode != "strided":
        detail += f" ({s.a_mode} of {rows.shape[1]})"
    return detail


def _named(w1, b1, w2, b2, nw, nb, w_up, b_up):
    return (("linear_1.weight", w1), ("linear_1.bias", b1), ("linear_2.weight", w2), ("linear_2.bias", b2),
            ("norm.weight", nw), ("norm.bias", nb), ("up_proj.weight", w_up), ("up_proj.bias", b_up))


def _reasons(x, w1, b1, w2, b2, nw, nb, w_up, b_up):
    return tuple(_kernel_reasons(x, _named(w1, b1, w2, b2, nw, nb, w_up, b_up)))


def _plain(s: Spec, w_up):
    """The plain linear(s): a strided A, no norm, not gated."""
    return s.a_mode == "strided" and s.norm == "none" and not s.gated and w_up is None


def _forward(x, w1, b1, w2, b2, nw, nb, rows, s: Spec, save, w_up=None, b_up=None, reasons=None, memo=None,
             tok=None):
    """(y, h, z, mean, rstd); h/z/mean/rstd are None when not saved. ``reasons`` / ``memo``: the kernel's reasons for
    these inputs and the launchers' memo, when the caller has them from its checked key. ``tok``
    (``fastvlm.ops._fast.token()``): the memo is marked when the plain linear(s) ran the kernels under it."""
    if rows is not None:  # the table's values, on every call (never cached with the shape key; under torch.compile too)
        _checks.check_indices("mlp_projector", "rows", rows, x.shape[0])
    if reasons is None:
        reasons = _reasons(x, w1, b1, w2, b2, nw, nb, w_up, b_up)
    auto = _checks.autocast_reasons(x.device)  # per call, never cached with the shape key
    if s.norm != "none" and s.a_mode != "strided" and not s.norm_src and s.norm_group != _k_of(x, rows, s.a_mode):
        auto = auto + [f"a norm over {s.norm_group}-column groups of a {s.a_mode} row (the kernels normalise a whole "
                       "merged or pooled row, or each source row with norm_src)"]
    if auto:
        reasons = list(reasons) + auto

    def kernel():
        return _forward_triton(x, w1, b1, w2, b2, nw, nb, rows, s, save, w_up, b_up, memo)

    def eager():
        return forward_torch(x, w1, b1, w2, b2, nw, nb, rows, s, save, w_up, b_up)

    # the unfused formulation is a candidate beside the kernel (fastvlm.choice)
    fast_key = lambda: (x.shape, x.dtype, x.device, w1.shape, None if w2 is None else w2.shape,
                None if rows is None else rows.shape, w_up is None, s, save)  # noqa: E731
    per_shape = choice.per_shape(OP_NAME, x.device, fast_key,
                                 lambda: f"{_detail(x, w1, w2, rows, s)} w1{tuple(w1.shape)} {s} save={save}",
                                 kernel, eager)
    backend = _dispatch.choose_backend(OP_NAME, x.device, reasons, lambda: _detail(x, w1, w2, rows, s), per_shape)
    if backend != "triton":
        return eager()
    out = kernel()
    if tok is not None and memo is not None and not save and (not s.gated or w_up is not None) and (
            s.norm == "none" and s.a_mode in ("strided", "concat", "concat_cm")  # (no pooling first, no halves)
            or s.a_mode == "strided" and not s.norm_src and s.norm_group == x.shape[1]):  # (stats of x's rows)
        _fast.launched(memo, tok)
    return out


# ------------------------------------------------------------------------------------------------ registration


def _pack(x, out, save):
    """The custom op must return tensors: absent ones become empty tensors (the fake gives the same shapes)."""
    f = torch.promote_types(x.dtype, torch.float32)
    y, h, z, mean, rstd = out
    e = lambda dt: x.new_empty((0,), dtype=dt)  # noqa: E731
    return (y, h if h is not None else e(x.dtype), z if z is not None else e(x.dtype),
            mean if mean is not None else e(f), rstd if rstd is not None else e(f))


def _spec(norm, norm_group, eps, act, act2, a_mode, norm_src, gated=False):
    return Spec(norm, int(norm_group), float(eps), act, act2, a_mode, bool(norm_src), bool(gated))


@torch.library.custom_op(OP_NAME, mutates_args=())
def mlp_projector_op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: Optional[torch.Tensor],
                     b2: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                     norm_bias: Optional[torch.Tensor], rows: Optional[torch.Tensor], w_up: Optional[torch.Tensor],
                     b_up: Optional[torch.Tensor], norm: str, norm_group: int,
                     eps: float, act: str, act2: str, a_mode: str, norm_src: bool, gated: bool,
                     save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h, z, mean, rstd). h/z/mean/rstd are what backward needs (empty unless ``save``)."""
    s = _spec(norm, norm_group, eps, act, act2, a_mode, norm_src, gated)
    return _pack(x, _forward(x, w1, b1, w2, b2, norm_weight, norm_bias, rows, s, save, w_up, b_up), save)


@mlp_projector_op.register_fake
def _(x, w1, b1, w2, b2, norm_weight, norm_bias, rows, w_up, b_up, norm, norm_group, eps, act, act2, a_mode, norm_src,
      gated, save):
    s = _spec(norm, norm_group, eps, act, act2, a_mode, norm_src, gated)
    M = x.shape[0] if a_mode == "strided" else rows.shape[0]
    K = x.shape[1] if a_mode == "strided" else _k_of(x, rows, a_mode)
    f = torch.promote_types(x.dtype, torch.float32)
    width = w1.shape[0] // (2 if gated and w_up is None else 1)  # the first linear's (activated) output width
    y = x.new_empty((M, w2.shape[0] if w2 is not None else width))
    h = x.new_empty((M, w1.shape[0] * (2 if w_up is not None else 1)) if save and saves_h(w2, s) else (0,))
    z = x.new_empty((M, w2.shape[0]) if save and w2 is not None and act2 != "none" else (0,))
    if not save or norm == "none":
        n = 0
    elif norm_src:
        n = x.shape[0]
    elif a_mode == "strided":
        n = M * (K // norm_group)
    else:
        n = M
    mean = x.new_empty((n if norm == "layernorm" else 0,), dtype=f)
    rstd = x.new_empty((n,), dtype=f)
    return y, h, z, mean, rstd


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, nw, nb, rows, w_up, b_up, norm, norm_group, eps, act, act2, a_mode, norm_src, gated, save = inputs
    _, h, z, mean, rstd = output
    ctx.spec = _spec(norm, norm_group, eps, act, act2, a_mode, norm_src, gated)
    ctx.save_for_backward(x, w1, w2, nw, nb, rows, h, z, mean, rstd, w_up)
    ctx.mark_non_differentiable(h, z, mean, rstd)


def _op_backward(ctx, gy, _gh, _gz, _gmean, _grstd):
    n = ctx.needs_input_grad
    *saved, w_up = ctx.saved_tensors
    gx, gw1, gb1, gw2, gb2, gnw, gnb, gwu, gbu = backward(ctx.spec, saved, gy, (*n[:7], n[8], n[9]), w_up)
    return (gx, gw1, gb1, gw2, gb2, gnw, gnb, None, gwu, gbu, None, None, None, None, None, None, None, None, None)


mlp_projector_op.register_autograd(_op_backward, setup_context=_setup_context)
compiled.register(mlp_projector_op)  # fastvlm::mlp_projector_launch, taken while compiling (fastvlm.ops.compiled)


class _MLPProjectorFunction(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher's per-call cost (eager mode only)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, nw, nb, rows, s, w_up, b_up, lead):
        y, h, z, mean, rstd = _forward(x, w1, b1, w2, b2, nw, nb, rows, s, True, w_up, b_up)
        ctx.spec = s
        ctx.save_for_backward(x, w1, w2, nw, nb, rows, h, z, mean, rstd, w_up)
        # the result in its final shape as a tensor of its own, not a view of the [M, out] one: what a module
        # returns then passes wrappers that refuse views (FSDP2's pre-backward hook warns on them)
        return y if lead is None else y.view(*lead, y.shape[-1]).detach()

    @staticmethod
    def backward(ctx, gy):
        n = ctx.needs_input_grad
        *saved, w_up = ctx.saved_tensors
        gy = gy.reshape(-1, gy.shape[-1])
        gx, gw1, gb1, gw2, gb2, gnw, gnb, gwu, gbu = backward(ctx.spec, saved, gy, (*n[:7], n[9], n[10]), w_up)
        return gx, gw1, gb1, gw2, gb2, gnw, gnb, None, None, gwu, gbu, None


# ------------------------------------------------------------------------------------------------ functional


def mlp_projector(x, w1, b1=None, w2=None, b2=None, *, act="gelu", act2="none", norm="none", norm_weight=None,
                  norm_bias=None, norm_group=None, eps=1e-5, rows=None, a_mode="strided", norm_src=False,
                  gated=False, w_up=None, b_up=None, out_lead=None, _memo_out=None):
    """Fused ``act2(linear_2(act(linear_1(norm(A(x))))))``.

    Without ``rows`` this works over the last dimension of ``x`` (any leading dimensions). With ``rows`` (an int64
    [M, Q] table from fastvlm.ops.layout) ``x`` is [tokens, D] and A is the merged (``a_mode`` "concat",
    "concat_cm") or pooled ("mean" average, "max" maximum) rows; the result is [M, out].
    ``norm``: "none", "layernorm", "rmsnorm" (transformers' cast point), "rmsnorm_1p" (Gemma: fp32, weight 1 + w).
    ``norm_group``: the width the norm runs over (default: A's width); ``norm_src``: the norm runs on the rows of x
    before the merge. ``w2=None`` gives a single (optionally activated) linear. ``gated``: linear_1's output is
    chunked into (up, gate) halves and ``act(gate) * up`` feeds linear_2 (SwiGLU). ``w_up``/``b_up``: the same
    with separate weights, ``act(x @ w1^T) * (x @ w_up^T)`` (Idefics2's gate_proj / up_proj).
    ``out_lead``: with ``rows``, the result's leading dimensions instead of [M] (their product is M; a fused module's
    [batch, tokens] or grid). With autograd the result is a tensor of its own, never a view of a [M, out] one.
    Eager calls skip the torch.library dispatcher; under torch.compile the call is the registered custom op.
    ``_memo_out`` (internal, a dict): receives the launchers' memo of an eager inference call and the state token it
    ran under (``fastvlm.ops._fast``: a module's repeat path is built from them).
    """
    if rows is None:
        if a_mode != "strided":
            raise ValueError(f"mlp_projector: a_mode {a_mode!r} needs rows, an int64 [M, Q] table of token indices")
        if x.dim() == 0:
            raise ValueError("mlp_projector: x must have a feature dimension [..., features], got a 0-D tensor")
        lead = x.shape[:-1] if x.dim() != 2 else None
        x2 = _checks.as_rows(x)
        K = x2.shape[1]
    else:
        lead = None if out_lead is None else tuple(out_lead)
        x2 = x
        if x2.dim() != 2:
            raise ValueError(f"mlp_projector: x must be 2-D [tokens, features] with rows, got shape {tuple(x.shape)}")
        rows = _checks.row_table("mlp_projector", rows, x2)
        K = _k_of(x2, rows, a_mode)
    if norm == "none":
        group = K
    else:
        group = int(norm_group or (x2.shape[-1] if norm_src else K))
    gated = gated or w_up is not None
    if torch.compiler.is_compiling():  # traced once per graph: no per-call caches
        s = _spec(norm, group, eps, act, act2, a_mode, norm_src, gated)
        _validate(x2, w1, b1, w2, b2, norm_weight, norm_bias, rows, s, w_up, b_up)
        reasons = memo = None
    else:
        s = _cached_spec(norm, group, eps, act, act2, a_mode, norm_src, gated)
        key = (s, _hot.fp32_precision(), _hot.devices_key((x2, w1, b1, w2, b2, norm_weight, norm_bias, rows, w_up, b_up)))
        checked = _CHECKED.get(key)
        if checked is None:  # a new shape key: the checks (shapes, dtypes and devices only) and the kernel's reasons
            _validate(x2, w1, b1, w2, b2, norm_weight, norm_bias, rows, s, w_up, b_up)
            dense = all(t is None or t.is_contiguous() for t in (b1, b2, norm_weight, norm_bias, b_up))
            checked = (_reasons(x2, w1, b1, w2, b2, norm_weight, norm_bias, w_up, b_up), {}, dense and
                       not _checks.is_meta(x2))
            _hot.remember(_CHECKED, key, checked)
        reasons, memo, plain = checked
        if _memo_out is not None:
            _memo_out["memo"] = memo
        if plain:  # dense vectors and a real device, fixed by the key: the eager call, straight to the forward
            if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (
                    x2, w1, b1, w2, b2, norm_weight, norm_bias, w_up, b_up)):
                tok = None
                if _memo_out is not None:
                    tok = _memo_out["token"] = _fast.token()
                y = _forward(x2, w1, b1, w2, b2, norm_weight, norm_bias, rows, s, False, w_up, b_up, reasons,
                             memo, tok)[0]
                return y if lead is None else y.reshape(*lead, y.shape[-1])
    # per call (a no-op for parameters); the row table's values are checked per call in ``_forward``
    b1, b2, norm_weight, norm_bias, b_up = _checks.dense(b1, b2, norm_weight, norm_bias, b_up)
    tensors = (x2, w1, b1, w2, b2, norm_weight, norm_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, w_up, b_up))
    if torch.compiler.is_compiling() or _checks.is_meta(x2):  # meta: shape tracing, answered by the fake
        op = compiled.op_for(OP_NAME, x2, _named(w1, b1, w2, b2, norm_weight, norm_bias, w_up, b_up)) \
            if torch.compiler.is_compiling() else torch.ops.fastvlm.mlp_projector  # the twin: Inductor launches
        y = op(*tensors, rows, w_up, b_up, s.norm, s.norm_group, s.eps, s.act, s.act2, s.a_mode, s.norm_src, s.gated,
               needs_grad)[0]
    elif needs_grad:
        return _MLPProjectorFunction.apply(*tensors, rows, s, w_up, b_up, lead)
    else:
        y = _forward(*tensors, rows, s, False, w_up, b_up, reasons, memo)[0]
    return y if lead is None else y.reshape(*lead, y.shape[-1])


# (spec, fp32 precision, tensors' metadata) -> (the Triton kernel's reasons, the launchers' memo): the checks passed
_CHECKED = {}
_cached_spec = functools.lru_cache(maxsize=1024)(_spec)  # eager calls share Spec objects
