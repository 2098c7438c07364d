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
fastvlm/nn/embed_pairing.py and docs/design-patch-embed.md.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn as nn

from fastvlm import _dispatch
from fastvlm._cache import cached_arange as _arange, slot
from fastvlm.nn.pair_prenorm import _take_norm, _timm_vit_tokens
from fastvlm.nn.pair_qwen3 import _take_qwen3_positions
from fastvlm.nn.pair_state import call_mode, hand_off
from fastvlm.nn._base import _FusedBase
from fastvlm.nn.patch_embed_recipes import EmbedRecipe
from fastvlm.ops._checks import autocast_on
from fastvlm.ops.navit_positions import navit_position_ids
from fastvlm.ops.patch_embed import patch_embed
from fastvlm.ops.rows_embed import rows_embed
from fastvlm._cache import once


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

        def interpolated():
            return self.interpolate_pos_encoding(torch.empty(1, n, dim, device="meta"), height, width).reshape(n, dim)

        if (torch.is_grad_enabled() and table.requires_grad) or torch.compiler.is_compiling():
            return interpolated()  # training the table: recompute, with its autograd (compiled: part of the graph)

        def compute():
            with torch.no_grad():
                return interpolated()

        return slot(self.__dict__, "_fastvlm_pos_cache", (table.data_ptr(), table._version, table.dtype, table.device),
                    (height, width), compute)

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
        call, norm = _take_norm(self, conv.weight.dtype)
        out = patch_embed(pixel_values, conv.weight, conv.bias, pos=table, pos_rows=rows, cls=cls, cls_pos=0,
                          **(norm or {}))
        if call is not None:
            hand_off(call, out)
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
        if not reasons and autocast_on(x.device):
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
        if H % p or W % p:
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
        if not reasons and autocast_on(pixel_values.device):
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

        def compute_no_grad():
            with torch.no_grad():
                return compute()

        table = self.position_embeddings
        if (torch.is_grad_enabled() and table.requires_grad) or torch.compiler.is_compiling():
            return compute()
        return slot(self.__dict__, "_fastvlm_pos_cache", (table.data_ptr(), table._version, table.dtype, table.device),
                    (H, W), compute_no_grad)

    def _fastvlm_navit_forward(self, pixel_values, patch_attention_mask):
        """Idefics2/3, SmolVLM: the conv as the GEMM (a cropped view when the size is not a multiple of the patch,
        as the "valid" conv drops the remainder), position ids from the mask added by index in the epilogue."""
        r = self._fastvlm_recipe
        reasons = self._fastvlm_structure()
        if not reasons and autocast_on(pixel_values.device):
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
            if not reasons and autocast_on(pixel_values.device):
                reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
            if not reasons and not self._fastvlm_timm_original_raises(pixel_values):
                x = pixel_values
                H, W = x.shape[-2:]
                p = self.patch_size[0]
                if not self.dynamic_img_pad and (H % p or W % p):  # the conv floors the grid (strict img_size 20
                    x = x[:, :, :H // p * p, :W // p * p]  # with patch 14 is one patch): a cropped view, no copy
                out = _timm_vit_tokens(self, x)
                if out is not None:
                    return out
                out, reasons = self._fastvlm_timm_forward(x)
                if not reasons:
                    return out
            if reasons:
                _dispatch.report_fallback(r.fused_name, reasons, f"pixels{tuple(pixel_values.shape)}")
            return self._fastvlm_base.forward(self, pixel_values)
        if autocast_on(pixel_values.device):
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

    # Qwen-VL "rows". Still-image mode: the processor repeats each image temporal_patch_size times, so the GEMM may
    # read one frame against the time-summed kernel (half the FLOPs at T = 2). Only the caller knows its inputs are
    # still images (a video's frames differ), so it is never switched on by guessing: ``fastvlm.patch(model,
    # still_images=True)`` turns it on inside the model's ``get_image_features`` calls only (videos go through
    # ``get_video_features``); ``fastvlm_still_images = True`` turns it on for every call of a standalone module.
    fastvlm_still_images = False

    def _fastvlm_still(self, x, conv):
        T = conv.kernel_size[0]
        mode = call_mode(self) if T >= 2 else None  # this thread's open image / video call (fastvlm/nn/still_images.py)
        if T < 2 or mode == "video" or not (self.fastvlm_still_images or mode == "still"):
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

        def compute():
            with torch.no_grad():
                return (w.float().sum(2).to(w.dtype)).reshape(w.shape[0], -1)

        return slot(self.__dict__, "_fastvlm_still_cache", (w.data_ptr(), w._version, w.dtype, w.device), None, compute)

    def _fastvlm_rows_forward(self, pixel_values):
        """Pre-patchified rows [patches, C * T * p * p] (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) through ``rows_embed``; an
        armed Qwen3-VL pair adds the parent's interpolated position rows in the same call."""
        conv = getattr(self, self._fastvlm_recipe.conv)
        w = conv.weight
        D = w.shape[0]
        x = pixel_values.reshape(-1, w[0].numel()).to(w.dtype)
        call, pos = _take_qwen3_positions(self, x)
        still = self._fastvlm_still(x, conv)
        kw = dict(pos=pos[0], pos_idx=pos[1], pos_weights=pos[2]) if pos else {}
        if still is not None:
            out = rows_embed(x, still, conv.bias, frames=conv.kernel_size[0], chunk=w[0, 0, 0].numel(),
                             full_weight=w.view(D, -1), **kw)
        else:
            out = rows_embed(x, w.view(D, -1), conv.bias, **kw)
        if call is not None:
            hand_off(call, out)
        return out


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


@once
def fused_embed_class(recipe: EmbedRecipe):
    base = getattr(importlib.import_module(recipe.module), recipe.cls)
    doc = (f"Drop-in fused replacement for transformers' ``{recipe.cls}`` ({recipe.family}): same constructor, "
           f"state_dict and forward; runs fastvlm.ops.patch_embed.")
    return type(recipe.fused_name, (_FusedEmbedMixin, base),
                {"forward": {"rows": _fwd_rows, "timm": _fwd_timm, "navit": _fwd_navit, "internvl": _fwd_internvl,
                              "unfold": _fwd_unfold}.get(recipe.kind, _fwd_pixels), "_fastvlm_recipe": recipe,
                 "_fastvlm_base": base, "__doc__": doc, "__module__": "fastvlm.nn"})

