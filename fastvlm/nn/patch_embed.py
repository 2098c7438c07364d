"""Drop-in fused patch embeddings for transformers vision towers.

As for the projectors (fastvlm/nn/projector.py), each family is a row of data, and ``Fused<Original>`` is a subclass
of the original class whose forward runs ``fastvlm.ops.patch_embed`` (conv as a GEMM reading the pixels in place,
with bias, position embedding and class token fused) or, for Qwen-VL's pre-patchified rows, the plain fused linear.
Anything the fused path does not reproduce falls back to the original forward with the reason reported.

Position tables interpolated for another resolution (``interpolate_pos_encoding=True``) are computed once per grid
size by the original module's own ``interpolate_pos_encoding`` method and cached until the table changes.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.nn.projector import _FusedBase
from fastvlm.ops.patch_embed import patch_embed
from fastvlm.ops.projector import mlp_projector


@dataclass(frozen=True)
class EmbedRecipe:
    family: str
    module: str
    cls: str
    fused_name: str
    kind: str  # "conv_pos" (Conv2d + class token + position table), "rows" (pre-patchified rows: Qwen-VL),
    #            "timm" (timm's PatchEmbed: conv + output format + norm; no positions)
    conv: str = "patch_embedding"
    cls_token: Optional[str] = None  # attribute of the class-token Parameter ([D] or [1, 1, D])
    pos: Optional[str] = None  # attribute of the position table: an nn.Embedding or a Parameter [1, L, D]


_T = "transformers.models."
EMBED_RECIPES = (
    EmbedRecipe("clip", _T + "clip.modeling_clip", "CLIPVisionEmbeddings", "FusedCLIPVisionEmbeddings", "conv_pos",
                cls_token="class_embedding", pos="position_embedding"),
    EmbedRecipe("siglip", _T + "siglip.modeling_siglip", "SiglipVisionEmbeddings", "FusedSiglipVisionEmbeddings",
                "conv_pos", pos="position_embedding"),
    EmbedRecipe("blip_2", _T + "blip_2.modeling_blip_2", "Blip2VisionEmbeddings", "FusedBlip2VisionEmbeddings",
                "conv_pos", cls_token="class_embedding", pos="position_embedding"),
    EmbedRecipe("instructblip", _T + "instructblip.modeling_instructblip", "InstructBlipVisionEmbeddings",
                "FusedInstructBlipVisionEmbeddings", "conv_pos", cls_token="class_embedding", pos="position_embedding"),
    EmbedRecipe("qwen2_vl", _T + "qwen2_vl.modeling_qwen2_vl", "PatchEmbed", "FusedQwen2VLPatchEmbed", "rows",
                conv="proj"),
    EmbedRecipe("timm", "timm.layers.patch_embed", "PatchEmbed", "FusedTimmPatchEmbed", "timm", conv="proj"),
    EmbedRecipe("qwen2_5_vl", _T + "qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionPatchEmbed",
                "FusedQwen2_5_VisionPatchEmbed", "rows", conv="proj"),
    EmbedRecipe("qwen3_vl", _T + "qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionPatchEmbed", "FusedQwen3VLVisionPatchEmbed",
                "rows", conv="proj"),
)


class _FusedEmbedMixin(_FusedBase):
    _fastvlm_recipe: EmbedRecipe

    def _fastvlm_structure(self):
        r = self._fastvlm_recipe
        conv = getattr(self, r.conv)
        reasons = []
        want = nn.Conv3d if r.kind == "rows" else nn.Conv2d
        if type(conv) is not want:
            reasons.append(f"{r.conv} is {type(conv).__name__}, not torch.nn.{want.__name__}")
        elif r.kind != "rows" and conv.kernel_size[0] != conv.kernel_size[1]:
            reasons.append(f"{r.conv} has a non-square kernel {conv.kernel_size}")
        if reasons:
            pass
        elif conv.stride != conv.kernel_size or (any(conv.padding) if isinstance(conv.padding, tuple)
                                                   else conv.padding != "valid"):
            reasons.append(f"{r.conv} is not a stride == kernel patch convolution")
        elif conv.groups != 1 or any(d != 1 for d in conv.dilation):
            reasons.append(f"{r.conv} has groups or dilation")
        if r.pos and isinstance(getattr(self, r.pos), nn.Module) and type(getattr(self, r.pos)) is not nn.Embedding:
            reasons.append(f"{r.pos} is {type(getattr(self, r.pos)).__name__}, not torch.nn.Embedding")
        for name in (r.conv, r.pos):
            mod = getattr(self, name, None) if name else None
            if isinstance(mod, nn.Module) and (mod._forward_hooks or mod._forward_pre_hooks):
                reasons.append(f"{name} has forward hooks, which the fused path would not call")
        return reasons

    def _fastvlm_table(self):
        t = getattr(self, self._fastvlm_recipe.pos)
        return t.weight if isinstance(t, nn.Embedding) else t.reshape(-1, t.shape[-1])

    def _fastvlm_interpolated(self, height, width, dim):
        """The original module's interpolated table for this image size, as [L, D], cached per size and version."""
        table = self._fastvlm_table()
        key = (height, width, table.data_ptr(), table._version, table.dtype, table.device)
        cache = self.__dict__.setdefault("_fastvlm_pos_cache", {})
        if key not in cache:
            cache.clear()
            n = (height // self.patch_size) * (width // self.patch_size) + (1 if self._fastvlm_recipe.cls_token else 0)
            shape_only = torch.empty(1, n, dim, device="meta")
            with torch.no_grad():
                cache[key] = self.interpolate_pos_encoding(shape_only, height, width).reshape(n, dim)
        return cache[key]

    def _fastvlm_original_raises(self, pixel_values, interpolate):
        """Inputs the original rejects (wrong rank or channels, sizes it cannot embed): it raises its own error."""
        conv = getattr(self, self._fastvlm_recipe.conv)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != conv.in_channels:
            return True
        p = conv.kernel_size[0]
        H, W = pixel_values.shape[-2:]
        if H % p or W % p:
            return True  # (the conv would drop the remainder; the original's position add then fails)
        if interpolate:
            return False
        n = (H // p) * (W // p) + (1 if self._fastvlm_recipe.cls_token else 0)
        rows = self._fastvlm_table().shape[0]
        # CLIP and SigLIP add the whole table (exact size needed); BLIP-2 slices it (at most its size)
        return n > rows or (n != rows and self._fastvlm_recipe.family in ("clip", "siglip"))

    def _fastvlm_conv_forward(self, pixel_values, interpolate_pos_encoding):
        r = self._fastvlm_recipe
        conv = getattr(self, r.conv)
        B, C, H, W = pixel_values.shape
        p = conv.kernel_size[0]
        D = conv.out_channels
        T = (H // p) * (W // p)
        has_cls = r.cls_token is not None
        if interpolate_pos_encoding:
            table = self._fastvlm_interpolated(H, W, D)
        else:
            table = self._fastvlm_table()
        cls = getattr(self, r.cls_token).reshape(-1) if has_cls else None
        rows = _arange(has_cls, T + has_cls, table.device)
        out = patch_embed(pixel_values, conv.weight, conv.bias, pos=table, pos_rows=rows, cls=cls, cls_pos=0)
        return out, []

    def _fastvlm_timm_forward(self, x):
        """timm PatchEmbed: conv as a GEMM, then the original output format and ``norm`` module."""
        B, C, H, W = x.shape
        p = self.patch_size[0]
        if self.dynamic_img_pad and (H % p or W % p):
            return None, ["dynamic_img_pad needs padding for this size"]
        D = self.proj.out_channels
        y = patch_embed(x, self.proj.weight, self.proj.bias)  # [B, T, D] (NLC)
        gh, gw = H // p, W // p
        fmt = getattr(self.output_fmt, "value", self.output_fmt)
        if not self.flatten:
            if fmt == "NCHW":
                y = y.transpose(1, 2).reshape(B, D, gh, gw)
            elif fmt == "NHWC":
                y = y.reshape(B, gh, gw, D)
            elif fmt == "NCL":
                y = y.transpose(1, 2)
        return self.norm(y), []

    def _fastvlm_timm_original_raises(self, x):
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels or self.img_size is None:
            return x.dim() != 4 or x.shape[1] != self.proj.in_channels
        H, W = x.shape[-2:]
        if self.strict_img_size:
            return (H, W) != tuple(self.img_size)
        return not self.dynamic_img_pad and (H % self.patch_size[0] or W % self.patch_size[1])

    def _fastvlm_forward(self, pixel_values, interpolate_pos_encoding=False):
        r = self._fastvlm_recipe
        reasons = self._fastvlm_structure()
        if r.kind == "timm":
            if not reasons and torch.is_autocast_enabled(pixel_values.device.type):
                reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
            if not reasons and not self._fastvlm_timm_original_raises(pixel_values):
                out, reasons = self._fastvlm_timm_forward(pixel_values)
                if not reasons:
                    return out
            if reasons:
                _dispatch.report_fallback(r.fused_name, reasons, f"pixels{tuple(pixel_values.shape)}")
            return self._fastvlm_base.forward(self, pixel_values)
        if torch.is_autocast_enabled(pixel_values.device.type):
            reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
        if not reasons and r.kind == "conv_pos":
            if self._fastvlm_original_raises(pixel_values, interpolate_pos_encoding):
                return self._fastvlm_base.forward(self, pixel_values, interpolate_pos_encoding)  # its own error
            out, reasons = self._fastvlm_conv_forward(pixel_values, interpolate_pos_encoding)
            if not reasons:
                return out
        if reasons:
            _dispatch.report_fallback(r.fused_name, reasons, f"pixels{tuple(pixel_values.shape)}")
            if r.kind == "rows":
                return self._fastvlm_base.forward(self, pixel_values)
            return self._fastvlm_base.forward(self, pixel_values, interpolate_pos_encoding)
        conv = getattr(self, r.conv)  # "rows": pre-patchified [patches, C * T * p * p]
        w = conv.weight.reshape(conv.weight.shape[0], -1)
        return mlp_projector(pixel_values.reshape(-1, w.shape[1]).to(w.dtype), w, conv.bias, act="none")


@functools.lru_cache(maxsize=64)
def _arange_cached(start, stop, device):
    return torch.arange(start, stop, device=torch.device(device))


def _arange(start, stop, device):
    if torch.compiler.is_compiling():
        return torch.arange(start, stop, device=device)
    return _arange_cached(start, stop, str(device))


def _fwd_pixels(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    return self._fastvlm_forward(pixel_values, interpolate_pos_encoding)


def _fwd_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return self._fastvlm_forward(hidden_states)


def _fwd_timm(self, x):
    return self._fastvlm_forward(x)


@functools.lru_cache(maxsize=None)
def fused_embed_class(recipe: EmbedRecipe):
    base = getattr(importlib.import_module(recipe.module), recipe.cls)
    doc = (f"Drop-in fused replacement for transformers' ``{recipe.cls}`` ({recipe.family}): same constructor, "
           f"state_dict and forward; runs fastvlm.ops.patch_embed.")
    return type(recipe.fused_name, (_FusedEmbedMixin, base),
                {"forward": {"rows": _fwd_rows, "timm": _fwd_timm}.get(recipe.kind, _fwd_pixels), "_fastvlm_recipe": recipe,
                 "_fastvlm_base": base, "__doc__": doc, "__module__": "fastvlm.nn"})

