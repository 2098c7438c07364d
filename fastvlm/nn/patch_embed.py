"""Drop-in fused patch embeddings for transformers vision towers.

As for the projectors (fastvlm/nn/projector.py), each family is a row of data, and ``Fused<Original>`` is a subclass
of the original class whose forward runs ``fastvlm.ops.patch_embed`` (conv as a GEMM reading the pixels in place,
with bias, position embedding and class token fused) or, for Qwen-VL's pre-patchified rows, the plain fused linear.
Anything the fused path does not reproduce falls back to the original forward with the reason reported.

Position tables interpolated for another resolution (``interpolate_pos_encoding=True``) are computed once per grid
size by the original module's own ``interpolate_pos_encoding`` method and cached until the table changes (and
recomputed under autograd while the table is being trained).

Kinds: CLIP / SigLIP / BLIP-2 ("conv_pos"), Qwen-VL pre-patchified rows ("rows"), timm ``PatchEmbed`` ("timm"),
Idefics2 / Idefics3 / SmolVLM with NaViT bucketed position ids from ``patch_attention_mask`` ("navit"), InternVL
("internvl") and Llama 4's Unfold + Linear ("unfold"). ``pair_embeddings`` (called by ``fastvlm.patch``) joins a
parent's inline code to the fused embedding's op call: the pre-norm (CLIP ``pre_layrnorm``, timm ``norm_pre``,
Pixtral ``ln_pre`` with its ``patch_conv``), timm's ``_pos_embed`` and Qwen3-VL's interpolated ``pos_embed``; see
the "pairing" section below and docs/design-patch-embed.md.
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
from fastvlm.ops.patch_embed import navit_position_ids, patch_embed
from fastvlm.ops.rows_embed import rows_embed


@dataclass(frozen=True)
class EmbedRecipe:
    family: str
    module: str
    cls: str
    fused_name: str
    kind: str  # "conv_pos" (Conv2d + class token + position table), "rows" (pre-patchified rows: Qwen-VL),
    #            "timm" (timm's PatchEmbed: conv + output format + norm; no positions),
    #            "navit" (Idefics2/3, SmolVLM: Conv2d + NaViT bucketed position ids from patch_attention_mask),
    #            "internvl" (InternVL: Conv2d child + class token + position Parameter, bicubic per size),
    #            "unfold" (Llama 4: nn.Unfold + bias-free Linear, the weight viewed as a conv kernel)
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
    EmbedRecipe("qwen3_vl_moe", _T + "qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionPatchEmbed",
                "FusedQwen3VLMoeVisionPatchEmbed", "rows", conv="proj"),
    EmbedRecipe("idefics2", _T + "idefics2.modeling_idefics2", "Idefics2VisionEmbeddings",
                "FusedIdefics2VisionEmbeddings", "navit", pos="position_embedding"),
    EmbedRecipe("idefics3", _T + "idefics3.modeling_idefics3", "Idefics3VisionEmbeddings",
                "FusedIdefics3VisionEmbeddings", "navit", pos="position_embedding"),
    EmbedRecipe("smolvlm", _T + "smolvlm.modeling_smolvlm", "SmolVLMVisionEmbeddings", "FusedSmolVLMVisionEmbeddings",
                "navit", pos="position_embedding"),
    EmbedRecipe("internvl", _T + "internvl.modeling_internvl", "InternVLVisionEmbeddings",
                "FusedInternVLVisionEmbeddings", "internvl", conv="patch_embeddings.projection", cls_token="cls_token",
                pos="position_embeddings"),
    EmbedRecipe("llama4", _T + "llama4.modeling_llama4", "Llama4UnfoldConvolution", "FusedLlama4UnfoldConvolution",
                "unfold", conv="linear"),
)


class _FusedEmbedMixin(_FusedBase):
    _fastvlm_recipe: EmbedRecipe

    def _fastvlm_structure(self):
        r = self._fastvlm_recipe
        if r.kind == "unfold":
            return self._fastvlm_unfold_structure()
        conv = self.get_submodule(r.conv)
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
        for name in (r.conv, r.pos, "patch_embeddings" if r.kind == "internvl" else None):
            mod = self.get_submodule(name) if name and isinstance(getattr(self, name.split(".")[0], None),
                                                                   nn.Module) else None
            if isinstance(mod, nn.Module) and (mod._forward_hooks or mod._forward_pre_hooks):
                reasons.append(f"{name} has forward hooks, which the fused path would not call")
        return reasons

    def _fastvlm_table(self):
        t = getattr(self, self._fastvlm_recipe.pos)
        return t.weight if isinstance(t, nn.Embedding) else t.reshape(-1, t.shape[-1])

    def _fastvlm_interpolated(self, height, width, dim):
        """The original module's interpolated table for this image size, as [L, D], cached per size and version."""
        table = self._fastvlm_table()
        n = (height // self.patch_size) * (width // self.patch_size) + (1 if self._fastvlm_recipe.cls_token else 0)
        if torch.is_grad_enabled() and table.requires_grad:  # training the table: recompute, with its autograd
            return self.interpolate_pos_encoding(torch.empty(1, n, dim, device="meta"), height, width).reshape(n, dim)
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
        if H < p or W < p:
            return True
        if interpolate:
            return False  # (a size that is not a multiple of the patch: the conv drops the remainder, as here)
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
        if H % p or W % p:  # the "valid" conv drops the remainder (SigLIP so400m: 384 px = 27 patches of 14 + 6)
            pixel_values = pixel_values[:, :, :H // p * p, :W // p * p]
        if interpolate_pos_encoding:
            table = self._fastvlm_interpolated(H, W, D)
        else:
            table = self._fastvlm_table()
        cls = getattr(self, r.cls_token).reshape(-1) if has_cls else None
        rows = _arange(has_cls, T + has_cls, table.device)
        norm = _take_norm(self, conv.weight.dtype)
        out = patch_embed(pixel_values, conv.weight, conv.bias, pos=table, pos_rows=rows, cls=cls, cls_pos=0,
                          **(norm or {}))
        if norm:
            _hand_off(self, out)
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

    def _fastvlm_unfold_structure(self):
        reasons = []
        u, lin = self.unfold, self.linear
        if type(u) is not nn.Unfold or type(lin) is not nn.Linear:
            return [f"unfold/linear are {type(u).__name__}/{type(lin).__name__}, not torch.nn.Unfold/Linear"]
        k, st = _pair2(u.kernel_size), _pair2(u.stride)
        if k[0] != k[1] or st != k or _pair2(u.padding) != (0, 0) or _pair2(u.dilation) != (1, 1):
            reasons.append(f"unfold is not a square stride == kernel patch extraction ({u.kernel_size}, {u.stride})")
        elif lin.in_features % (k[0] * k[1]):
            reasons.append("linear's input width is not channels x kernel area")
        for name, mod in (("unfold", u), ("linear", lin)):
            if mod._forward_hooks or mod._forward_pre_hooks:
                reasons.append(f"{name} has forward hooks, which the fused path would not call")
        return reasons

    def _fastvlm_unfold_forward(self, hidden_states):
        """Llama 4: Unfold + Linear = the GEMM with the Linear weight viewed as [D, C, p, p] (Unfold's (c, ki, kj)
        column order is the conv kernel's flattening)."""
        r = self._fastvlm_recipe
        reasons = self._fastvlm_structure()
        x = hidden_states
        if not reasons and torch.is_autocast_enabled(x.device.type):
            reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
        if reasons:
            _dispatch.report_fallback(r.fused_name, reasons, f"pixels{tuple(getattr(x, 'shape', ()))}")
            return self._fastvlm_base.forward(self, hidden_states)
        w = self.linear.weight
        p = _pair2(self.unfold.kernel_size)[0]
        if (not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != w.dtype or x.device != w.device
                or x.shape[1] * p * p != w.shape[1] or x.shape[2] < p or x.shape[3] < p):
            return self._fastvlm_base.forward(self, hidden_states)  # the original's own result or error
        H, W = x.shape[-2:]
        x = x[:, :, :H // p * p, :W // p * p]  # Unfold drops the remainder too
        return patch_embed(x, w.view(w.shape[0], -1, p, p))

    def _fastvlm_internvl_forward(self, pixel_values, bool_masked_pos=None):
        """InternVL: conv GEMM + class token + the position table (bicubic for other sizes, by the original's own
        ``interpolate_pos_encoding``, cached per size) in one op call; dropout is a no-op in eval."""
        r = self._fastvlm_recipe
        reasons = self._fastvlm_structure()
        if not reasons and bool_masked_pos is not None:
            reasons.append("bool_masked_pos (mask-token mixing, a pre-training input) is not fused")
        if not reasons and self.training and self.dropout.p > 0:
            reasons.append("dropout is active (module in training mode with p > 0)")
        if not reasons and torch.is_autocast_enabled(pixel_values.device.type):
            reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
        if reasons:
            _dispatch.report_fallback(r.fused_name, reasons, f"pixels{tuple(pixel_values.shape)}")
            return self._fastvlm_base.forward(self, pixel_values, bool_masked_pos)
        conv = self.patch_embeddings.projection
        p = conv.kernel_size[0]
        if (pixel_values.dim() != 4 or pixel_values.shape[1] != self.patch_embeddings.num_channels
                or not pixel_values.is_floating_point() or pixel_values.shape[2] < p or pixel_values.shape[3] < p):
            return self._fastvlm_base.forward(self, pixel_values, bool_masked_pos)  # its own error
        B, C, H, W = pixel_values.shape
        T = (H // p) * (W // p)
        D = conv.out_channels
        x = pixel_values[:, :, :H // p * p, :W // p * p] if (H % p or W % p) else pixel_values
        table = None
        if self.position_embeddings is not None:
            table = self._fastvlm_internvl_table(H, W, T, D)
            if table.shape[0] != T + 1 or table.dtype != conv.weight.dtype:
                return self._fastvlm_base.forward(self, pixel_values, bool_masked_pos)
        rows = _arange(1, T + 1, pixel_values.device) if table is not None else None
        return patch_embed(x, conv.weight, conv.bias, pos=table, pos_rows=rows, cls=self.cls_token.reshape(-1),
                           cls_pos=0)

    def _fastvlm_internvl_table(self, H, W, T, D):
        def compute():
            return self.interpolate_pos_encoding(torch.empty(1, T + 1, D, device="meta"), H, W).reshape(-1, D)

        table = self.position_embeddings
        if (torch.is_grad_enabled() and table.requires_grad) or torch.compiler.is_compiling():
            return compute()
        key = (H, W, table.data_ptr(), table._version, table.dtype, table.device)
        cache = self.__dict__.setdefault("_fastvlm_pos_cache", {})
        if key not in cache:
            cache.clear()
            with torch.no_grad():
                cache[key] = compute()
        return cache[key]

    def _fastvlm_navit_forward(self, pixel_values, patch_attention_mask):
        """Idefics2/3, SmolVLM: the conv as the GEMM (a cropped view when the size is not a multiple of the patch,
        as the "valid" conv drops the remainder), position ids from the mask added by index in the epilogue."""
        r = self._fastvlm_recipe
        reasons = self._fastvlm_structure()
        if not reasons and torch.is_autocast_enabled(pixel_values.device.type):
            reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
        if reasons:
            _dispatch.report_fallback(r.fused_name, reasons, f"pixels{tuple(getattr(pixel_values, 'shape', ()))}")
            return self._fastvlm_base.forward(self, pixel_values, patch_attention_mask)
        conv, table = self.patch_embedding, self.position_embedding.weight
        if self._fastvlm_navit_original_raises(pixel_values, patch_attention_mask):
            return self._fastvlm_base.forward(self, pixel_values, patch_attention_mask)  # its own error or behaviour
        p = conv.kernel_size[0]
        B, C, H, W = pixel_values.shape
        gh, gw = H // p, W // p
        x = pixel_values if (H % p == 0 and W % p == 0) else pixel_values[:, :, :gh * p, :gw * p]
        ids = navit_position_ids(patch_attention_mask, self.num_patches_per_side).reshape(-1)
        if ids.device.type == "cpu" and not torch.compiler.is_compiling():
            if ids.numel() and int(ids.max()) >= table.shape[0]:  # a degenerate mask: the original's IndexError
                return self._fastvlm_base.forward(self, pixel_values, patch_attention_mask)
        else:  # the original's embedding lookup would fail the same way (a device-side assert on CUDA)
            torch._assert_async((ids < table.shape[0]).all(), "index out of range in self")
        return patch_embed(x, conv.weight, conv.bias, pos=table, pos_rows=ids)

    def _fastvlm_navit_original_raises(self, pixel_values, mask):
        """Inputs the fused path does not take as the original does: defer to the original (its error, or its
        broadcasting for an odd mask)."""
        conv = self.patch_embedding
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            return True
        if pixel_values.shape[1] != conv.in_channels or pixel_values.dtype != conv.weight.dtype:
            return True  # wrong channels, or a dtype the conv rejects (it does not cast)
        if pixel_values.device != conv.weight.device:
            return True
        p = conv.kernel_size[0]
        B, _, H, W = pixel_values.shape
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.device != pixel_values.device:
            return True
        if B == 0 or H < p or W < p or tuple(mask.shape) != (B, H // p, W // p):
            return True
        return False

    def _fastvlm_forward(self, pixel_values, interpolate_pos_encoding=False):
        r = self._fastvlm_recipe
        reasons = self._fastvlm_structure()
        if r.kind == "timm":
            if not reasons and torch.is_autocast_enabled(pixel_values.device.type):
                reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
            if not reasons and not self._fastvlm_timm_original_raises(pixel_values):
                out = _timm_vit_tokens(self, pixel_values)
                if out is not None:
                    return out
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
        return self._fastvlm_rows_forward(pixel_values)

    # Qwen-VL "rows". Still-image mode (opt in per module with ``fastvlm_still_images = True``, or for every module
    # with FASTVLM_STILL_IMAGES=1): the processor repeats each image temporal_patch_size times, so the GEMM may read
    # one frame against the time-summed kernel (half the FLOPs at T = 2). Only the caller knows its inputs are still
    # images (a video's frames differ), so it is never switched on by guessing.
    fastvlm_still_images = False

    def _fastvlm_still(self, x, conv):
        import os

        T = conv.kernel_size[0]
        if T < 2 or not (self.fastvlm_still_images or os.environ.get("FASTVLM_STILL_IMAGES") == "1"):
            return None
        if x.requires_grad:  # the pixels' gradient of the halved GEMM is not the original's
            import warnings

            warnings.warn(f"fastvlm: {self._fastvlm_recipe.fused_name}: still-image mode not used because the pixels "
                          "require grad (the full temporal kernel runs)", _dispatch.FastVLMFallbackWarning,
                          stacklevel=4)
            return None
        w = conv.weight
        if torch.is_grad_enabled() and w.requires_grad or torch.compiler.is_compiling():
            return (w.float().sum(2).to(w.dtype)).reshape(w.shape[0], -1)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cache = self.__dict__.get("_fastvlm_still_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, (w.float().sum(2).to(w.dtype)).reshape(w.shape[0], -1))
            self.__dict__["_fastvlm_still_cache"] = cache
        return cache[1]

    def _fastvlm_rows_forward(self, pixel_values):
        """Pre-patchified rows [patches, C * T * p * p] (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) through ``rows_embed``; an
        armed Qwen3-VL pair adds the parent's interpolated position rows in the same call."""
        conv = getattr(self, self._fastvlm_recipe.conv)
        w = conv.weight
        D = w.shape[0]
        x = pixel_values.reshape(-1, w[0].numel()).to(w.dtype)
        pos = _take_qwen3_positions(self, x)
        still = self._fastvlm_still(x, conv)
        kw = dict(pos=pos[0], pos_idx=pos[1], pos_weights=pos[2]) if pos else {}
        if still is not None:
            out = rows_embed(x, still, conv.bias, frames=conv.kernel_size[0], chunk=w[0, 0, 0].numel(), **kw)
        else:
            out = rows_embed(x, w.view(D, -1), conv.bias, **kw)
        if pos:
            _hand_off(self, out)
        return out


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


def _fwd_navit(self, pixel_values: torch.Tensor, patch_attention_mask: torch.BoolTensor) -> torch.Tensor:
    return self._fastvlm_navit_forward(pixel_values, patch_attention_mask)


def _fwd_internvl(self, pixel_values: torch.Tensor, bool_masked_pos: Optional[torch.BoolTensor] = None) -> torch.Tensor:
    return self._fastvlm_internvl_forward(pixel_values, bool_masked_pos)


def _fwd_unfold(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return self._fastvlm_unfold_forward(hidden_states)


def _pair2(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@functools.lru_cache(maxsize=None)
def fused_embed_class(recipe: EmbedRecipe):
    base = getattr(importlib.import_module(recipe.module), recipe.cls)
    doc = (f"Drop-in fused replacement for transformers' ``{recipe.cls}`` ({recipe.family}): same constructor, "
           f"state_dict and forward; runs fastvlm.ops.patch_embed.")
    return type(recipe.fused_name, (_FusedEmbedMixin, base),
                {"forward": {"rows": _fwd_rows, "timm": _fwd_timm, "navit": _fwd_navit, "internvl": _fwd_internvl,
                              "unfold": _fwd_unfold}.get(recipe.kind, _fwd_pixels), "_fastvlm_recipe": recipe,
                 "_fastvlm_base": base, "__doc__": doc, "__module__": "fastvlm.nn"})



# ----------------------------------------------------------------------------------------------------- pairing
#
# A pre-norm (CLIP's ``pre_layrnorm``, timm's ``norm_pre``, Pixtral's ``ln_pre``), timm's ``_pos_embed`` and
# Qwen3-VL's ``pos_embed`` lookup live in the *parent* module, so a drop-in embedding alone cannot fuse them. ``fastvlm.patch`` pairs them: the parent's entry points
# (``CLIPVisionModel.forward``; ``VisionTransformer.forward_features`` / ``forward_intermediates``) are wrapped on the
# instance to *arm* the pair for one call; the armed fused embedding returns the finished tokens (positions, class
# and register tokens, pre-norm) and hands that tensor object over; each consumer (the pre-norm, a LayerNorm
# subclass sharing the original's parameters, and timm's ``_pos_embed``) returns its input unchanged when it is the
# handed-over tensor, and runs its original code on anything else. Unarmed calls (the embedding called on its own,
# ``verify``) and anything with hooks on the producer or a consumer take the unfused path, so every module keeps its
# own outputs; state_dict keys and tensors are unchanged (nothing is registered).


class _Pair:
    """State shared by a fused patch embedding and the consumers of its output in one parent (not a Module)."""

    def __init__(self, kind, parent, norm_attr):
        self.kind = kind  # "clip" | "timm"
        self.parent = parent
        self.norm_attr = norm_attr  # the parent's pre-norm attribute ("pre_layrnorm", "norm_pre")
        self.norm = None  # the consumer pre-norm module (a fused subclass) when the pre-norm is a LayerNorm
        self.armed = False
        self.out = None  # the handed-over tensor, until its last consumer took it
        self.norm_fused = False
        self.taps = None  # Qwen3-VL: (interp_indices, interp_weights) of the armed call


def _pair_of(module):
    return module.__dict__.get("_fastvlm_pair")


def _has_hooks(*mods):
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in mods if m is not None)


def _norm_ok(pair, dtype):
    """The pre-norm's (weight, bias, eps) when it can be fused right now, else None."""
    norm = pair.norm
    if norm is None or getattr(pair.parent, pair.norm_attr) is not norm or _has_hooks(norm):
        return None
    if getattr(norm, "_fast_norm", False) or norm.weight is None or len(norm.normalized_shape) != 1:
        return None  # timm's fast_norm (APEX / low-precision) path is not reproduced
    if norm.weight.dtype != dtype or (norm.bias is not None and norm.bias.dtype != dtype):
        return None
    return dict(norm_weight=norm.weight, norm_bias=norm.bias, eps=norm.eps)


def _take_norm(embed, dtype):
    """Disarm the pair of ``embed`` and return the pre-norm arguments to fuse into this call, if any."""
    pair = _pair_of(embed)
    if pair is None or not pair.armed or pair.out is not None:
        return None
    pair.armed = False
    if _has_hooks(embed):
        return None
    return _norm_ok(pair, dtype)


def _hand_off(embed, out, norm_fused=True):
    pair = _pair_of(embed)
    pair.out = out
    pair.norm_fused = norm_fused


def _take_qwen3_positions(embed, x):
    """Armed Qwen3-VL pair: (table, indices, weights) to add in this call, else None (the pair disarms)."""
    pair = _pair_of(embed)
    if pair is None or pair.kind != "qwen3" or not pair.armed or pair.out is not None or pair.taps is None:
        return None
    pair.armed = False
    consumer = getattr(pair.parent, pair.norm_attr)
    idx, w = pair.taps
    if (consumer is not pair.norm or _has_hooks(embed, consumer) or pair.parent.patch_embed is not embed
            or not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64
            or not isinstance(w, torch.Tensor) or w.dim() != 2 or consumer.weight.dtype != x.dtype
            or idx.device != x.device):
        return None  # the parent's own code adds its positions (and raises its own errors)
    if torch.compiler.is_compiling():
        # the taps' length is data-dependent (a sum over grid_thw) when traced; the parent's add needs it equal to
        # the number of rows anyway, so assert it instead of branching on it
        torch._check(idx.shape[0] == x.shape[0])
        torch._check(w.shape[0] == x.shape[0])
        torch._check(w.shape[1] == idx.shape[1])
    elif idx.shape[0] != x.shape[0] or w.shape != idx.shape:
        return None
    return consumer.weight, idx, w


# the pre-norm classes a pairing may subclass, by fused name (fastvlm.nn resolves these names for pickling)
PAIRED_NORMS = {"FusedPreNormLayerNorm": ("torch.nn", "LayerNorm"),
                "FusedPreNormTimmLayerNorm": ("timm.layers", "LayerNorm")}


def _paired_norm_name(base):
    return "FusedPreNormTimmLayerNorm" if base.__module__.startswith("timm.") else f"FusedPreNorm{base.__name__}"


def _norm_bases():
    """The exact LayerNorm classes a pairing fuses: torch's, and timm's (same math unless its fast-norm flag is on)."""
    bases = [nn.LayerNorm]
    try:
        from timm.layers import LayerNorm as TimmLayerNorm

        bases.append(TimmLayerNorm)
    except ImportError:
        pass
    return tuple(bases)


def paired_norm_class(name):
    """The pre-norm class of a pairing by its fused name (``fastvlm.nn.FusedPreNormLayerNorm``)."""
    module, cls = PAIRED_NORMS[name]
    return _paired_norm_class(getattr(importlib.import_module(module), cls))


@functools.lru_cache(maxsize=None)
def _paired_norm_class(base):
    def forward(self, input):
        pair = _pair_of(self)
        if pair is not None and pair.norm_fused and pair.out is not None and input is pair.out:
            pair.out = None  # already normalised by the fused embedding
            return input
        return base.forward(self, input)

    return type(_paired_norm_name(base), (base,), {
        "forward": forward, "__module__": "fastvlm.nn",
        "__doc__": f"``{base.__name__}`` paired with a fused patch embedding that applies it (same parameters); "
                   "any other input is normalised by the original forward."})


class FusedPairedPositionEmbedding(nn.Embedding):
    """Qwen3-VL's ``pos_embed`` paired with a fused patch embedding that already added the interpolated rows (same
    parameters). For the very index tensor of the armed call it returns zeros [N, taps, 1], so the parent's inline
    ``hidden + (pos_embed(idx) * w).sum(1)`` adds an exact zero by broadcasting (the [N, taps, D] gather, product and
    reduction are gone; the add remains, as fastvlm does not rewrite transformers' forward). Any other input is
    looked up as usual."""

    __module__ = "fastvlm.nn"

    def forward(self, input):
        pair = _pair_of(self)
        if pair is not None and pair.out is not None and pair.taps is not None and input is pair.taps[0]:
            pair.out = None
            return torch.zeros((*input.shape, 1), dtype=self.weight.dtype, device=input.device)
        return super().forward(input)


def _qwen3_taps(parent, grid_thw, kwargs):
    """transformers' own interpolation taps for this call (precomputed ones in ``kwargs`` are used as given)."""
    import sys

    helper = sys.modules[type(parent).__module__].get_vision_interpolation_indices_and_weights
    return helper(grid_thw, num_grid_per_side=parent.num_grid_per_side, mode=parent.interpolation_mode,
                  align_corners=parent.interpolation_align_corners,
                  spatial_merge_size=parent.config.spatial_merge_size,
                  kwargs={k: kwargs[k] for k in ("interp_indices", "interp_weights") if k in kwargs})


def _qwen3_structure(parent):
    """Why a Qwen3-VL vision model's position code cannot be paired (empty when it can)."""
    import sys

    mod = sys.modules[type(parent).__module__]
    if not hasattr(mod, "get_vision_interpolation_indices_and_weights") or hasattr(parent,
                                                                                   "fast_pos_embed_interpolate"):
        return ["this transformers version does not compute Qwen3-VL positions with "
                "get_vision_interpolation_indices_and_weights"]
    if type(parent.pos_embed) is not nn.Embedding:
        return [f"pos_embed is {type(parent.pos_embed).__name__}, not torch.nn.Embedding"]
    if _has_hooks(parent.pos_embed):
        return ["pos_embed has forward hooks (they stay on the original module)"]
    return []


class FusedPixtralPatchConv(nn.Conv2d):
    """Pixtral's ``patch_conv`` paired with its parent's ``ln_pre`` (same parameters). Inside an armed
    ``PixtralVisionModel.forward`` it runs the conv as fastvlm's patch GEMM with the RMSNorm applied to every row right
    after it (a per-row op, so normalising before the parent's per-image crop and concatenation gives the same rows)
    and returns the [B, D, H', W'] result as a view of channels-last rows, so the parent's ``flatten(1).T`` and
    ``torch.cat`` copy rows instead of transposing; the paired ``ln_pre`` then passes that concatenation through.
    Called any other way it is the original convolution."""

    __module__ = "fastvlm.nn"

    def forward(self, input):
        pair = _pair_of(self)
        norm = None
        if pair is not None and pair.armed and pair.out is None:
            pair.armed = False  # one fused call per armed forward
            ln = getattr(pair.parent, pair.norm_attr)
            if (ln is pair.norm and getattr(pair.parent, "patch_conv", None) is self and not _has_hooks(self, ln)
                    and ln.weight.dtype == self.weight.dtype and ln.weight.shape == (self.out_channels,)):
                norm = dict(norm_weight=ln.weight, eps=ln.variance_epsilon)
        p = self.kernel_size[0]
        if (norm is None or not isinstance(input, torch.Tensor) or input.dim() != 4
                or input.shape[1] != self.in_channels or input.shape[2] < p or input.shape[3] < p
                or input.dtype != self.weight.dtype or input.device != self.weight.device
                or (self.bias is not None and self.bias.dtype != self.weight.dtype)):
            return super().forward(input)
        B, C, H, W = input.shape
        gh, gw = H // p, W // p
        x = input if (H % p == 0 and W % p == 0) else input[:, :, :gh * p, :gw * p]
        out = patch_embed(x, self.weight, self.bias, norm_weight=norm["norm_weight"], eps=norm["eps"], norm_rms=True)
        _hand_off(self, out)
        return out.view(B, gh, gw, -1).permute(0, 3, 1, 2)


def _paired_rms_class(base):
    """``PixtralRMSNorm`` subclass that passes the armed call's (already normalised) rows through."""
    cls = _PAIRED_RMS.get(base)
    if cls is None:
        def forward(self, hidden_states):
            pair = _pair_of(self)
            if (pair is not None and pair.kind == "pixtral" and pair.norm_fused and pair.out is not None
                    and isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3
                    and hidden_states.shape[0] == 1 and hidden_states.shape[-1] == pair.out.shape[-1]
                    and hidden_states.dtype == pair.out.dtype and not _has_hooks(self)):
                pair.out = None  # the rows of this concatenation were normalised by the fused patch conv
                return hidden_states
            return base.forward(self, hidden_states)

        cls = _PAIRED_RMS[base] = type(f"FusedPaired{base.__name__}", (base,), {
            "forward": forward, "__module__": "fastvlm.nn",
            "__doc__": f"``{base.__name__}`` paired with a fused patch conv that applies it (same parameters)."})
    return cls


_PAIRED_RMS = {}


def _pixtral_structure(conv, norm):
    reasons = []
    if type(conv) is not nn.Conv2d:
        reasons.append(f"patch_conv is {type(conv).__name__}, not torch.nn.Conv2d")
    else:
        padded = any(conv.padding) if isinstance(conv.padding, tuple) else conv.padding != "valid"
        if (conv.kernel_size[0] != conv.kernel_size[1] or conv.stride != conv.kernel_size or conv.groups != 1
                or padded or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros"):
            reasons.append("patch_conv is not a square stride == kernel convolution (no padding, groups, dilation)")
    if (type(norm).__name__ != "PixtralRMSNorm" or getattr(norm, "weight", None) is None
            or not hasattr(norm, "variance_epsilon")):
        reasons.append(f"ln_pre is {type(norm).__name__}, not PixtralRMSNorm")
    if _has_hooks(conv) or _has_hooks(norm):
        reasons.append("patch_conv or ln_pre has forward hooks (they stay on the original modules)")
    return reasons


def _timm_pos_table(vit, gh, gw):
    """timm's position table for a (gh, gw) grid as [L, D]: ``resample_abs_pos_embed`` exactly as ``_pos_embed``
    calls it, cached per grid and table version (recomputed with autograd while the table is trained)."""
    pe = vit.pos_embed
    if not vit.dynamic_img_size:
        return pe.reshape(-1, pe.shape[-1])
    from timm.models import vision_transformer as tv

    def resample():
        return tv.resample_abs_pos_embed(pe, new_size=(gh, gw), old_size=vit.patch_embed.grid_size,
                                         num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens)

    if (torch.is_grad_enabled() and pe.requires_grad) or torch.compiler.is_compiling():
        return resample().reshape(-1, pe.shape[-1])
    key = (gh, gw, pe.data_ptr(), pe._version, pe.dtype, pe.device)
    cache = vit.__dict__.setdefault("_fastvlm_pos_cache", {})
    if key not in cache:
        cache.clear()
        with torch.no_grad():
            cache[key] = resample().reshape(-1, pe.shape[-1])
    return cache[key]


def _timm_vit_tokens(embed, x):
    """Armed timm pair: patch tokens, class and register tokens, positions (and ``norm_pre``) in one op call, as
    [B, prefix + T, D]; None when this call cannot be fused (the caller then runs the plain patch embedding)."""
    pair = _pair_of(embed)
    if pair is None or not pair.armed or pair.out is not None:
        return None
    pair.armed = False
    vit = pair.parent
    if (vit.patch_embed is not embed or _has_hooks(embed) or not isinstance(embed.norm, nn.Identity)
            or embed.dynamic_img_pad or embed.proj.bias is not None and embed.proj.bias.dtype != embed.proj.weight.dtype):
        return None
    drop = vit.pos_drop
    if not (isinstance(drop, nn.Identity) or (type(drop) is nn.Dropout and (not drop.training or drop.p == 0))):
        return None
    w = embed.proj.weight
    D, p = w.shape[0], embed.patch_size[0]
    B, C, H, W = x.shape
    gh, gw = H // p, W // p
    T = gh * gw
    prefix = [t.reshape(-1, D) for t in (vit.cls_token, vit.reg_token) if t is not None]
    cls = (prefix[0] if len(prefix) == 1 else torch.cat(prefix)) if prefix else None
    P = cls.shape[0] if cls is not None else 0
    pos = rows = None
    cls_pos = -1
    if vit.pos_embed is not None:
        pos = _timm_pos_table(vit, gh, gw)
        first = 0 if vit.no_embed_class else P
        if pos.shape[0] != first + T or pos.dtype != w.dtype:
            return None  # the original's add fails (or promotes): let it
        rows = _arange(first, first + T, pos.device)
        cls_pos = -1 if vit.no_embed_class else 0
    if cls is not None and cls.dtype != w.dtype:
        return None
    norm = None
    pd = vit.patch_drop
    if isinstance(pd, nn.Identity) or (type(pd).__name__ == "PatchDropout" and not getattr(pd, "return_indices", False)
                                       and (not pd.training or pd.prob == 0)):
        norm = _norm_ok(pair, w.dtype)
    out = patch_embed(x, w, embed.proj.bias, pos=pos, pos_rows=rows, cls=cls, cls_pos=cls_pos, **(norm or {}))
    _hand_off(embed, out, norm_fused=norm is not None)
    return out


class _PosEmbedConsumer:
    """timm ``_pos_embed`` on a paired VisionTransformer instance. A callable object, not a closure, so that
    ``copy.deepcopy`` and pickling of the model rebind it to the copy (``vit`` and ``pair`` are copied with it)."""

    def __init__(self, vit, pair):
        self.vit, self.pair = vit, pair

    def __call__(self, x):
        pair = self.pair
        if pair.out is not None and x is pair.out:  # the fused embedding's finished tokens
            if not pair.norm_fused:
                pair.out = None
            return x
        return type(self.vit)._pos_embed(self.vit, x)


class _ArmedEntry:
    """A parent's entry point (``forward``, ``forward_features``, ...) wrapped to arm the pair for one call; a
    callable object so that deepcopy rebinds ``inner`` (a bound method) and ``pair`` to the copied model."""

    def __init__(self, inner, pair):
        self.inner, self.pair = inner, pair
        self.__wrapped__ = inner  # inspect.signature follows it: the original signature
        self.__doc__ = getattr(inner, "__doc__", None)

    def __call__(self, *args, **kwargs):
        pair = self.pair
        if pair.kind == "qwen3":  # forward(hidden_states, grid_thw, **kwargs): the taps go in as precomputed kwargs
            grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if not isinstance(grid_thw, torch.Tensor):
                return self.inner(*args, **kwargs)
            idx, w = _qwen3_taps(pair.parent, grid_thw, kwargs)
            kwargs = dict(kwargs, interp_indices=idx, interp_weights=w)
            pair.taps = (idx, w)
        pair.armed, pair.out = True, None
        try:
            return self.inner(*args, **kwargs)
        finally:
            pair.armed, pair.out, pair.taps = False, None, None


_UNDO = "_fastvlm_pair_undo"


def _set_instance_attr(obj, name, value, undo):
    """Set an instance attribute, recording (object, name, had it, previous value) for ``unpair_embeddings`` (data,
    not closures, so a deep copy of the model undoes on its own objects)."""
    undo.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
    obj.__dict__[name] = value


def _pair_candidates(model):
    """(path, parent, kind, embed attr, pre-norm attr, entry points) of every parent whose embedding can be paired."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        VisionTransformer = None
    for name, mod in model.named_modules():
        cls = type(mod)
        if cls.__name__ == "CLIPVisionModel" and cls.__module__ == _T + "clip.modeling_clip":
            yield name, mod, "clip", "embeddings", "pre_layrnorm", ("forward",)
        elif VisionTransformer is not None and cls is VisionTransformer:
            yield name, mod, "timm", "patch_embed", "norm_pre", ("forward_features", "forward_intermediates")
        elif cls.__name__ == "PixtralVisionModel" and cls.__module__ == _T + "pixtral.modeling_pixtral":
            yield name, mod, "pixtral", "patch_conv", "ln_pre", ("forward",)
        elif cls.__name__ in ("Qwen3VLVisionModel", "Qwen3VLMoeVisionModel") and cls.__module__.startswith(
                _T + "qwen3_vl"):
            yield name, mod, "qwen3", "patch_embed", "pos_embed", ("forward",)


def pair_embeddings(model, originals, *, verify=False, selected=lambda family: True):
    """Pair fused patch embeddings with their parents' pre-norm / position code (see above). Returns report rows
    (path, original, fused, status, detail); swapped pre-norms are recorded in ``originals`` for ``unpatch``."""
    from fastvlm.nn.projector import _adopt

    rows = []
    undo = model.__dict__.setdefault(_UNDO, [])
    for path, parent, kind, embed_attr, norm_attr, entries in list(_pair_candidates(model)):
        embed = getattr(parent, embed_attr)
        where = f"{path}.{norm_attr}" if path else norm_attr
        if not selected(kind):
            continue
        if _pair_of(embed) is not None and _pair_of(embed).parent is parent:
            rows.append((where, type(parent).__name__, "fused into " + embed_attr, "already fused", ""))
            continue
        if not isinstance(embed, _FusedEmbedMixin) and kind != "pixtral":
            rows.append((where, type(parent).__name__, "", "not swapped",
                         f"{embed_attr} is not a fused patch embedding ({type(embed).__name__})"))
            continue
        pair = _Pair(kind, parent, norm_attr)
        norm = getattr(parent, norm_attr)
        if kind == "pixtral":
            reasons = _pixtral_structure(embed, norm)
            if reasons:
                rows.append((where, type(norm).__name__, "", "not swapped", "; ".join(reasons)))
                continue
            conv = _adopt(FusedPixtralPatchConv, embed)
            fused_norm = _adopt(_paired_rms_class(type(norm)), norm)
            for m in (conv, fused_norm):
                m.__dict__["_fastvlm_pair"] = pair
            pair.norm = fused_norm
            conv_where = f"{path}.{embed_attr}" if path else embed_attr
            setattr(parent, embed_attr, conv)
            setattr(parent, norm_attr, fused_norm)
            originals[conv_where] = embed
            originals[where] = norm
            _set_instance_attr(parent, "forward", _ArmedEntry(getattr(parent, "forward"), pair), undo)
            checked = ("; " + _verify_pixtral(pair, conv, norm)) if verify else ""
            rows.append((conv_where, "Conv2d", "FusedPixtralPatchConv", "patched",
                         "ln_pre fused into patch_conv (the conv as a GEMM, the RMSNorm as its row-norm pass)" + checked))
            rows.append((where, type(norm).__name__, type(fused_norm).__name__, "patched",
                         "fused into patch_conv (passes the armed call's rows through)" + checked))
            continue
        if kind == "qwen3":
            reasons = _qwen3_structure(parent)
            if reasons:
                rows.append((where, type(norm).__name__, "", "not swapped", "; ".join(reasons)))
                continue
            fused_pos = _adopt(FusedPairedPositionEmbedding, norm)
            fused_pos.__dict__["_fastvlm_pair"] = pair
            pair.norm = fused_pos
            setattr(parent, norm_attr, fused_pos)
            originals[where] = norm
            _set_instance_attr(embed, "_fastvlm_pair", pair, undo)
            _set_instance_attr(parent, "forward", _ArmedEntry(getattr(parent, "forward"), pair), undo)
            detail = "interpolated positions fused into patch_embed"
            if verify:
                detail += "; " + _verify_qwen3(pair, parent, embed, norm)
            rows.append((where, type(norm).__name__, type(fused_pos).__name__, "patched", detail))
            continue
        fusable_norm = (type(norm) in _norm_bases() and norm.weight is not None
                        and len(norm.normalized_shape) == 1)
        if fusable_norm and _has_hooks(norm):
            rows.append((where, type(norm).__name__, "", "not swapped",
                         f"{norm_attr} has forward hooks (they stay on the original module, which runs unfused)"))
            if kind == "clip":
                continue
            fusable_norm = False
        if fusable_norm:
            fused_norm = _adopt(_paired_norm_class(type(norm)), norm)
            fused_norm.__dict__["_fastvlm_pair"] = pair
            pair.norm = fused_norm
            setattr(parent, norm_attr, fused_norm)
            originals[where] = norm
        elif kind == "clip":
            rows.append((where, type(parent).__name__, "", "not swapped",
                         f"{norm_attr} is {type(norm).__name__}, not a LayerNorm with weights"))
            continue
        _set_instance_attr(embed, "_fastvlm_pair", pair, undo)
        if kind == "timm":
            _set_instance_attr(parent, "_pos_embed", _PosEmbedConsumer(parent, pair), undo)
        for entry in entries:
            if hasattr(parent, entry):
                _set_instance_attr(parent, entry, _ArmedEntry(getattr(parent, entry), pair), undo)
        label = ("positions and " if kind == "timm" else "") + (norm_attr if fusable_norm else "")
        detail = f"{label.removesuffix(' and ')} fused into {embed_attr}"
        if verify:
            detail += "; " + _verify_pair(pair, parent, embed, norm, kind)
        fused_name = type(pair.norm).__name__ if pair.norm else f"{type(embed).__name__} (+ _pos_embed)"
        rows.append((where if pair.norm else path, type(norm).__name__ if pair.norm else type(parent).__name__,
                     fused_name, "patched", detail))
    return rows


def _verify_pair(pair, parent, embed, original_norm, kind):
    """Armed fused tokens vs the unfused chain (the plain embedding, the original position code and pre-norm)."""
    from fastvlm.integrations.transformers import probe_args
    from fastvlm.testing import rel_err, tolerance

    x = probe_args(embed._fastvlm_recipe, embed)[0]
    if x.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    with torch.no_grad():
        pair.armed, pair.out = True, None
        try:
            if kind == "clip":
                got = embed(x)
            else:
                got = _PosEmbedConsumer(parent, pair)(embed(x))
        finally:
            pair.armed, pair.out = False, None
        if kind == "clip":
            ref = original_norm(embed(x))
        else:
            ref = original_norm(parent.patch_drop(type(parent)._pos_embed(parent, embed(x))))
    err = rel_err(got, ref)
    bound = tolerance(x.dtype, embed.get_submodule(embed._fastvlm_recipe.conv).weight[0].numel(), roundings=3)
    ok = got.shape == ref.shape and err <= bound
    return f"verify: rel err {err:.2e} (bound {bound:.2e}) {'ok' if ok else 'MISMATCH'}"


def _verify_pixtral(pair, conv, original_norm):
    """Armed fused conv + pass-through ln_pre vs the original conv and RMSNorm, on a probe of 2 x 3 patches."""
    from fastvlm.testing import rel_err, tolerance

    w = conv.weight
    if w.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    p = conv.kernel_size[0]
    x = torch.randn(1, conv.in_channels, 2 * p, 3 * p, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        pair.armed, pair.out = True, None
        try:
            got = pair.norm(conv(x).flatten(2).transpose(1, 2))
        finally:
            pair.armed, pair.out = False, None
        ref = original_norm(nn.Conv2d.forward(conv, x).flatten(2).transpose(1, 2))
    err = rel_err(got, ref)
    bound = tolerance(x.dtype, w[0].numel(), roundings=3)
    ok = got.shape == ref.shape and err <= bound
    return f"verify: rel err {err:.2e} (bound {bound:.2e}) {'ok' if ok else 'MISMATCH'}"


def _verify_qwen3(pair, parent, embed, original_pos):
    """Armed fused rows (positions added in the GEMM) vs the plain embedding plus the original position code."""
    from fastvlm.testing import rel_err, tolerance

    conv = embed.proj
    if conv.weight.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    m = parent.config.spatial_merge_size
    grid = torch.tensor([[1, 2 * m, 3 * m]], device=conv.weight.device)
    x = torch.randn(6 * m * m, conv.weight[0].numel(), device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        idx, w = _qwen3_taps(parent, grid, {})
        pair.armed, pair.out, pair.taps = True, None, (idx, w)
        try:
            got = embed(x)
            got = got + (pair.norm(idx) * w[:, :, None]).sum(1).to(got.dtype)
        finally:
            pair.armed, pair.out, pair.taps = False, None, None
        plain = embed(x)
        ref = plain + (original_pos(idx) * w[:, :, None]).sum(1).to(plain.dtype)
    err = rel_err(got, ref)
    bound = tolerance(x.dtype, x.shape[1], roundings=3)
    ok = got.shape == ref.shape and err <= bound
    return f"verify: rel err {err:.2e} (bound {bound:.2e}) {'ok' if ok else 'MISMATCH'}"


def unpair_embeddings(model):
    """Undo ``pair_embeddings``'s instance attributes (the swapped pre-norms are restored from ``originals``)."""
    for obj, name, had, prev in reversed(model.__dict__.pop(_UNDO, [])):
        if had:
            obj.__dict__[name] = prev
        else:
            obj.__dict__.pop(name, None)
