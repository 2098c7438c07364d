"""``fastvlm::attention``: the attention core ``softmax(scale * q k^T + masks) v`` for short queries over a few hundred
keys (BLIP-2 / InstructBLIP Q-Former cross- and self-attention) as one custom op.

Reads top to bottom: validation -> the two forward paths (the Triton launcher in fastvlm.kernels.attention, the
PyTorch path fastvlm.reference.attention.attention_ref) -> backward -> torch.library registration (fake + autograd)
-> the public functional.

    q [B, H, Lq, D], k/v [B, H, Lk, D]   any strides (e.g. ``linear(x).view(B, L, H, D).transpose(1, 2)``)
    key_mask  [B, Lk]                    keep-flags (bool / integer, nonzero = attend) or a float additive bias
    attn_mask [B|1, H|1, Lq|1, Lk]       keep-flags (bool) or a float additive bias (transformers' 4-D masks)
    returns   O [B, Lq, H, D]            transformers' attention-function layout: ``O.reshape(B, Lq, H * D)`` is free

The op returns (O, LSE [B, H, Lq] fp32); backward runs in PyTorch ops from q, k, v and the saved LSE (the softmax is
recomputed, the [B, H, Lq, Lk] probabilities are never kept). Gradients flow to q, k, v and to float (additive) masks.
A Triton backward is future work.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastvlm import _dispatch
from fastvlm.reference.attention import attention_ref, keep_flags, probs_from_lse, scores_ref

OP_NAME = "fastvlm::attention"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (16, 128)  # D range the kernel is audited for (BLOCK_D = next power of 2, HEADS * BLOCK_D <= 256)


# ------------------------------------------------------------------------------------------------ validation


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(q, k, v, key_mask, attn_mask):
    """Shape errors, named after the tensor at fault."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D [batch, heads, length, head_dim] tensor, "
                             f"got {_shape(t)}")
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"attention: k must be [{B}, {H}, keys, {D}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"attention: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or tuple(key_mask.shape) != (B, LK):
            raise ValueError(f"attention: key_mask must be [{B}, {LK}] (batch, keys), got {_shape(key_mask)}")
        if key_mask.device != q.device:
            raise ValueError(f"attention: key_mask is on {key_mask.device} but q is on {q.device}")
    if attn_mask is not None:
        ok = (isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 4 and attn_mask.shape[0] in (1, B)
              and attn_mask.shape[1] in (1, H) and attn_mask.shape[2] in (1, LQ) and attn_mask.shape[3] == LK)
        if not ok:
            raise ValueError(f"attention: attn_mask must be [{B} or 1, {H} or 1, {LQ} or 1, {LK}], got "
                             f"{_shape(attn_mask)}")
        if attn_mask.device != q.device:
            raise ValueError(f"attention: attn_mask is on {attn_mask.device} but q is on {q.device}")


def _kernel_reasons(q, k, v, key_mask, attn_mask):
    """Why the Triton kernel cannot run these inputs (empty list when it can)."""
    reasons = []
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"q dtype {q.dtype} is not one of float16/bfloat16/float32")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            reasons.append(f"{name} is on {t.device} but q is on {q.device}")
    D = q.shape[-1]
    if not KERNEL_HEAD_DIMS[0] <= D <= KERNEL_HEAD_DIMS[1]:
        reasons.append(f"head dim {D} is outside the kernel's range {KERNEL_HEAD_DIMS}")
    return reasons


# ------------------------------------------------------------------------------------------------ forward paths


def _forward(q, k, v, key_mask, attn_mask, scale):
    """(O [B, Lq, H, D], LSE [B, H, Lq] fp32, fp64 for fp64 inputs)."""
    masks = "+".join(n for n, m in (("key_mask", key_mask), ("attn_mask", attn_mask)) if m is not None)
    detail = (f"q{tuple(q.shape)} k{tuple(k.shape)} {str(q.dtype).replace('torch.', '')}"
              + (f" {masks}" if masks else ""))
    backend = _dispatch.choose_backend(OP_NAME, q.device, _kernel_reasons(q, k, v, key_mask, attn_mask), detail)
    if backend == "triton":
        from fastvlm.kernels.attention import attention_fwd

        return attention_fwd(q, k, v, key_mask=key_mask, attn_mask=attn_mask, scale=scale)
    return attention_ref(q, k, v, key_mask, attn_mask, scale)


# ------------------------------------------------------------------------------------------------ backward


def _backward(saved, go, scale, needs):
    """Gradients of (q, k, v, key_mask, attn_mask) from dL/dO; the softmax is recomputed from the saved LSE."""
    q, k, v, key_mask, attn_mask, lse = saved
    need_q, need_k, need_v, need_km, need_am = needs
    ct = lse.dtype
    p = probs_from_lse(scores_ref(q, k, key_mask, attn_mask, scale, ct), lse)  # [B, H, Lq, Lk]
    go = go.transpose(1, 2).to(ct)  # [B, H, Lq, D]
    gq = gk = gv = gkm = gam = None
    if need_v:
        gv = torch.matmul(p.transpose(-1, -2), go).to(v.dtype)
    if need_q or need_k or need_km or need_am:
        gp = torch.matmul(go, v.to(ct).transpose(-1, -2))
        gs = p * (gp - (p * gp).sum(-1, keepdim=True))  # dL/dscores (natural units, before the scale)
        if need_q:
            gq = (torch.matmul(gs, k.to(ct)) * scale).to(q.dtype)
        if need_k:
            gk = (torch.matmul(gs.transpose(-1, -2), q.to(ct)) * scale).to(k.dtype)
        if need_km:
            gkm = gs.sum(dim=(1, 2)).to(key_mask.dtype)
        if need_am:
            gam = gs.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return gq, gk, gv, gkm, gam


def _float_mask_needs_grad(m, need):
    return bool(need) and m is not None and m.is_floating_point()


# ------------------------------------------------------------------------------------------------ registration


@torch.library.custom_op(OP_NAME, mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                 attn_mask: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (O [B, Lq, H, D], LSE [B, H, Lq]); LSE is what backward needs."""
    return _forward(q, k, v, key_mask, attn_mask, scale)


@attention_op.register_fake
def _(q, k, v, key_mask, attn_mask, scale):
    B, H, LQ, D = q.shape
    return q.new_empty((B, LQ, H, D)), q.new_empty((B, H, LQ), dtype=torch.promote_types(q.dtype, torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, attn_mask, scale = inputs
    _, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, key_mask, attn_mask, lse)
    ctx.mark_non_differentiable(lse)


def _op_backward(ctx, go, _glse):
    n = ctx.needs_input_grad
    q, k, v, key_mask, attn_mask, lse = ctx.saved_tensors
    needs = (n[0], n[1], n[2], _float_mask_needs_grad(key_mask, n[3]), _float_mask_needs_grad(attn_mask, n[4]))
    return (*_backward((q, k, v, key_mask, attn_mask, lse), go, ctx.scale, needs), None)


attention_op.register_autograd(_op_backward, setup_context=_setup_context)


class _AttentionFunction(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher's per-call cost (eager mode only)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, attn_mask, scale):
        o, lse = _forward(q, k, v, key_mask, attn_mask, scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, key_mask, attn_mask, lse)
        return o

    @staticmethod
    def backward(ctx, go):
        n = ctx.needs_input_grad
        q, k, v, key_mask, attn_mask, lse = ctx.saved_tensors
        needs = (n[0], n[1], n[2], _float_mask_needs_grad(key_mask, n[3]), _float_mask_needs_grad(attn_mask, n[4]))
        return (*_backward((q, k, v, key_mask, attn_mask, lse), go.contiguous(), ctx.scale, needs), None)


# ------------------------------------------------------------------------------------------------ functional


def attention(q, k, v, *, key_mask=None, attn_mask=None, scale=None):
    """``softmax(scale * q k^T + masks) v`` -> O [B, Lq, H, D] (transformers' attention-function output layout).

    q [B, H, Lq, D], k/v [B, H, Lk, D] with any strides. ``key_mask`` [B, Lk]: keep-flags (bool or integer, nonzero =
    attend, as a tokenizer's attention_mask / transformers' 2-D encoder_attention_mask) or a float additive bias.
    ``attn_mask`` [B|1, H|1, Lq|1, Lk]: bool keep-flags or a float additive bias (transformers' 4-D masks, e.g.
    InstructBLIP's self-attention over queries + instruction tokens). ``scale`` defaults to ``D ** -0.5``.
    A row whose every key is masked by keep-flags gives zeros. Eager calls skip the torch.library dispatcher; under
    torch.compile the call is the registered custom op.
    """
    _validate(q, k, v, key_mask, attn_mask)
    key_mask = keep_flags(key_mask)
    attn_mask = keep_flags(attn_mask)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    tensors = (q, k, v, key_mask, attn_mask)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():
        return torch.ops.fastvlm.attention(*tensors, scale)[0]
    if needs_grad:
        return _AttentionFunction.apply(*tensors, scale)
    return _forward(*tensors, scale)[0]
