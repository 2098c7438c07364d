"""Plain-PyTorch references of the attention core (BLIP-2 / InstructBLIP Q-Former): the oracles of the attention tests
and the PyTorch path of ``fastvlm::attention``.

Shapes: q [B, H, Lq, D], k/v [B, H, Lk, D]; every function returns O as [B, Lq, H, D], the layout transformers'
attention functions return (``attn_output.transpose(1, 2).contiguous()``).

Grouped-query attention: k/v may have Hkv heads with Hkv dividing H; query head h reads kv head h // (H / Hkv).
Two key/value sources (Idefics2's Perceiver): ``k2``/``v2`` [B, Hkv, Lk2, D] hold keys that follow k's, i.e. the
attention runs over ``concat(k, k2)``; ``key_mask`` then covers the first source only (the second is always
attended) and ``attn_mask``'s last dimension is Lk + Lk2. ``full_kv`` builds that concatenation for the references.

Masks (both optional):
    key_mask   [B, Lk]                   bool / integer keep-flags (nonzero = attend; a tokenizer's attention_mask)
                                         or a float additive bias
    attn_mask  [B|1, H|1, Lq|1, Lk]      bool keep-flags or a float additive bias (transformers' 4-D masks)

* ``eager_attention_ref`` reproduces transformers 5.24 ``eager_attention_forward`` as ``Blip2QFormerMultiHeadAttention``
  calls it, with its cast points: ``matmul(q, k^T) * scaling`` in q's dtype, ``+ attention_mask`` (the 0 /
  ``finfo(dtype).min`` float mask ``eager_mask`` builds from keep-flags, in q's dtype), ``softmax(dim=-1)`` in q's dtype
  (no fp32 upcast in this model; PyTorch's softmax accumulates in fp32 and rounds its output), ``matmul(weights, v)``
  in q's dtype, then ``transpose(1, 2)``. Dropout is the identity (eval).
* ``sdpa_attention_ref`` reproduces ``sdpa_attention_forward``: ``F.scaled_dot_product_attention`` with a boolean mask
  (keep-flags) or an additive one in q's dtype. Rows with every key masked give NaN there.
* ``attention_ref`` is what the fused op computes, returning ``(O, LSE)``: scores and softmax in fp32 (fp64 for fp64
  inputs), natural-log LSE [B, H, Lq]. Additive biases are clamped at ``BIAS_FLOOR`` (as the kernel does) so that a
  row masked entirely by finite ``finfo.min`` biases averages over its keys like eager attention; a row whose every key
  is boolean-masked gives O = 0 and LSE = -inf (eager with a float mask gives a uniform average, SDPA gives NaN).
"""

import torch
import torch.nn.functional as F

# The kernel clamps each additive bias at -1e30 (kernels/attention.py, _BIAS_FLOOR):
BIAS_FLOOR = -1.0e30


def keep_flags(mask):
    """Integer keep-flags (a tokenizer's 0/1 attention_mask) as bool; bool and float masks are returned as they are."""
    if mask is None or mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    return mask != 0


def full_kv(q, k, v, key_mask=None, k2=None, v2=None):
    """(k, v, key_mask) over every key, as the fused op sees them: the second source appended after the first, the
    key mask extended with keep-flags (or zero biases) for it, and kv heads repeated to q's heads (GQA)."""
    if k2 is not None:
        k = torch.cat([k, k2], dim=2)
        v = torch.cat([v, v2], dim=2)
        if key_mask is not None:
            key_mask = keep_flags(key_mask)
            pad = (torch.ones if key_mask.dtype == torch.bool else torch.zeros)(
                (key_mask.shape[0], k2.shape[2]), dtype=key_mask.dtype, device=key_mask.device)
            key_mask = torch.cat([key_mask, pad], dim=1)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return k, v, key_mask


def _as_4d(key_mask):
    return None if key_mask is None else key_mask[:, None, None, :]


def combined_mask(key_mask, attn_mask, dtype):
    """One [B|1, H|1, Lq|1, Lk] mask as transformers hands it to an attention function: bool keep-flags when every
    given mask is boolean, else an additive float mask in ``dtype`` (keep-flags become 0 / finfo(dtype).min, as
    transformers' ``eager_mask`` does). None without masks."""
    masks = [m for m in (_as_4d(keep_flags(key_mask)), keep_flags(attn_mask)) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        out = masks[0]
        for m in masks[1:]:
            out = out & m
        return out
    min_dtype = torch.finfo(dtype).min
    out = None
    for m in masks:
        add = (torch.where(m, torch.zeros((), dtype=dtype, device=m.device), min_dtype) if m.dtype == torch.bool
               else m.to(dtype))
        out = add if out is None else out + add
    return out


def eager_attention_ref(q, k, v, key_mask=None, attn_mask=None, scale=None, k2=None, v2=None):
    """transformers' eager attention (BLIP-2 Q-Former), O [B, Lq, H, D] in q's dtype."""
    k, v, key_mask = full_kv(q, k, v, key_mask, k2, v2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = combined_mask(key_mask, attn_mask, q.dtype)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.where(mask, torch.zeros((), dtype=q.dtype, device=mask.device), torch.finfo(q.dtype).min)
    w = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1)
    return torch.matmul(w, v).transpose(1, 2).contiguous()


def sdpa_attention_ref(q, k, v, key_mask=None, attn_mask=None, scale=None, k2=None, v2=None):
    """transformers' SDPA attention, O [B, Lq, H, D] in q's dtype."""
    k, v, key_mask = full_kv(q, k, v, key_mask, k2, v2)
    mask = combined_mask(key_mask, attn_mask, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()


def scores_ref(q, k, key_mask=None, attn_mask=None, scale=None, dtype=None):
    """``scale * q k^T + masks`` [B, H, Lq, Lk] in ``dtype`` (default: fp32, fp64 for fp64 inputs), masks applied as
    the kernel applies them: keep-flags give -inf, additive biases are clamped at BIAS_FLOOR."""
    ct = dtype or torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    for m in (_as_4d(keep_flags(key_mask)), keep_flags(attn_mask)):
        if m is None:
            continue
        if m.dtype == torch.bool:
            s = s.masked_fill(~m, float("-inf"))
        else:
            s = s + m.to(ct).clamp_min(BIAS_FLOOR)
    return s


def probs_from_lse(s, lse):
    """softmax probabilities from the scores and their LSE; 0 on rows with no attended key (LSE = -inf)."""
    p = torch.exp(s - lse[..., None])
    return torch.where(torch.isneginf(lse)[..., None], torch.zeros((), dtype=p.dtype, device=p.device), p)


def attention_ref(q, k, v, key_mask=None, attn_mask=None, scale=None, k2=None, v2=None):
    """The fused op's result: ``(O [B, Lq, H, D] in q's dtype, LSE [B, H, Lq] fp32 (fp64 for fp64 inputs))``;
    differentiable (autograd through it is the gradient oracle). GQA and a second source as ``full_kv``."""
    k, v, key_mask = full_kv(q, k, v, key_mask, k2, v2)
    s = scores_ref(q, k, key_mask, attn_mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = probs_from_lse(s, lse)
    o = torch.matmul(p, v.to(s.dtype))
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse
