"""Pairing: a parent's inline embedding code joined to a fused patch embedding's op call (used by ``fastvlm.patch``).

CLIP's ``pre_layrnorm`` and timm's ``_pos_embed`` / ``norm_pre`` (fused into ``fastvlm::patch_embed``), Pixtral's
``patch_conv`` + ``ln_pre`` (the conv as the patch GEMM with an RMS row norm) and Qwen3-VL's interpolated
``pos_embed`` (summed in ``fastvlm::rows_embed``'s epilogue). docs/design-patch-embed.md explains each.
"""
from __future__ import annotations

import contextlib
import functools
import importlib

import torch
import torch.nn as nn

from fastvlm.nn.patch_embed import _T, _FusedEmbedMixin, _arange
from fastvlm.ops.patch_embed import patch_embed

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
        self.taps = None  # per-call data: Qwen3-VL's (interp_indices, interp_weights), Pixtral's image_sizes

    @contextlib.contextmanager
    def arm(self, taps=None):
        """Arm the pair for one call of the parent (or one verification probe)."""
        self.armed, self.out, self.taps = True, None, taps
        try:
            yield self
        finally:
            self.armed, self.out, self.taps = False, None, None


def _unexpected(what):
    """A consumer saw something other than the handed-over tensor after the fused embedding already applied its
    part: running the original code now would apply it twice, so stop instead of returning a wrong result."""
    raise RuntimeError(f"fastvlm: an embedding pairing expected {what}; this library version's forward differs "
                       "from the one fastvlm pairs. fastvlm.unpatch(model) restores the model; please report it.")


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
        if pair is not None and pair.norm_fused and pair.out is not None:
            if input is pair.out:
                pair.out = None  # already normalised by the fused embedding
                return input
            pair.out = None
            _unexpected(f"the pre-norm to receive the fused embedding's output, got another tensor "
                        f"{tuple(getattr(input, 'shape', ()))}")
        return base.forward(self, input)

    return type(_paired_norm_name(base), (base,), {
        "forward": forward, "__module__": "fastvlm.nn",
        "__doc__": f"``{base.__name__}`` paired with a fused patch embedding that applies it (same parameters); "
                   "any other input is normalised by the original forward."})


class FusedPairedPositionEmbedding(nn.Embedding):
    """Qwen3-VL's ``pos_embed`` paired with a fused patch embedding that already added the interpolated rows (same
    parameters). For the very index tensor of the armed call it returns zeros [N, taps, 1], so the parent's inline
    ``hidden + (pos_embed(idx) * w).sum(1)`` adds an exact zero by broadcasting (the [N, taps, D] gather, product and
    reduction are gone; the add remains, as fastvlm does not rewrite transformers' forward). Outside an armed call
    it is the plain lookup."""

    __module__ = "fastvlm.nn"

    def forward(self, input):
        pair = _pair_of(self)
        if pair is None or pair.out is None or pair.taps is None:
            return super().forward(input)
        pair.out = None
        if input is pair.taps[0]:
            return torch.zeros((*input.shape, 1), dtype=self.weight.dtype, device=input.device)
        # the positions are already in the patch embedding's rows: a second lookup would add them twice
        raise RuntimeError("fastvlm: the Qwen3-VL pairing expected pos_embed to receive the interpolation indices "
                           "it passed to the vision model's forward; this transformers version computes them "
                           "differently. fastvlm.unpatch(model) restores the model; please report the version.")


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
    In a padded batch only the patches inside each image's ``image_sizes`` are computed (the parent crops the
    rest away). Called any other way it is the original convolution."""

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
        keep = _pixtral_keep(pair.taps, B, gh, gw, p, input.device)  # the patches the parent's crop keeps
        out = patch_embed(x, self.weight, self.bias, norm_weight=norm["norm_weight"], eps=norm["eps"], norm_rms=True,
                          keep_rows=keep)
        _hand_off(self, out)
        return out.view(B, gh, gw, -1).permute(0, 3, 1, 2)


def _pixtral_keep(sizes, B, gh, gw, p, device):
    """Indices of the patches PixtralVisionModel.forward keeps (``[:h // p, :w // p]`` of each image), or None when
    it keeps them all, the sizes are unknown, or the call is being traced (data-dependent sizes)."""
    if sizes is None or torch.compiler.is_compiling():
        return None
    try:
        hw = [(int(h), int(w)) for h, w in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
    except (TypeError, ValueError):
        return None
    if len(hw) != B:
        return None
    grid = tuple((min(h // p, gh), min(w // p, gw)) for h, w in hw)
    if all(g == (gh, gw) for g in grid):
        return None
    return _keep_table(grid, gh, gw, str(device))


@functools.lru_cache(maxsize=32)
def _keep_table(grid, gh, gw, device):
    dev = torch.device(device)
    parts = [b * gh * gw + (torch.arange(h, device=dev)[:, None] * gw + torch.arange(w, device=dev)).reshape(-1)
             for b, (h, w) in enumerate(grid)]
    return torch.cat(parts)


def _paired_rms_class(base):
    """``PixtralRMSNorm`` subclass that passes the armed call's (already normalised) rows through."""
    cls = _PAIRED_RMS.get(base)
    if cls is None:
        def forward(self, hidden_states):
            pair = _pair_of(self)
            if pair is None or pair.kind != "pixtral" or not pair.norm_fused or pair.out is None:
                return base.forward(self, hidden_states)
            done = pair.out
            pair.out = None
            # the fused conv checked the hooks and dtypes before it normalised; here the rows must be its output,
            # cropped and concatenated by PixtralVisionModel.forward: [1, tokens, D] in its dtype
            if (isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3 and hidden_states.shape[0] == 1
                    and hidden_states.shape[-1] == done.shape[-1] and hidden_states.dtype == done.dtype
                    and hidden_states.shape[1] <= done.shape[0] * done.shape[1]):
                return hidden_states
            # normalising again would be silently wrong: this transformers version calls ln_pre differently
            raise RuntimeError(
                "fastvlm: the Pixtral pairing expected ln_pre to receive the concatenated rows [1, tokens, "
                f"{done.shape[-1]}] of the fused patch conv, got {tuple(getattr(hidden_states, 'shape', ()))}; this "
                "transformers version's PixtralVisionModel.forward differs. fastvlm.unpatch(model) restores it; "
                "please report the version.")

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
        if pair.out is not None:
            if x is pair.out:  # the fused embedding's finished tokens
                if not pair.norm_fused:
                    pair.out = None
                return x
            pair.out = None
            _unexpected("_pos_embed to receive the fused patch embedding's tokens, got another tensor")
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


def _verdict(got, ref, dtype, k):
    """The report's verify text: relative error against fastvlm's bound for ``dtype`` and reduction length ``k``."""
    from fastvlm.testing import rel_err, tolerance

    err = rel_err(got, ref)
    bound = tolerance(dtype, k, roundings=3)
    ok = got.shape == ref.shape and err <= bound
    return f"verify: rel err {err:.2e} (bound {bound:.2e}) {'ok' if ok else 'MISMATCH'}"


def _verify_pair(pair, parent, embed, original_norm, kind):
    """Armed fused tokens vs the unfused chain (the plain embedding, the original position code and pre-norm)."""
    from fastvlm.integrations.transformers import probe_args

    x = probe_args(embed._fastvlm_recipe, embed)[0]
    if x.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    with torch.no_grad():
        with pair.arm():
            got = embed(x) if kind == "clip" else _PosEmbedConsumer(parent, pair)(embed(x))
        if kind == "clip":
            ref = original_norm(embed(x))
        else:
            ref = original_norm(parent.patch_drop(type(parent)._pos_embed(parent, embed(x))))
    return _verdict(got, ref, x.dtype, embed.get_submodule(embed._fastvlm_recipe.conv).weight[0].numel())


def _verify_pixtral(pair, conv, original_norm):
    """Armed fused conv + pass-through ln_pre vs the original conv and RMSNorm, on a probe of 2 x 3 patches."""

    w = conv.weight
    if w.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    p = conv.kernel_size[0]
    x = torch.randn(1, conv.in_channels, 2 * p, 3 * p, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        with pair.arm():
            got = pair.norm(conv(x).flatten(2).transpose(1, 2))
        ref = original_norm(nn.Conv2d.forward(conv, x).flatten(2).transpose(1, 2))
    return _verdict(got, ref, x.dtype, w[0].numel())


def _verify_qwen3(pair, parent, embed, original_pos):
    """Armed fused rows (positions added in the GEMM) vs the plain embedding plus the original position code."""

    conv = embed.proj
    if conv.weight.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    m = parent.config.spatial_merge_size
    grid = torch.tensor([[1, 2 * m, 3 * m]], device=conv.weight.device)
    x = torch.randn(6 * m * m, conv.weight[0].numel(), device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        idx, w = _qwen3_taps(parent, grid, {})
        with pair.arm((idx, w)):
            got = embed(x)
            got = got + (pair.norm(idx) * w[:, :, None]).sum(1).to(got.dtype)
        plain = embed(x)
        ref = plain + (original_pos(idx) * w[:, :, None]).sum(1).to(plain.dtype)
    return _verdict(got, ref, x.dtype, x.shape[1])


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


# ------------------------------------------------------------------------------------------ still images (Qwen-VL)

class _StillImageCall:
    """A Qwen-VL model's ``get_image_features`` (flag ``_fastvlm_still_call``) or ``get_video_features`` (flag
    ``_fastvlm_video_call``) wrapped on the instance. Inside an image call the fused patch embedding reads one of the
    processor's repeated frames against the time-summed kernel; inside a video call never, even where the video
    path goes through ``get_image_features`` (Qwen3-VL does)."""

    def __init__(self, inner, embed, flag="_fastvlm_still_call"):
        self.inner, self.embed, self.flag = inner, embed, flag
        self.__wrapped__ = inner
        self.__doc__ = getattr(inner, "__doc__", None)

    def __call__(self, *args, **kwargs):
        state = self.embed.__dict__
        before = state.get(self.flag)
        state[self.flag] = True
        try:
            return self.inner(*args, **kwargs)
        finally:
            if before is None:
                state.pop(self.flag, None)
            else:
                state[self.flag] = before


def enable_still_images(model):
    """Install ``_StillImageCall`` on every module with ``get_image_features``, ``get_video_features`` and a
    ``visual.patch_embed`` that is a fused pre-patchified-rows embedding. Returns report rows."""
    rows = []
    undo = model.__dict__.setdefault(_UNDO, [])
    for path, mod in model.named_modules():
        embed = getattr(getattr(mod, "visual", None), "patch_embed", None)
        if not (hasattr(mod, "get_image_features") and hasattr(mod, "get_video_features")
                and isinstance(embed, _FusedEmbedMixin) and embed._fastvlm_recipe.kind == "rows"):
            continue
        if isinstance(mod.__dict__.get("get_image_features"), _StillImageCall):
            rows.append((path, type(mod).__name__, "still images", "already fused", ""))
            continue
        T = embed.get_submodule(embed._fastvlm_recipe.conv).kernel_size[0]
        if T < 2:
            continue
        _set_instance_attr(mod, "get_image_features", _StillImageCall(getattr(mod, "get_image_features"), embed),
                           undo)
        _set_instance_attr(mod, "get_video_features",
                           _StillImageCall(getattr(mod, "get_video_features"), embed, "_fastvlm_video_call"), undo)
        rows.append((path, type(mod).__name__, "still images", "patched",
                     f"get_image_features: the patch GEMM reads 1 of the {T} repeated frames against the "
                     f"time-summed kernel ({T}x fewer FLOPs); videos keep the full kernel"))
    return rows
