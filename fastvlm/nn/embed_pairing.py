"""Pairing: a parent's inline embedding code joined to a fused patch embedding's op call (used by ``fastvlm.patch``).

A pre-norm (CLIP's ``pre_layrnorm``, timm's ``norm_pre``, Pixtral's ``ln_pre``), timm's ``_pos_embed`` and Qwen3-VL's
``pos_embed`` lookup live in the *parent* module, so a drop-in embedding alone cannot fuse them. ``pair_embeddings``
pairs them: the parent's entry points (``CLIPVisionModel.forward``; ``VisionTransformer.forward_features`` /
``forward_intermediates``; ``PixtralVisionModel.forward``; ``Qwen3VLVisionModel.forward``) are wrapped on the instance
to open a call for the length of one call (fastvlm/nn/pair_state.py: per thread and per call, so concurrent calls of
one model never see each other's); the fused embedding takes that call, returns the finished tokens (positions,
class and register tokens, pre-norm) and hands that tensor object over; each consumer (the pre-norm, a subclass
sharing the original's parameters, and timm's ``_pos_embed``) returns its input unchanged when it is the handed-over
tensor, and runs its original code on anything else. Calls outside an opened call (the embedding called on its own)
and anything with hooks on the producer or a consumer take the unfused path, so every module keeps its own outputs;
state_dict keys and tensors are unchanged (nothing is registered).

The families: fastvlm/nn/pair_prenorm.py (CLIP, timm), pair_pixtral.py, pair_qwen3.py; their ``verify=True`` probes
in pair_verify.py; Qwen-VL's still-image calls in still_images.py. docs/design-patch-embed.md explains each.
"""
from __future__ import annotations

import torch

from fastvlm.nn.pair_pixtral import FusedPixtralPatchConv, _paired_rms_class, _pixtral_structure
from fastvlm.nn.pair_prenorm import _norm_bases, _paired_norm_class, _PosEmbedConsumer
from fastvlm.nn.pair_qwen3 import FusedPairedPositionEmbedding, _qwen3_structure, _qwen3_taps
from fastvlm.nn.pair_state import _pair_of, _Pair, has_hooks
from fastvlm.nn.pair_verify import verify_pair, verify_pixtral, verify_qwen3
from fastvlm.nn.patch_embed import _T, _FusedEmbedMixin
from fastvlm.nn.still_images import _UNDO, _set_instance_attr, _StillImageCall, enable_still_images

# names objects of a patched model were pickled under before the split (and the re-exported still-image API)
__all__ = ["pair_embeddings", "unpair_embeddings", "enable_still_images", "FusedPairedPositionEmbedding",
           "FusedPixtralPatchConv", "_Pair", "_PosEmbedConsumer", "_ArmedEntry", "_StillImageCall"]


class _ArmedEntry:
    """A parent's entry point (``forward``, ``forward_features``, ...) wrapped to arm the pair for one call; a
    callable object so that deepcopy rebinds ``inner`` (a bound method) and ``pair`` to the copied model."""

    def __init__(self, inner, pair):
        self.inner, self.pair = inner, pair
        self.__wrapped__ = inner  # inspect.signature follows it: the original signature
        self.__doc__ = getattr(inner, "__doc__", None)

    def __call__(self, *args, **kwargs):
        pair = self.pair
        taps = None
        if pair.kind == "pixtral":  # forward(pixel_values, image_sizes=None, **kwargs): the crop of each image
            taps = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        if pair.kind == "qwen3":  # forward(hidden_states, grid_thw, **kwargs): the taps go in as precomputed kwargs
            grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if not isinstance(grid_thw, torch.Tensor):
                return self.inner(*args, **kwargs)
            idx, w = _qwen3_taps(pair.parent, grid_thw, kwargs)
            kwargs = dict(kwargs, interp_indices=idx, interp_weights=w)
            taps = (idx, w)
        with pair.arm(taps):
            return self.inner(*args, **kwargs)


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
    from fastvlm.nn._base import _adopt

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
            checked = ("; " + verify_pixtral(pair, conv, norm)) if verify else ""
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
                detail += "; " + verify_qwen3(pair, parent, embed, norm)
            rows.append((where, type(norm).__name__, type(fused_pos).__name__, "patched", detail))
            continue
        fusable_norm = (type(norm) in _norm_bases() and norm.weight is not None
                        and len(norm.normalized_shape) == 1)
        if fusable_norm and has_hooks(norm):
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
            detail += "; " + verify_pair(pair, parent, embed, norm, kind)
        fused_name = type(pair.norm).__name__ if pair.norm else f"{type(embed).__name__} (+ _pos_embed)"
        rows.append((where if pair.norm else path, type(norm).__name__ if pair.norm else type(parent).__name__,
                     fused_name, "patched", detail))
    return rows


def unpair_embeddings(model):
    """Undo ``pair_embeddings``'s (and ``enable_still_images``'s) instance attributes (the swapped pre-norms are
    restored from ``originals``). Returns how many still-image wrappers were removed (report rows of their own)."""
    n_still = 0
    for obj, name, had, prev in reversed(model.__dict__.pop(_UNDO, [])):
        n_still += name == "get_image_features" and isinstance(obj.__dict__.get(name), _StillImageCall)
        if had:
            obj.__dict__[name] = prev
        else:
            obj.__dict__.pop(name, None)
    return n_still
