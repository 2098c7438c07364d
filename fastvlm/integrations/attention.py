"""fastvlm's attention kernel as a transformers attention implementation (no patching).

    fastvlm.register_attention()                                   # once
    model = Blip2ForConditionalGeneration.from_pretrained(path, attn_implementation={"qformer_config": "fastvlm"})
    # or, on a built model: model.set_attn_implementation({"qformer_config": "fastvlm"})

The function follows transformers' attention-function contract (query/key/value [B, H, L, D], an optional additive
or boolean mask, ``scaling``, ``dropout``) and returns ``(out [B, Lq, H, D], None)``. It is registered together with
a mask function (the eager one: an additive float mask, which the kernel consumes as is), so masks are built, never
silently dropped. Attention weights cannot be returned by a fused kernel: a caller that needs them (or dropout in
training) gets the eager computation, with the reason reported.
"""
from __future__ import annotations

from fastvlm import _dispatch

NAME = "fastvlm"


def fastvlm_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from fastvlm.ops.attention import attention

    reasons = []
    if dropout and module.training:
        reasons.append(f"attention dropout {dropout} in training")
    if kwargs.get("output_attentions"):
        reasons.append("attention weights were requested")
    if reasons:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _dispatch.report_fallback("fastvlm attention interface", reasons, f"q{tuple(query.shape)}")
        if kwargs.get("output_attentions"):
            from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward

            return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-2] == 1 and mask.shape[1] == 1:
        mask = mask[:, 0, 0]  # a per-key mask [B, 1, 1, Lk]: the kernel's cheaper key-mask path
        return attention(query, key, value, key_mask=mask, scale=scaling), None
    return attention(query, key, value, attn_mask=mask, scale=scaling), None


def register_attention(name: str = NAME) -> str:
    """Register the kernel (and its mask function) with transformers under ``name``; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, fastvlm_attention_forward)
    AttentionMaskInterface.register(name, eager_mask)
    return name
