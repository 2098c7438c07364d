"""The pre-norm pairings: CLIP's ``pre_layrnorm``, and timm VisionTransformer's ``_pos_embed`` (class and register
tokens, positions) and ``norm_pre``, fused into the ``fastvlm::patch_embed`` call of the paired embedding.

The fused embedding takes its parent's open call (fastvlm/nn/pair_state.py), fuses what it can and hands its output
over; the paired LayerNorm (a subclass sharing the original's parameters) and the ``_pos_embed`` consumer pass that
tensor through and run their original code on anything else. docs/design-patch-embed.md explains the pairing.
"""
from __future__ import annotations

import importlib
import threading

import torch
import torch.nn as nn

from fastvlm._cache import cached_arange, slot
from fastvlm.nn.pair_state import call_for, call_of, hand_off, has_hooks, taken, unexpected
from fastvlm.ops.patch_embed import patch_embed
from fastvlm._cache import once


def _norm_ok(pair, dtype):
    """The pre-norm's (weight, bias, eps) when it can be fused right now, else None."""
    norm = pair.norm
    if norm is None or getattr(pair.parent, pair.norm_attr) is not norm or has_hooks(norm):
        return None
    if getattr(norm, "_fast_norm", False) or norm.weight is None or len(norm.normalized_shape) != 1:
        return None  # timm's fast_norm (APEX / low-precision) path is not reproduced
    if norm.weight.dtype != dtype or (norm.bias is not None and norm.bias.dtype != dtype):
        return None
    return dict(norm_weight=norm.weight, norm_bias=norm.bias, eps=norm.eps)


def _take_norm(embed, dtype):
    """(the open call of ``embed``'s pair, now taken, and the pre-norm arguments to fuse into this op call), or
    (None, None) when this call fuses no pre-norm."""
    call = taken(embed)
    if call is None or has_hooks(embed):
        return None, None
    norm = _norm_ok(call.pair, dtype)
    return (call, norm) if norm else (None, None)


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


_class_lock = threading.Lock()  # one class object per base, even when two threads patch at once (pickling needs it)


def _paired_norm_class(base):
    with _class_lock:
        return _make_paired_norm_class(base)


@once
def _make_paired_norm_class(base):
    def forward(self, input):
        call = call_of(self)
        if call is not None and call.norm_fused and call.out is not None:
            if input is call.out:
                call.out = None  # already normalised by the fused embedding
                return input
            call.out = None
            unexpected(f"the pre-norm to receive the fused embedding's output, got another tensor "
                       f"{tuple(getattr(input, 'shape', ()))}")
        return base.forward(self, input)

    return type(_paired_norm_name(base), (base,), {
        "forward": forward, "__module__": "fastvlm.nn",
        "__doc__": f"``{base.__name__}`` paired with a fused patch embedding that applies it (same parameters); "
                   "any other input is normalised by the original forward."})


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

    def compute():
        with torch.no_grad():
            return resample().reshape(-1, pe.shape[-1])

    return slot(vit.__dict__, "_fastvlm_pos_cache", (pe.data_ptr(), pe._version, pe.dtype, pe.device), (gh, gw),
                compute)


def _timm_vit_tokens(embed, x):
    """Armed timm pair: patch tokens, class and register tokens, positions (and ``norm_pre``) in one op call, as
    [B, prefix + T, D]; None when this call cannot be fused (the caller then runs the plain patch embedding)."""
    call = taken(embed)
    if call is None:
        return None
    pair = call.pair
    vit = pair.parent
    if (vit.patch_embed is not embed or has_hooks(embed) or not isinstance(embed.norm, nn.Identity)
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
        rows = cached_arange(first, first + T, pos.device)
        cls_pos = -1 if vit.no_embed_class else 0
    if cls is not None and cls.dtype != w.dtype:
        return None
    norm = None
    pd = vit.patch_drop
    if isinstance(pd, nn.Identity) or (type(pd).__name__ == "PatchDropout" and not getattr(pd, "return_indices", False)
                                       and (not pd.training or pd.prob == 0)):
        norm = _norm_ok(pair, w.dtype)
    out = patch_embed(x, w, embed.proj.bias, pos=pos, pos_rows=rows, cls=cls, cls_pos=cls_pos, **(norm or {}))
    hand_off(call, out, norm_fused=norm is not None)
    return out


class _PosEmbedConsumer:
    """timm ``_pos_embed`` on a paired VisionTransformer instance. A callable object, not a closure, so that
    ``copy.deepcopy`` and pickling of the model rebind it to the copy (``vit`` and ``pair`` are copied with it)."""

    def __init__(self, vit, pair):
        self.vit, self.pair = vit, pair

    def __call__(self, x):
        call = call_for(self.pair)
        if call is not None and call.out is not None:
            if x is call.out:  # the fused embedding's finished tokens
                if not call.norm_fused:
                    call.out = None
                return x
            call.out = None
            unexpected("_pos_embed to receive the fused patch embedding's tokens, got another tensor")
        return type(self.vit)._pos_embed(self.vit, x)
