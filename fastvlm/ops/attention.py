"""``fastvlm::attention``: the attention core ``softmax(scale * q k^T + masks) v`` for short queries over a few hundred
keys (BLIP-2 / InstructBLIP Q-Former cross- and self-attention) as one custom op.

Reads top to bottom: validation -> the two forward paths (the Triton launcher in fastvlm.kernels.attention, the
PyTorch path fastvlm.reference.attention.attention_ref) -> backward -> torch.library registration (fake + autograd)
-> the public functional.

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D] any strides (e.g. ``linear(x).view(B, L, H, D).transpose(1, 2)``);
                                         Hkv divides H (grouped-query attention: head h reads kv head h // (H/Hkv),
                                         never repeated in memory)
    k2/v2 [B, Hkv, Lk2, D] (optional)    a second key/value source whose keys follow k's: attention over
                                         concat(k, k2) without building it (Idefics2's Perceiver: context, latents)
    key_mask  [B, Lk]                    keep-flags (bool / integer, nonzero = attend) or a float additive bias, on
                                         the first source only
    attn_mask [B|1, H|1, Lq|1, Lk+Lk2]   keep-flags (bool) or a float additive bias (transformers' 4-D masks)
    returns   O [B, Lq, H, D]            transformers' attention-function layout: ``O.reshape(B, Lq, H * D)`` is free

The op returns (O, LSE [B, H, Lq] fp32); backward runs in PyTorch ops from q, k, v and the saved LSE (the softmax is
recomputed, the [B, H, Lq, Lk] probabilities are never kept). Gradients flow to q, k, v and to float (additive) masks.
A Triton backward is future work.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from fastvlm import _dispatch, _hot, choice
from fastvlm.ops import _checks, compiled
from fastvlm.reference.attention import attention_ref, full_kv, keep_flags, probs_from_lse, scores_ref

OP_NAME = "fastvlm::attention"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (16, 128)  # D range the kernel is audited for (BLOCK_D = next power of 2, HEADS * BLOCK_D <= 256)


# ------------------------------------------------------------------------------------------------ validation


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(q, k, v, key_mask, attn_mask, k2=None, v2=None):
    """Shape errors, named after the tensor at fault."""
    if (k2 is None) != (v2 is None):
        raise ValueError("attention: give k2 and v2 together, or neither")
    extra = (("k2", k2), ("v2", v2)) if k2 is not None else ()
    for name, t in (("q", q), ("k", k), ("v", v)) + extra:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D [batch, heads, length, head_dim] tensor, "
                             f"got {_shape(t)}")
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    HKV = k.shape[1]
    if k.shape[0] != B or (HKV == 0) != (H == 0) or (HKV and H % HKV) or k.shape[3] != D:  # (0 heads: as eager)
        raise ValueError(f"attention: k must be [{B}, {H}, keys, {D}] (or [{B}, kv_heads, keys, {D}] with kv_heads "
                         f"dividing {H}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"attention: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    LK2 = 0
    if k2 is not None:
        LK2 = k2.shape[2]
        if k2.shape[0] != B or k2.shape[1] != HKV or k2.shape[3] != D:
            raise ValueError(f"attention: k2 must be [{B}, {HKV}, keys2, {D}] to match k {tuple(k.shape)}, got "
                             f"{tuple(k2.shape)}")
        if v2.shape != k2.shape:
            raise ValueError(f"attention: v2 must have k2's shape {tuple(k2.shape)}, got {tuple(v2.shape)}")
        if k2.dtype != q.dtype or v2.dtype != q.dtype:
            raise ValueError(f"attention: k2 and v2 must be {q.dtype} like q, got {k2.dtype}, {v2.dtype}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or tuple(key_mask.shape) != (B, LK):
            raise ValueError(f"attention: key_mask must be [{B}, {LK}] (batch, keys), got {_shape(key_mask)}")
        if key_mask.device != q.device:
            raise ValueError(f"attention: key_mask is on {key_mask.device} but q is on {q.device}")
    if attn_mask is not None:
        ok = (isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 4 and attn_mask.shape[0] in (1, B)
              and attn_mask.shape[1] in (1, H) and attn_mask.shape[2] in (1, LQ)
              and attn_mask.shape[3] == LK + LK2)
        if not ok:
            raise ValueError(f"attention: attn_mask must be [{B} or 1, {H} or 1, {LQ} or 1, {LK + LK2}], got "
                             f"{_shape(attn_mask)}")
        if attn_mask.device != q.device:
            raise ValueError(f"attention: attn_mask is on {attn_mask.device} but q is on {q.device}")


def _kernel_reasons(q, k, v, key_mask, attn_mask, k2=None, v2=None):
    """Why the Triton kernel cannot run these inputs (empty list when it can)."""
    reasons = []
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"q dtype {q.dtype} is not one of float16/bfloat16/float32")
    for name, t in (("k", k), ("v", v), ("k2", k2), ("v2", v2)):
        if t is not None and t.device != q.device:
            reasons.append(f"{name} is on {t.device} but q is on {q.device}")
    D = q.shape[-1]
    if not KERNEL_HEAD_DIMS[0] <= D <= KERNEL_HEAD_DIMS[1]:
        reasons.append(f"head dim {D} is outside the kernel's range {KERNEL_HEAD_DIMS}")
    return reasons


# ------------------------------------------------------------------------------------------------ forward paths


def _detail(q, k, key_mask, attn_mask, k2):
    masks = "+".join(n for n, m in (("key_mask", key_mask), ("attn_mask", attn_mask)) if m is not None)
    return (f"q{tuple(q.shape)} k{tuple(k.shape)}" + (f" k2{tuple(k2.shape)}" if k2 is not None else "")
            + f" {str(q.dtype).replace('torch.', '')}" + (f" {masks}" if masks else ""))


@functools.lru_cache(maxsize=None)
def _launcher():
    from fastvlm.kernels.attention import attention_fwd  # (imports triton: on first use)

    return attention_fwd


def _forward(q, k, v, key_mask, attn_mask, scale, k2=None, v2=None, reasons=None):
    """(O [B, Lq, H, D], LSE [B, H, Lq] fp32, fp64 for fp64 inputs). ``reasons``: the kernel's reasons for these
    inputs when the caller has them from its checked key."""
    if reasons is None:
        reasons = tuple(_kernel_reasons(q, k, v, key_mask, attn_mask, k2, v2))
    # per call, never cached with the shape key: autocast's state and the scale's value
    reasons = list(reasons) + _checks.autocast_reasons(q.device)
    if not 0.0 < scale < float("inf"):  # eager attention takes any scale; the kernel folds 1 / scale into its masks
        reasons.append(f"scale {scale} is not positive and finite (the kernel needs 0 < scale < inf)")
    def kernel():
        return _launcher()(q, k, v, key_mask=key_mask, attn_mask=attn_mask, scale=scale, k2=k2, v2=v2)

    def eager():
        return attention_ref(q, k, v, key_mask, attn_mask, scale, k2, v2)

    detail = lambda: _detail(q, k, key_mask, attn_mask, k2)  # noqa: E731
    fast_key = lambda: (q.shape, k.shape, None if k2 is None else k2.shape, q.dtype, q.device,
                None if key_mask is None else key_mask.shape, None if attn_mask is None else attn_mask.shape)  # noqa: E731
    per_shape = choice.per_shape(OP_NAME, q.device, fast_key, detail, kernel, eager)
    backend = _dispatch.choose_backend(OP_NAME, q.device, reasons, detail, per_shape)
    return kernel() if backend == "triton" else eager()


# ------------------------------------------------------------------------------------------------ backward


def _split_kv_grad(g, k, k2):
    """dL/d(every key's row) [B, H, Lk + Lk2, D] -> (dL/dk, dL/dk2): summed over each kv head's query-head group
    (GQA) and split between the two sources."""
    B, H, L, D = g.shape
    hkv = k.shape[1]
    if H != hkv:
        g = g.view(B, hkv, H // hkv, L, D).sum(2)
    if k2 is None:
        return g.to(k.dtype), None
    lk = k.shape[2]
    return g[:, :, :lk].to(k.dtype), g[:, :, lk:].to(k2.dtype)


def _backward(saved, go, scale, needs):
    """Gradients of (q, k, v, key_mask, attn_mask, k2, v2) from dL/dO; the softmax is recomputed from the scores
    (rows whose saved LSE is -inf, without a key, get zero probabilities).
    GQA and the second source are handled on the full key set (``full_kv``: torch ops, kv heads repeated for the
    recomputation only); key and value gradients are summed back over each kv head's group."""
    q, k, v, key_mask, attn_mask, lse, k2, v2 = saved
    need_q, need_k, need_v, need_km, need_am, need_k2, need_v2 = needs
    ct = lse.dtype
    kf, vf, kmf = full_kv(q, k, v, key_mask, k2, v2)
    p = probs_from_lse(scores_ref(q, kf, kmf, attn_mask, scale, ct), lse)  # [B, H, Lq, Lk + Lk2]
    go = go.transpose(1, 2).to(ct)  # [B, H, Lq, D]
    gq = gk = gv = gkm = gam = gk2 = gv2 = None
    if need_v or need_v2:
        gv, gv2 = _split_kv_grad(torch.matmul(p.transpose(-1, -2), go), v, v2)
    if need_q or need_k or need_k2 or need_km or need_am:
        gp = torch.matmul(go, vf.to(ct).transpose(-1, -2))
        gs = p * (gp - (p * gp).sum(-1, keepdim=True))  # dL/dscores (natural units, before the scale)
        if need_q:
            gq = (torch.matmul(gs, kf.to(ct)) * scale).to(q.dtype)
        if need_k or need_k2:
            gk, gk2 = _split_kv_grad(torch.matmul(gs.transpose(-1, -2), q.to(ct)) * scale, k, k2)
        if need_km:
            gkm = gs.sum(dim=(1, 2))[:, :k.shape[2]].to(key_mask.dtype)
        if need_am:
            gam = gs.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return (gq, gk if need_k else None, gv if need_v else None, gkm, gam, gk2 if need_k2 else None,
            gv2 if need_v2 else None)


def _float_mask_needs_grad(m, need):
    return bool(need) and m is not None and m.is_floating_point()


# ------------------------------------------------------------------------------------------------ registration


@torch.library.custom_op(OP_NAME, mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                 attn_mask: Optional[torch.Tensor], scale: float, k2: Optional[torch.Tensor] = None,
                 v2: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (O [B, Lq, H, D], LSE [B, H, Lq]); LSE is what backward needs. ``k2``/``v2`` (a second key/value
    source) are trailing optional arguments, so calls with the original six arguments keep working."""
    return _forward(q, k, v, key_mask, attn_mask, scale, k2, v2)


@attention_op.register_fake
def _(q, k, v, key_mask, attn_mask, scale, k2=None, v2=None):
    B, H, LQ, D = q.shape
    return q.new_empty((B, LQ, H, D)), q.new_empty((B, H, LQ), dtype=torch.promote_types(q.dtype, torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, attn_mask, scale, k2, v2 = inputs
    _, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, key_mask, attn_mask, lse, k2, v2)
    ctx.mark_non_differentiable(lse)


def _needs(n, key_mask, attn_mask, k2):
    return (n[0], n[1], n[2], _float_mask_needs_grad(key_mask, n[3]), _float_mask_needs_grad(attn_mask, n[4]),
            k2 is not None and n[6], k2 is not None and n[7])


def _op_backward(ctx, go, _glse):
    q, k, v, key_mask, attn_mask, lse, k2, v2 = ctx.saved_tensors
    gq, gk, gv, gkm, gam, gk2, gv2 = _backward((q, k, v, key_mask, attn_mask, lse, k2, v2), go, ctx.scale,
                                               _needs(ctx.needs_input_grad, key_mask, attn_mask, k2))
    return gq, gk, gv, gkm, gam, None, gk2, gv2


attention_op.register_autograd(_op_backward, setup_context=_setup_context)
compiled.register(attention_op)  # its triton_op twin, taken while compiling (fastvlm.ops.compiled)


class _AttentionFunction(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher's per-call cost (eager mode only)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, attn_mask, scale, k2, v2):
        o, lse = _forward(q, k, v, key_mask, attn_mask, scale, k2, v2)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, key_mask, attn_mask, lse, k2, v2)
        return o

    @staticmethod
    def backward(ctx, go):
        q, k, v, key_mask, attn_mask, lse, k2, v2 = ctx.saved_tensors
        gq, gk, gv, gkm, gam, gk2, gv2 = _backward((q, k, v, key_mask, attn_mask, lse, k2, v2), go.contiguous(),
                                                   ctx.scale, _needs(ctx.needs_input_grad, key_mask, attn_mask, k2))
        return gq, gk, gv, gkm, gam, None, gk2, gv2


# ------------------------------------------------------------------------------------------------ functional


def attention(q, k, v, *, key_mask=None, attn_mask=None, scale=None, k2=None, v2=None):
    """``softmax(scale * q k^T + masks) v`` -> O [B, Lq, H, D] (transformers' attention-function output layout).

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D] with any strides; Hkv may divide H (grouped-query attention, no repeat
    copy). ``k2``/``v2`` [B, Hkv, Lk2, D]: a second key/value source appended after the first (the keys are
    ``concat(k, k2)``, never materialised; ``key_mask`` covers the first source, ``attn_mask`` both). ``key_mask`` [B, Lk]: keep-flags (bool or integer, nonzero =
    attend, as a tokenizer's attention_mask / transformers' 2-D encoder_attention_mask) or a float additive bias.
    ``attn_mask`` [B|1, H|1, Lq|1, Lk]: bool keep-flags or a float additive bias (transformers' 4-D masks, e.g.
    InstructBLIP's self-attention over queries + instruction tokens). ``scale`` defaults to ``D ** -0.5``.
    Special rows as eager attention gives them: a row masked entirely by transformers' finite ``finfo.min`` bias
    averages its values; a row whose kept keys all score -inf, or that meets a NaN, is NaN. A row whose every key
    is masked by keep-flags gives zeros (as SDPA does). Eager calls skip the torch.library dispatcher; under
    torch.compile the call is the registered custom op.
    """
    try:
        key = None if torch.compiler.is_compiling() else _hot.devices_key((q, k, v, key_mask, attn_mask, k2, v2))
    except AttributeError:  # something else than a tensor: the checks name it
        key = None
    reasons = _CHECKED.get(key) if key is not None else None
    if reasons is None:  # a new shape key: the checks (shapes, dtypes, devices only) and the kernel's reasons
        _validate(q, k, v, key_mask, attn_mask, k2, v2)
        reasons = tuple(_kernel_reasons(q, k, v, keep_flags(key_mask), keep_flags(attn_mask), k2, v2))
        if key is not None:
            _hot.remember(_CHECKED, key, reasons)
    key_mask = keep_flags(key_mask)
    attn_mask = keep_flags(attn_mask)
    if scale is None and q.shape[-1] == 0:
        raise ValueError(f"attention: q {tuple(q.shape)} has head_dim 0, so the default scale head_dim ** -0.5 is "
                         f"undefined; pass scale")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    tensors = (q, k, v, key_mask, attn_mask)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, k2, v2))
    if torch.compiler.is_compiling() or _checks.is_meta(q):  # meta: shape tracing, answered by the fake
        op = compiled.op_for(OP_NAME, q, (("k", k), ("v", v), ("k2", k2), ("v2", v2))) \
            if torch.compiler.is_compiling() else torch.ops.fastvlm.attention
        if k2 is None:
            return op(*tensors, scale)[0]
        return op(*tensors, scale, k2, v2)[0]
    if needs_grad:
        return _AttentionFunction.apply(*tensors, scale, k2, v2)
    return _forward(*tensors, scale, k2, v2, reasons)[0]


_CHECKED = {}  # tensors' metadata -> the kernel's reasons (the checks passed for this key)
