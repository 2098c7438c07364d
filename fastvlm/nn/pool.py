"""Drop-in fused token poolers: LLaVA-NeXT-Video's ``LlavaNextVideoPooler``.

Its ``pool`` child is an AvgPool2d, a MaxPool2d or a stride = kernel Conv2d over the square token grid. Average and
max pooling run ``fastvlm.ops.pool.pool_tokens`` over the grid's window table (no NCHW permute copy); the conv runs
as the fused GEMM reading the windows in channel-major order (the conv weight's own flattening), with its bias.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.nn._base import _FusedBase
from fastvlm.ops._checks import autocast_on
from fastvlm.ops.layout import space_to_depth_rows
from fastvlm.ops.pool import pool_tokens
from fastvlm.ops.projector import mlp_projector
from fastvlm._cache import once


@dataclass(frozen=True)
class PoolRecipe:
    family: str
    module: str
    cls: str
    fused_name: str


POOL_RECIPES = (
    PoolRecipe("llava_next_video", "transformers.models.llava_next_video.modeling_llava_next_video",
               "LlavaNextVideoPooler", "FusedLlavaNextVideoPooler"),
)


def _window(pool):
    """(kind, k) of a pool child that is a plain k x k, stride k window, or a reason string."""
    k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    if isinstance(pool, nn.Conv2d):
        square = pool.kernel_size[0] == pool.kernel_size[1] and tuple(pool.stride) == tuple(pool.kernel_size)
        if type(pool) is not nn.Conv2d or not square or any(pool.padding) or pool.groups != 1:
            return "pool is not a square stride = kernel Conv2d"
        return "conv", k
    if type(pool) not in (nn.AvgPool2d, nn.MaxPool2d):
        return f"pool is {type(pool).__name__}"
    if k != stride or any(p != 0 for p in ((pool.padding,) if isinstance(pool.padding, int) else pool.padding)) \
            or pool.ceil_mode or (isinstance(pool, nn.MaxPool2d) and pool.dilation not in (1, (1, 1))) \
            or (isinstance(pool, nn.AvgPool2d) and pool.divisor_override is not None):
        return "pool is not a plain k x k window with stride k"
    return ("mean" if isinstance(pool, nn.AvgPool2d) else "max"), k


class _FusedPoolerMixin(_FusedBase):
    _fastvlm_recipe: PoolRecipe

    def _fastvlm_structure(self):
        w = _window(self.pool)
        reasons = [w] if isinstance(w, str) else []
        if self.pool._forward_hooks or self.pool._forward_pre_hooks:
            reasons.append("pool has forward hooks, which the fused path would not call")
        return reasons

    def _fastvlm_forward(self, image_features):
        reasons = self._fastvlm_structure()
        if not reasons and image_features.dim() == 3:
            B, P, D = image_features.shape
            kind, k = _window(self.pool)
            side = math.isqrt(P)
            if side * side != P or side % k:
                reasons.append(f"{P} tokens are not a square grid divisible by {k}")
        elif not reasons:
            reasons.append(f"input of shape {tuple(image_features.shape)} is not [batch, tokens, features]")
        if not reasons and autocast_on(image_features.device):
            reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
        if reasons:
            _dispatch.report_fallback(self._fastvlm_recipe.fused_name, reasons, f"x{tuple(image_features.shape)}")
            return self._fastvlm_base.forward(self, image_features)
        rows = space_to_depth_rows(B, side, side, k, image_features.device)
        x = image_features.reshape(B * P, D)
        if kind == "conv":
            w = self.pool.weight
            y = mlp_projector(x.to(w.dtype), w.reshape(w.shape[0], -1), self.pool.bias, act="none", rows=rows,
                              a_mode="concat_cm")
        else:
            y = pool_tokens(x, rows, kind)
        return y.reshape(B, (side // k) ** 2, y.shape[-1])  # from the grid: B may be 0


def _fwd(self, image_features):
    return self._fastvlm_forward(image_features)


@once
def fused_pool_class(recipe: PoolRecipe):
    base = getattr(importlib.import_module(recipe.module), recipe.cls)
    doc = f"Drop-in fused replacement for transformers' ``{recipe.cls}``: same constructor, state_dict and forward."
    return type(recipe.fused_name, (_FusedPoolerMixin, base),
                {"forward": _fwd, "_fastvlm_recipe": recipe, "_fastvlm_base": base, "__doc__": doc,
                 "__module__": "fastvlm.nn"})


class LlavaNextVideoPoolProjector(nn.Module):
    """LLaVA-NeXT-Video's pooler (average or max) and its ``multi_modal_projector`` as one fused call.

    ``LlavaNextVideoModel.get_video_features`` runs them one after the other::

        video_features = self.vision_resampler(selected_video_features)
        video_features = self.multi_modal_projector(video_features)

    This module replaces those two lines: ``LlavaNextVideoPoolProjector(model.vision_resampler,
    model.multi_modal_projector)(selected_video_features)`` reads each k x k window of the frame's token grid as
    the projector's GEMM loads it (the mean or the maximum of the window, rounded to the input dtype as the pool
    does), so the pooled tokens are never written. It shares both modules' parameters (state_dict keys under
    ``pooler.`` and ``projector.``). ``fastvlm.patch`` swaps the two modules separately, since the model's code
    calls them apart; wire this one into a custom ``get_video_features``. The pooler's conv mode (a learned
    weight, no fusion gain) and unsupported windows run the two fused modules one after the other.
    """

    def __init__(self, pooler, projector):
        super().__init__()
        for name, mod, cls in (("pooler", pooler, "LlavaNextVideoPooler"),
                               ("projector", projector, "LlavaNextVideoMultiModalProjector")):
            if cls not in {c.__name__ for c in type(mod).__mro__}:
                raise TypeError(f"LlavaNextVideoPoolProjector: {name} must be a {cls}, got {type(mod).__name__}")
        self.pooler = pooler
        self.projector = projector

    def forward(self, video_features):
        from fastvlm.nn import from_module, is_fused
        from fastvlm.reference.activations import activation_name

        p = self.projector
        w = _window(self.pooler.pool)
        act = activation_name(p.act)
        reasons = []
        if isinstance(w, str) or w[0] == "conv":
            reasons.append(w if isinstance(w, str) else "the pooler is a learned conv")
        elif video_features.dim() != 3:
            reasons.append(f"input of shape {tuple(video_features.shape)} is not [frames, tokens, features]")
        else:
            B, P, D = video_features.shape
            side = math.isqrt(P)
            if side * side != P or side % w[1]:
                reasons.append(f"{P} tokens are not a square grid divisible by {w[1]}")
        if act is None:
            reasons.append(f"activation {type(p.act).__name__} has no kernel")
        if reasons:
            _dispatch.report_fallback("LlavaNextVideoPoolProjector", reasons, f"x{tuple(video_features.shape)}")
            pool = self.pooler if is_fused(self.pooler) else from_module(self.pooler)
            proj = p if is_fused(p) else from_module(p)
            return proj(pool(video_features))
        kind, k = w
        rows = space_to_depth_rows(B, side, side, k, video_features.device)
        y = mlp_projector(video_features.reshape(B * P, D), p.linear_1.weight, p.linear_1.bias, p.linear_2.weight,
                          p.linear_2.bias, act=act, rows=rows, a_mode=kind)
        return y.reshape(B, (side // k) ** 2, y.shape[-1])  # from the grid: B may be 0
