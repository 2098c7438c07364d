"""Fused modules with no recipe of their own: ``FusedLinear`` (a bare ``torch.nn.Linear``) and
``InternVLShuffleProjector`` (InternVL's pixel shuffle and projector as one module)."""
from __future__ import annotations

import math

import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.nn import _plan
from fastvlm.nn._base import _adopt
from fastvlm.ops import _fast
from fastvlm.ops._checks import autocast_on
from fastvlm.ops.layout import space_to_depth_rows
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.activations import activation_name


_NO_BIAS = object()
_CHAIN = _plan.PLAN_ATTR + "_chain"  # FusedLinear's repeat path (dropped with the plans: fastvlm_clear_plan, copies)


class FusedLinear(nn.Linear):
    """Drop-in ``torch.nn.Linear`` running the fused GEMM (BLIP-2's ``language_projection`` is a bare Linear)."""

    def forward(self, input):
        params = self._parameters  # (nn.Module.__getattr__ costs a few µs per call: read the table)
        weight, bias = params.get("weight"), params.get("bias", _NO_BIAS)
        chain = self.__dict__.get(_CHAIN)
        if chain is not None and weight is not None and bias is not _NO_BIAS:  # the repeat call (fastvlm.ops._fast)
            y = chain.run(input, (weight, bias))
            if y is not _fast.STALE and y is not _fast.PASS:
                return y
            if y is _fast.PASS:
                chain = False  # this call needs the usual path; the chain stays
        reasons = []
        if autocast_on(input.device):
            reasons.append("autocast is enabled (nn.Linear's forward reproduces autocast's casts)")
        if reasons:
            _dispatch.report_fallback("FusedLinear", reasons, f"x{tuple(input.shape)}")
            return super().forward(input)
        if weight is None or bias is _NO_BIAS:  # a weight or bias that is no longer a parameter: the usual lookup
            return mlp_projector(input, self.weight, self.bias, act="none")
        if chain is False or not _fast.wanted(input, (weight, bias)):
            return mlp_projector(input, weight, bias, act="none")
        memo = {}
        y = mlp_projector(input, weight, bias, act="none", _memo_out=memo)
        self.__dict__[_CHAIN] = _fast.plain_chain(input, y, (weight, bias), memo.get("memo"), memo.get("token"))
        return y

    def __getstate__(self):  # pickle / deepcopy: the chain (live references) is rebuilt on demand
        return _plan.state_without_plan(super().__getstate__())

    @classmethod
    def from_module(cls, original):
        if type(original) is not nn.Linear:
            raise TypeError(f"FusedLinear.from_module expects a torch.nn.Linear, got {type(original).__name__}")
        return _adopt(cls, original)





class InternVLShuffleProjector(nn.Module):
    """InternVL's pixel shuffle and its ``InternVLMultiModalProjector`` as one fused module.

    InternVL does the shuffle outside the projector, in ``InternVLModel.get_image_features``::

        feats = feats.reshape(B, side, side, C); feats = model.pixel_shuffle(feats, scale_factor=ratio)
        feats = model.multi_modal_projector(feats.reshape(B, -1, 4 * C))

    This module replaces those lines: ``InternVLShuffleProjector.from_projector(model.multi_modal_projector,
    model.config.downsample_ratio)(feats)`` takes the vision features [B, side * side, C] (class token already
    dropped) and returns the projected tokens [B, side * side / s**2, out]; the shuffle happens inside the GEMM's
    loads. It shares the projector's parameters (its state_dict keys are the projector's, under ``projector.``).
    Wire it into a custom ``get_image_features``; ``fastvlm.patch`` swaps only the projector (the shuffle stays in
    transformers' code).
    """

    def __init__(self, projector, downsample_ratio=0.5):
        super().__init__()
        if type(projector).__name__ != "InternVLMultiModalProjector":
            raise TypeError(f"InternVLShuffleProjector wraps an InternVLMultiModalProjector, got {type(projector).__name__}")
        self.projector = projector
        self.scale = int(round(1 / downsample_ratio))

    @classmethod
    def from_projector(cls, projector, downsample_ratio=0.5):
        return cls(projector, downsample_ratio)

    def forward(self, vision_features):
        if vision_features.dim() != 3:
            raise ValueError(f"InternVLShuffleProjector: vision_features must be [batch, tokens, channels], got "
                             f"{tuple(vision_features.shape)}")
        B, P, C = vision_features.shape
        s = self.scale
        side = math.isqrt(P)
        if side * side != P or side % s:
            raise ValueError(f"InternVLShuffleProjector: {P} tokens are not a square grid divisible by {s}")
        p = self.projector
        ln = p.layer_norm
        rows = space_to_depth_rows(B, side, side, s, vision_features.device)
        y = mlp_projector(vision_features.reshape(B * P, C), p.linear_1.weight, p.linear_1.bias, p.linear_2.weight,
                          p.linear_2.bias, act=activation_name(p.act) or "gelu", norm="layernorm",
                          norm_weight=ln.weight, norm_bias=ln.bias, eps=ln.eps, rows=rows, a_mode="concat")
        return y.reshape(B, (side // s) ** 2, y.shape[-1])  # from the grid: B may be 0
