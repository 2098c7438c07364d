"""``fastvlm.patch(verify=True)``: random probes built from each module's own parameters and attributes, and the
comparison of a fused module with its original on one of them.

A probe is shaped as the family's caller passes its input, with every size read off the module (the norm's width,
the merge scale, the patch and image sizes, the position table, the input rank), never assumed. Where no probe can
be built (a size the module does not record, an odd configuration) ``ProbeUnavailable`` says why and the report
reads "not verified: why"; where the original itself rejects the probe, likewise. Only the fused module raising on
an input the original takes, or a result outside the bound, marks the swap as failed: the original stays in place.
"""
from __future__ import annotations

import math

import torch


class ProbeUnavailable(Exception):
    """No probe can be built for this module; the message says why."""


def _device_dtype(module):
    p = next(iter(module.parameters()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _width_of_norm(norm):
    """The width a norm module normalises (LayerNorm's normalized_shape, else its weight's length), or None."""
    shape = getattr(norm, "normalized_shape", None)
    if shape is not None and len(tuple(shape)) == 1:
        return int(tuple(shape)[0])
    w = getattr(norm, "weight", None)
    return int(w.shape[-1]) if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def _optional(module, path):
    owner, _, attr = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr, None)


def build_probe(recipe, fused):
    """Random forward arguments for ``fused`` (a ``Fused<Original>`` built from ``recipe``), on its device and
    dtype. Raises ``ProbeUnavailable`` naming what is missing."""
    dev, dt = _device_dtype(fused)

    def rand(*shape):
        return torch.randn(*shape, device=dev, dtype=dt)

    if getattr(recipe, "qformer", False) or hasattr(fused, "_fastvlm_probe_args"):  # the module builds its own
        return fused._fastvlm_probe_args()  # (a Q-Former: positional (query_embeds, ..., encoder_hidden_states))
    if recipe.fused_name == "FusedLlavaNextVideoPooler":
        k = _pair(fused.pool.kernel_size)[0]
        width = fused.pool.in_channels if isinstance(fused.pool, torch.nn.Conv2d) else 16
        return (rand(2, (2 * k) ** 2, width),)
    if getattr(recipe, "role", None) in ("resampler", "connector"):  # Idefics2's Perceiver: (context, patch mask)
        width = (fused.modality_projection.gate_proj.in_features if recipe.role == "connector"
                 else fused.latents.shape[1])
        mask = torch.ones(2, 6, dtype=torch.bool, device=dev)
        mask[1, 4:] = False
        return rand(2, 6, width), mask
    if hasattr(recipe, "kind"):
        return _embed_probe(recipe, fused, rand, dev)
    return _projector_probe(recipe, fused, rand, dev)


def _embed_probe(recipe, fused, rand, dev):
    conv = fused.get_submodule(recipe.conv)
    if recipe.kind == "unfold":  # Llama 4: Unfold + Linear
        p = _pair(fused.unfold.kernel_size)[0]
        if conv.in_features % (p * p):
            raise ProbeUnavailable(f"the linear's input width {conv.in_features} is not channels x {p}x{p}")
        return (rand(2, conv.in_features // (p * p), 2 * p, 3 * p),)
    if recipe.kind == "rows":
        return (rand(8, conv.weight[0].numel()),)
    p = conv.kernel_size[0]
    if recipe.kind == "navit":  # a padded batch: the second image covers 2 x 3 of the 3 x 4 patch grid
        mask = torch.ones(2, 3, 4, dtype=torch.bool, device=dev)
        mask[1, 2:] = False
        mask[1, :, 3:] = False
        return rand(2, conv.in_channels, 3 * p, 4 * p), mask
    if recipe.kind == "timm":
        return (rand(2, conv.in_channels, *_timm_side(fused, p)),)
    if recipe.kind == "internvl":
        h, w = _pair(getattr(fused, "image_size", None) or (2 * p))
        return (rand(2, conv.in_channels, h, w),)
    return (rand(2, conv.in_channels, *_conv_pos_side(recipe, fused, p)),)


def _timm_side(embed, p):
    """A size timm's PatchEmbed takes: its img_size when strict (the conv floors it), else whole patches."""
    if embed.img_size is None:
        return 2 * p, 2 * p
    h, w = _pair(embed.img_size)
    if embed.strict_img_size or embed.dynamic_img_pad:
        return h, w
    gh, gw = h // p, w // p
    if gh < 1 or gw < 1:
        raise ProbeUnavailable(f"img_size {h}x{w} is smaller than the patch {p}")
    return gh * p, gw * p


def _conv_pos_side(recipe, fused, p):
    """CLIP-like embeddings add a position table of (side/p)^2 (+ class) rows: the image size it was built for."""
    side = getattr(fused, "image_size", None)
    if side is not None:
        h, w = _pair(side)
        if h >= p and w >= p:
            return h, w
    if recipe.pos is None:
        return 2 * p, 2 * p
    rows = fused._fastvlm_table().shape[0] - (1 if recipe.cls_token else 0)
    g = math.isqrt(rows)
    if g < 1 or g * g != rows:
        raise ProbeUnavailable(f"the position table's {rows} patch rows are not a square grid and the module "
                               "records no image_size")
    return g * p, g * p


def _projector_probe(recipe, fused, rand, dev):
    if recipe.merged_width:  # Qwen-VL mergers: rows of the norm's width, viewed as rows of the merged width
        width = int(getattr(fused, recipe.merged_width))
        norm = _optional(fused, recipe.norm) if recipe.norm else None
        row = _width_of_norm(norm) if norm is not None else width
        if row is None:
            raise ProbeUnavailable(f"the width of {recipe.norm} ({type(norm).__name__}) is not recorded")
        if width % row:
            raise ProbeUnavailable(f"the merged width {width} is not a multiple of the norm's width {row}")
        return (rand(4 * width // row, row),)
    if recipe.merge == "avg_pool":  # Gemma 3
        side = fused.patches_per_image
        return (rand(2, side * side, getattr(fused, recipe.weight_in_out).shape[0]),)
    if recipe.merge in ("pixel_shuffle", "unfold"):
        s = fused._fastvlm_scale()
        first = fused.get_submodule(recipe.merger or recipe.linear_1)
        if s < 1 or first.in_features % (s * s):
            raise ProbeUnavailable(f"the input width {first.in_features} is not a multiple of the merge {s}x{s}")
        width = first.in_features // (s * s)
        if recipe.merge == "unfold":  # Mistral 3: one image of 2s x 2s patches and its size in pixels
            side = 2 * s * fused.patch_merger.patch_size
            return rand((2 * s) ** 2, width), torch.tensor([[side, side]], device=dev)
        if recipe.grid_input:  # LFM2-VL: a [batch, h, w, features] grid, not square
            return (rand(2, 2 * s, 3 * s, width),)
        return (rand(2, (2 * s) ** 2, width),)
    if recipe.weight_in_out:
        return (rand(2, 5, getattr(fused, recipe.weight_in_out).shape[0]),)
    return (rand(2, 5, fused.get_submodule(recipe.linear_1).in_features),)


def _main_tensor(out):
    if hasattr(out, "last_hidden_state"):  # a ModelOutput (Q-Former)
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def _describe(exc):
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def compare(original, fused, args):
    """Run both modules on ``args``. Returns (ok, detail): ok is True (within the bound), False (the fused module
    raised where the original did not, or a mismatch: do not swap) or None (not verified, with why)."""
    from fastvlm.testing import rel_err, tolerance

    if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
        return None, "not verified: parameters are on the meta device"
    with torch.no_grad():
        try:
            ref = _main_tensor(original(*args))
        except Exception as exc:  # the original's own behaviour on this probe: nothing to compare
            return None, f"not verified: the original rejects the probe ({_describe(exc)})"
        try:
            out = _main_tensor(fused(*args))
        except Exception as exc:
            return False, f"verify: the fused module raised {_describe(exc)} where the original did not"
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None, f"not verified: the output is a {type(ref).__name__}, not a tensor"
    if out.shape != ref.shape:
        return False, f"verify: output shape {tuple(out.shape)} != the original's {tuple(ref.shape)} MISMATCH"
    x0 = next(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    err = rel_err(out, ref)
    bound = tolerance(x0.dtype, x0.shape[-1] * 4, roundings=3)
    ok = math.isfinite(err) and err <= bound
    return ok, f"verify: rel err {err:.2e} (bound {bound:.2e}) {'ok' if ok else 'MISMATCH'}"


def verify(original, fused, recipe=None, probe=None):
    """Build the probe (unless given) and compare; never raises. Returns (ok, detail) as ``compare``."""
    try:
        args = probe if probe is not None else build_probe(recipe, fused)
    except ProbeUnavailable as exc:
        return None, f"not verified: {exc}"
    except Exception as exc:
        return None, f"not verified: no probe could be built ({_describe(exc)})"
    return compare(original, fused, args)
