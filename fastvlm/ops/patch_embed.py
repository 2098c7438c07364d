"""``fastvlm::patch_embed``: a stride = kernel patch convolution as one GEMM with its glue fused.

    out[b, prefix + t] = conv(pixels)[b, :, t] + bias + pos[pos_rows[t]]       t = patch index, row-major
    out[b, cls_row]    = cls + pos[cls_pos]                                  (when there is a class token)

The GEMM reads the patches straight from the pixel tensor (im2col in the A loads: element offsets of each patch's
corner and of each pixel inside a patch, so NCHW, NHWC and any strides work) and, for uint8 pixels, applies the image
processor's rescale and mean/std normalisation per channel as it loads. Bias, position embedding and the placement
after the class-token row happen in the epilogue; the class-token rows are one small extra write.

PyTorch path: ``F.unfold``-equivalent reshape + ``F.linear`` with transformers' cast point (pixels cast to the weight
dtype before the convolution). Backward: PyTorch ops (weight, bias, position table, class token, and float pixels).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from fastvlm import _dispatch

OP_NAME = "fastvlm::patch_embed"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _grid(pixels, patch):
    B, C, H, W = pixels.shape
    if H % patch or W % patch:
        raise ValueError(f"patch_embed: image {H}x{W} is not divisible by the patch size {patch}")
    return B, C, H // patch, W // patch


@functools.lru_cache(maxsize=64)
def _tables(shape, strides, patch, device):
    """(rows [B*T], cols [K]) int64 element offsets of each patch's corner and of each pixel inside a patch."""
    (B, C, H, W), (sn, sc, sh, sw) = shape, strides
    gh, gw = H // patch, W // patch
    dev = torch.device(device)
    b = torch.arange(B, device=dev).view(B, 1, 1) * sn
    py = torch.arange(gh, device=dev).view(1, gh, 1) * (patch * sh)
    px = torch.arange(gw, device=dev).view(1, 1, gw) * (patch * sw)
    rows = (b + py + px).reshape(-1)
    c = torch.arange(C, device=dev).view(C, 1, 1) * sc
    ki = torch.arange(patch, device=dev).view(1, patch, 1) * sh
    kj = torch.arange(patch, device=dev).view(1, 1, patch) * sw
    cols = (c + ki + kj).reshape(-1)  # (c, ki, kj): the conv weight's flattening order
    return rows, cols


def im2col_ref(pixels, patch):
    """[B * T, C * p * p] patches in the conv weight's (c, ki, kj) order, tokens row-major."""
    B, C, gh, gw = _grid(pixels, patch)
    x = pixels.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B * gh * gw, C * patch * patch)


def _affine_cols(scale, shift, patch):
    if scale is None:
        return None, None
    return (scale.float().repeat_interleave(patch * patch).contiguous(),
            shift.float().repeat_interleave(patch * patch).contiguous())


def _forward(pixels, weight, bias, pos, pos_rows, cls, cls_pos, scale, shift, patch, cls_first):
    B, C, gh, gw = _grid(pixels, patch)
    T = gh * gw
    D = weight.shape[0]
    w2 = weight.reshape(D, -1)
    prefix = 1 if cls is not None else 0
    reasons = []
    if w2.dtype not in KERNEL_DTYPES:
        reasons.append(f"weight dtype {w2.dtype} is not one of float16/bfloat16/float32")
    if pixels.dtype != torch.uint8 and pixels.dtype not in KERNEL_DTYPES:
        reasons.append(f"pixels dtype {pixels.dtype} is not uint8/float16/bfloat16/float32")
    for name, t in (("bias", bias), ("position table", pos), ("class token", cls)):
        if t is not None and t.dtype != w2.dtype:
            reasons.append(f"{name} is {t.dtype} but the weight is {w2.dtype}")
    detail = f"pixels{tuple(pixels.shape)} {str(pixels.dtype).replace('torch.', '')} p{patch} -> {D}"
    backend = _dispatch.choose_backend(OP_NAME, pixels.device, reasons, detail)
    out = torch.empty(B, T + prefix, D, device=pixels.device, dtype=w2.dtype)
    first = prefix if cls_first else 0
    if backend == "triton":
        from fastvlm.kernels.gemm import fused_linear

        rows, cols = _tables(tuple(pixels.shape), tuple(pixels.stride()), patch, str(pixels.device))
        sc, sh = _affine_cols(scale, shift, patch)
        out_rows = _out_rows(B, T, prefix, first, pixels.device)
        fused_linear(pixels, w2, bias, a_mode="separable", a_rows=rows, a_cols=cols, col_scale=sc, col_shift=sh,
                     pos=pos, pos_rows=None if pos is None else pos_rows.repeat(B) if pos_rows.shape[0] == T else pos_rows,
                     out_rows=out_rows, out=out.view(B * (T + prefix), D))
    else:
        a = im2col_ref(pixels, patch)
        if scale is not None:
            sc, sh = _affine_cols(scale, shift, patch)
            a = a.float() * sc + sh
        y = F.linear(a.to(w2.dtype), w2, bias).view(B, T, D)
        if pos is not None:
            y = y + pos[pos_rows]
        out[:, first:first + T] = y
    if cls is not None:
        row = 0 if cls_first else T
        c = cls if pos is None else cls + pos[cls_pos]
        out[:, row] = c
    return out


@functools.lru_cache(maxsize=64)
def _out_rows_cached(B, T, prefix, first, device):
    b = torch.arange(B, device=torch.device(device)).view(B, 1) * (T + prefix)
    return (b + first + torch.arange(T, device=torch.device(device)).view(1, T)).reshape(-1)


def _out_rows(B, T, prefix, first, device):
    return _out_rows_cached(B, T, prefix, first, str(device)) if prefix else None


def _backward(saved, g, patch, cls_pos, cls_first, needs, pos_len=0):
    pixels, weight, pos_rows, scale, shift, has_bias, has_pos, has_cls = saved
    need_px, need_w, need_b, need_pos, need_cls = needs
    B, C, gh, gw = _grid(pixels, patch)
    T = gh * gw
    D = weight.shape[0]
    prefix = 1 if has_cls else 0
    first = prefix if cls_first else 0
    gp = g[:, first:first + T].reshape(B * T, D)
    ct = torch.promote_types(weight.dtype, torch.float32)  # accumulation dtype (fp64 stays fp64)
    gx = gw_ = gb = gpos = gcls = None
    if need_w:
        a = im2col_ref(pixels, patch)
        if scale is not None:
            sc, sh = _affine_cols(scale, shift, patch)
            a = a.float() * sc + sh
        gw_ = (gp.t() @ a.to(weight.dtype)).view_as(weight).to(weight.dtype)
    if need_b and has_bias:
        gb = gp.to(ct).sum(0).to(weight.dtype)
    if need_pos and has_pos:
        acc = torch.zeros(pos_len, D, dtype=ct, device=g.device)  # the table's size: no data-dependent shapes
        acc.index_add_(0, pos_rows.repeat(B) if pos_rows.shape[0] == T else pos_rows, gp.to(ct))
        if has_cls:
            acc[cls_pos] += g[:, 0 if cls_first else T].to(ct).sum(0)
        gpos = acc
    if need_cls and has_cls:
        gcls = g[:, 0 if cls_first else T].to(ct).sum(0)
    if need_px and pixels.is_floating_point() and scale is None:
        ga = (gp @ weight.reshape(D, -1)).to(pixels.dtype)  # [B*T, C*p*p] -> fold back
        gx = ga.view(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(pixels.shape)
    return gx, gw_, gb, gpos, gcls


class _PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, weight, bias, pos, cls, pos_rows, cls_pos, scale, shift, patch, cls_first):
        ctx.cfg = (patch, cls_pos, cls_first, None if pos is None else pos.shape)
        ctx.has = (bias is not None, pos is not None, cls is not None)
        ctx.save_for_backward(pixels, weight, pos_rows, scale, shift)
        return _forward(pixels, weight, bias, pos, pos_rows, cls, cls_pos, scale, shift, patch, cls_first)

    @staticmethod
    def backward(ctx, g):
        pixels, weight, pos_rows, scale, shift = ctx.saved_tensors
        patch, cls_pos, cls_first, pos_shape = ctx.cfg
        n = ctx.needs_input_grad
        gx, gw, gb, gpos, gcls = _backward((pixels, weight, pos_rows, scale, shift, *ctx.has), g, patch, cls_pos,
                                           cls_first, (n[0], n[1], n[2], n[3], n[4]),
                                           pos_shape[0] if pos_shape is not None else 0)
        if gpos is not None:
            gpos = gpos.to(weight.dtype)
        if gcls is not None:
            gcls = gcls.to(weight.dtype)
        return gx, gw, gb, gpos, gcls, None, None, None, None, None, None


@torch.library.custom_op(OP_NAME, mutates_args=())
def patch_embed_op(pixels: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   pos: Optional[torch.Tensor], cls: Optional[torch.Tensor], pos_rows: Optional[torch.Tensor],
                   cls_pos: int, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], patch: int,
                   cls_first: bool) -> torch.Tensor:
    return _forward(pixels, weight, bias, pos, pos_rows, cls, cls_pos, scale, shift, patch, cls_first)


@patch_embed_op.register_fake
def _(pixels, weight, bias, pos, cls, pos_rows, cls_pos, scale, shift, patch, cls_first):
    B, C, H, W = pixels.shape
    T = (H // patch) * (W // patch)
    return weight.new_empty((B, T + (1 if cls is not None else 0), weight.shape[0]))


def _setup(ctx, inputs, output):
    pixels, weight, bias, pos, cls, pos_rows, cls_pos, scale, shift, patch, cls_first = inputs
    ctx.cfg = (patch, cls_pos, cls_first, None if pos is None else pos.shape)
    ctx.has = (bias is not None, pos is not None, cls is not None)
    ctx.save_for_backward(pixels, weight, pos_rows, scale, shift)


def _op_backward(ctx, g):
    grads = _PatchEmbedFunction.backward(ctx, g)
    return grads


patch_embed_op.register_autograd(_op_backward, setup_context=_setup)


def patch_embed(pixels, weight, bias=None, *, pos=None, pos_rows=None, cls=None, cls_pos=0, cls_first=True,
                pixel_scale=None, pixel_shift=None):
    """Patch embedding of ``pixels`` [B, C, H, W] (any strides; float, or uint8 with ``pixel_scale``/``pixel_shift``
    per channel: value * scale + shift, e.g. scale = 1 / (255 std), shift = -mean / std) by the conv ``weight``
    [D, C, p, p]. Returns [B, T (+1), D] in the weight's dtype: the class token row first (or last) when ``cls``
    [D] is given, ``pos`` [L, D] rows ``pos_rows`` [T] added to the patches and row ``cls_pos`` to the class token.
    """
    if pixels.dim() != 4:
        raise ValueError(f"patch_embed: pixels must be [batch, channels, height, width], got {tuple(pixels.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[1] != pixels.shape[1]:
        raise ValueError(f"patch_embed: weight must be a square conv kernel [D, {pixels.shape[1]}, p, p], got "
                         f"{tuple(weight.shape)}")
    patch = weight.shape[2]
    _, _, gh, gw = _grid(pixels, patch)
    if pixels.dtype == torch.uint8 and pixel_scale is None:
        raise ValueError("patch_embed: uint8 pixels need pixel_scale and pixel_shift (the processor's normalisation)")
    if pos is not None and (pos_rows is None or pos_rows.shape not in ((gh * gw,), (pixels.shape[0] * gh * gw,))):
        raise ValueError(f"patch_embed: pos_rows must be [{gh * gw}] (or per image [{pixels.shape[0] * gh * gw}])")
    args = (pixels, weight, bias, pos, cls, pos_rows, int(cls_pos), pixel_scale, pixel_shift, patch, bool(cls_first))
    if torch.compiler.is_compiling():
        return torch.ops.fastvlm.patch_embed(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
        return _PatchEmbedFunction.apply(*args)
    return _forward(pixels, weight, bias, pos, pos_rows, cls, int(cls_pos), pixel_scale, pixel_shift, patch,
                    bool(cls_first))
