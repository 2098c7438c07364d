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
  (keep-flags) or an additive one in q's dtype. Rows whose boolean mask keeps no key give zeros there
  (checked with torch 2.14; old releases gave NaN).
* ``attention_ref`` is what the fused op computes, returning ``(O, LSE)``: scores and softmax in fp32 (fp64 for fp64
  inputs), natural-log LSE [B, H, Lq]. Rows are handled as the kernel handles them (``mask_bias``, ``keyless_rows``):
  a row masked entirely by transformers' finite ``finfo.min`` bias averages its values like eager attention; a row
  whose keep-flags keep no key gives O = 0 and LSE = -inf (as SDPA does); a row whose kept keys all score -inf (a -inf
  bias, or -inf products) gives NaN, as eager's softmax does; NaN anywhere in a row's scores makes the row NaN.
  Keep-flags add -inf to a masked key's score (as eager adds finfo.min): its NaN or +Inf score makes the row NaN, also
  in a row without a kept key, and so does a row without a kept key whose every score before the flags is -inf.
"""

import torch
import torch.nn.functional as F

# Additive biases at or below the masking value become -1e30 (kernels/attention.py, _BIAS_FLOOR, ``mask_bias``):
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
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1  # (0 heads: nothing to repeat)
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


def mask_bias(m, dtype):
    """An additive mask as the kernel applies it, in ``dtype``: a finite bias at or below the masking value
    (``finfo(float16).min`` for an fp16 mask, else BIAS_FLOOR) becomes BIAS_FLOOR, which absorbs any real score as
    adding ``finfo.min`` does in eager attention (in fp16, eager's rounding absorbs scores below 16 in magnitude);
    -inf and NaN are kept."""
    limit = torch.finfo(torch.float16).min if m.dtype == torch.float16 else BIAS_FLOOR
    b = m.to(dtype)
    return torch.where((b <= limit) & (b > float("-inf")), torch.full((), BIAS_FLOOR, dtype=dtype, device=b.device), b)


def raw_scores(q, k, key_mask=None, attn_mask=None, scale=None, dtype=None):
    """``(raw, keep)``: ``raw = scale * q k^T + additive biases`` [B, H, Lq, Lk] in ``dtype`` (default: fp32, fp64 for
    fp64 inputs; biases through ``mask_bias``), and ``keep`` the keep-flags of the boolean masks combined
    ([B|1, H|1, Lq|1, Lk] bool, None without any)."""
    ct = dtype or torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    keep = None
    for m in (_as_4d(keep_flags(key_mask)), keep_flags(attn_mask)):
        if m is None:
            continue
        if m.dtype == torch.bool:
            keep = m if keep is None else keep & m
        else:
            s = s + mask_bias(m, ct)
    return s, keep


def scores_ref(q, k, key_mask=None, attn_mask=None, scale=None, dtype=None, raw=None):
    """``scale * q k^T + masks`` [B, H, Lq, Lk], masks applied as the kernel applies them: additive biases go through
    ``mask_bias``, keep-flags add -inf. Adding, not filling: a masked key's NaN or +Inf score gives NaN and -inf stays
    -inf, as eager attention's ``score + finfo.min`` does. ``raw``: ``raw_scores``'s result, if already computed."""
    s, keep = raw or raw_scores(q, k, key_mask, attn_mask, scale, dtype)
    if keep is None:
        return s
    return s + torch.where(keep, torch.zeros((), dtype=s.dtype, device=s.device),
                           torch.full((), float("-inf"), dtype=s.dtype, device=s.device))


def keyless_rows(key_mask, attn_mask, lk, device=None):
    """[B|1, H|1, Lq|1] bool: rows whose keep-flag masks keep no key (every row when ``lk`` is 0). Additive biases
    keep every key: a -inf bias is a score, not a mask."""
    kept = torch.ones((1, 1, 1, lk), dtype=torch.bool, device=device)
    for m in (_as_4d(keep_flags(key_mask)), keep_flags(attn_mask)):
        if m is not None and m.dtype == torch.bool:
            kept = kept & m
    return ~kept.any(dim=-1)


def probs_from_lse(s, lse):
    """softmax probabilities of the scores ``s``; 0 on rows without a key (LSE = -inf), NaN on NaN rows. The softmax
    is taken from ``s`` itself (max-subtracted), not as ``exp(s - lse)``: in a row masked entirely by finite biases
    the LSE absorbs ``log(Lk)`` in fp32 and ``exp(s - lse)`` would be 1 for every key."""
    p = torch.softmax(s, dim=-1)
    return torch.where(torch.isneginf(lse)[..., None], torch.zeros((), dtype=p.dtype, device=p.device), p)


def attention_ref(q, k, v, key_mask=None, attn_mask=None, scale=None, k2=None, v2=None):
    """The fused op's result: ``(O [B, Lq, H, D] in q's dtype, LSE [B, H, Lq] fp32 (fp64 for fp64 inputs))``;
    differentiable (autograd through it is the gradient oracle). GQA and a second source as ``full_kv``."""
    k, v, key_mask = full_kv(q, k, v, key_mask, k2, v2)
    raw = raw_scores(q, k, key_mask, attn_mask, scale)
    s = scores_ref(q, k, raw=raw)
    lse = torch.logsumexp(s, dim=-1)
    keyless = keyless_rows(key_mask, attn_mask, k.shape[2], s.device).expand(lse.shape)
    # LSE -inf (no finite score): O = 0 where the keep-flags keep no key, as SDPA gives; NaN where the row kept keys
    # that all score -inf (softmax over -inf, as eager gives), and where it kept none but every score before the
    # keep-flags is -inf (eager: -inf + finfo.min is -inf, softmax NaN). Lk = 0 stays 0 (eager's empty matmul).
    unscored = torch.isneginf(raw[0]).all(dim=-1) & (k.shape[2] > 0)
    nan_row = torch.isneginf(lse) & (~keyless | unscored)
    lse = torch.where(nan_row, torch.full((), float("nan"), dtype=lse.dtype, device=lse.device), lse)
    p = probs_from_lse(s, lse)
    if q.dtype in (torch.float16, torch.bfloat16):  # eager's rounding point: P in the input dtype before P @ V (a
        p = p.to(q.dtype).to(s.dtype)               # probability rounded to 0 meets an Inf value as 0 * Inf = NaN)
    o = torch.matmul(p, v.to(s.dtype))
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse
