"""``fastvlm::scatter_image_features``: the connector-to-LLM hand-off as one op.

transformers builds ``inputs_embeds`` from the token embeddings, checks that the number of image tokens matches the
connector's output rows, then ``masked_scatter``s the rows in. This op does the same in one pass (Triton on CUDA,
``masked_scatter`` on the PyTorch path), with the same check and error message, and with autograd: the gradient
flows to the text embeddings outside the image positions and to the image features.
"""
from __future__ import annotations

import torch

from fastvlm import _dispatch

OP_NAME = "fastvlm::scatter_image_features"


def _reference(embeds, mask, features):
    return embeds.masked_scatter(mask[:, None].expand_as(embeds), features.to(embeds.dtype))


def _forward(embeds, mask, features):
    reasons = []
    if features.device != embeds.device:
        reasons.append(f"features are on {features.device} but inputs_embeds on {embeds.device}")
    detail = f"embeds{tuple(embeds.shape)} features{tuple(features.shape)}"
    if _dispatch.choose_backend(OP_NAME, embeds.device, reasons, detail) == "triton":
        from fastvlm.kernels.scatter import scatter_rows

        return scatter_rows(embeds, mask, features)
    return _reference(embeds, mask, features.to(embeds.device))


@torch.library.custom_op(OP_NAME, mutates_args=())
def scatter_image_features_op(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return _forward(embeds, mask, features)


@scatter_image_features_op.register_fake
def _(embeds, mask, features):
    return torch.empty_like(embeds)


def _setup(ctx, inputs, output):
    _, mask, features = inputs
    ctx.save_for_backward(mask)
    ctx.feat_dtype = features.dtype


def _backward(ctx, g):
    (mask,) = ctx.saved_tensors
    g_embeds = g.masked_fill(mask[:, None], 0)
    g_feat = g[mask].to(ctx.feat_dtype)
    return g_embeds, None, g_feat


scatter_image_features_op.register_autograd(_backward, setup_context=_setup)


def scatter_image_features(inputs_embeds, image_mask, image_features):
    """Return ``inputs_embeds`` with its image-token rows replaced by ``image_features`` rows, in order.

    inputs_embeds [B, S, D]; image_mask [B, S] (or [B, S, 1]) bool; image_features [N, D] or [..., D] with N rows.
    Raises ValueError, as transformers does, when the number of image tokens and feature rows differ.
    """
    if image_mask.dim() == inputs_embeds.dim():
        image_mask = image_mask[..., 0]
    if image_mask.shape != inputs_embeds.shape[:-1]:
        raise ValueError(f"scatter_image_features: image_mask must be {tuple(inputs_embeds.shape[:-1])}, got "
                         f"{tuple(image_mask.shape)}")
    D = inputs_embeds.shape[-1]
    feats = image_features.reshape(-1, image_features.shape[-1])
    if feats.shape[-1] != D:
        raise ValueError(f"scatter_image_features: image_features rows have width {feats.shape[-1]}, inputs_embeds {D}")
    n_tokens = image_mask.sum()
    if not torch.compiler.is_compiling() and int(n_tokens) != feats.shape[0]:
        raise ValueError(f"Image features and image tokens do not match, tokens: {int(n_tokens)}, features: "
                         f"{feats.shape[0]}")
    torch._check(feats.shape[0] >= 0)
    out = torch.ops.fastvlm.scatter_image_features(inputs_embeds.reshape(-1, D), image_mask.reshape(-1).to(torch.bool),
                                                   feats)
    return out.reshape(inputs_embeds.shape)
