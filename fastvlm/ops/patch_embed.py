"""``fastvlm::patch_embed``: a stride = kernel patch convolution as one GEMM with its glue fused.

    out[b, prefix + t] = conv(pixels)[b, :, t] + bias + pos[pos_rows[t]]       t = patch index, row-major
    out[b, prefix_i]   = cls[i] + pos[cls_pos + i]                          (prefix rows: class / register tokens)
    out[b, :]          = LayerNorm(out[b, :]) * norm_weight + norm_bias      (optional fused pre-norm, all rows;
                                                                             or RMSNorm * norm_weight: norm_rms)

The GEMM reads the patches straight from the pixel tensor (im2col in the A loads: element offsets of each patch's
corner and of each pixel inside a patch, so NCHW, NHWC and any strides work) and, for uint8 pixels, applies the image
processor's rescale and mean/std normalisation per channel as it loads. Bias, position embedding and the placement
after the class-token row happen in the epilogue; the prefix rows (one class token, or timm's class + register
tokens) are one small extra write. A fused pre-norm (CLIP's ``pre_layrnorm``, timm's ``norm_pre``) is an in-place
row-norm pass over the finished output (kernels/row_norm.py).

PyTorch path: ``F.unfold``-equivalent reshape + ``F.linear`` with transformers' cast point (pixels cast to the weight
dtype before the convolution). Backward: PyTorch ops (weight, bias, position table, class token, and float pixels).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastvlm import _dispatch
from fastvlm.ops import _checks, compiled
from fastvlm._cache import shared_cache

OP_NAME = "fastvlm::patch_embed"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _grid(pixels, patch):
    B, C, H, W = pixels.shape
    if H % patch or W % patch:
        raise ValueError(f"patch_embed: image {H}x{W} is not divisible by the patch size {patch}")
    return B, C, H // patch, W // patch


@shared_cache(64)  # device tables: safe across threads and CUDA streams
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


def _pix_tables(image_hw, B, gh, gw, patch, C):
    """Int32 (rows << 16 | cols) of each patch that lie inside its image, [B * gh * gw], and (ki << 16 | kj) of each
    column in the conv weight's (c, ki, kj) order, [C * p * p] (fused_linear's ``pix_limits`` / ``pix_cols``)."""
    dev = image_hw.device
    hw = image_hw.to(torch.int64)
    lh = (hw[:, 0, None] - torch.arange(gh, device=dev) * patch).clamp(0, patch)  # [B, gh]
    lw = (hw[:, 1, None] - torch.arange(gw, device=dev) * patch).clamp(0, patch)  # [B, gw]
    lim = (lh[:, :, None] * 65536 + lw[:, None, :]).reshape(-1).to(torch.int32)
    k = torch.arange(patch, device=dev)
    pk = (k.view(patch, 1) * 65536 + k.view(1, patch)).reshape(1, -1).expand(C, -1).reshape(-1).to(torch.int32)
    return lim.contiguous(), pk.contiguous()


def _affine_patches(pixels, patch, scale, shift, image_hw):
    """im2col of uint8 pixels normalised per channel, with the pixels outside each image (``image_hw``) set to 0."""
    a = im2col_ref(pixels, patch)
    sc, sh = _affine_cols(scale, shift, patch)
    a = a.float() * sc + sh
    if image_hw is not None:
        B, C, gh, gw = _grid(pixels, patch)
        lim, pk = _pix_tables(image_hw, B, gh, gw, patch, C)
        lim, pk = lim.to(torch.int64), pk.to(torch.int64)
        inside = ((pk[None, :] // 65536) < (lim[:, None] // 65536)) & ((pk[None, :] % 65536) < (lim[:, None] % 65536))
        a = a * inside
    return a


def _n_prefix(cls):
    return 0 if cls is None else (1 if cls.dim() == 1 else cls.shape[0])


def _prefix_values(cls, pos, cls_pos):
    """[P, D] values of the prefix rows: the tokens, plus their position rows when ``cls_pos >= 0``."""
    c = cls.reshape(-1, cls.shape[-1])
    if pos is not None and cls_pos >= 0:
        c = c + pos[cls_pos:cls_pos + c.shape[0]]
    return c


def _norm_ref(y, weight, bias, eps, rms):
    """The fused pre-norm on the PyTorch path: fp32 statistics and math, one rounding to y's dtype."""
    D = y.shape[-1]
    ct = torch.promote_types(y.dtype, torch.float32)
    if rms:
        return F.rms_norm(y.to(ct), (D,), weight.to(ct), eps).to(y.dtype)
    return F.layer_norm(y, (D,), weight, bias, eps)


def _forward(pixels, weight, bias, pos, pos_rows, cls, cls_pos, scale, shift, patch, cls_first, norm_weight=None,
             norm_bias=None, eps=0.0, norm_rms=False, image_hw=None, keep_rows=None, backend=None):
    B, C, gh, gw = _grid(pixels, patch)
    T = gh * gw
    D = weight.shape[0]
    w2 = weight.flatten(1)  # [D, C * p * p]; no -1: D may be 0
    prefix = _n_prefix(cls)
    if backend is None:  # the index tables' values (here: torch.compile's calls check them too)
        if pos_rows is not None and pos is not None:
            _checks.check_indices("patch_embed", "pos_rows", pos_rows, pos.shape[0],
                                  "{op}: {name} holds rows {lo}..{hi} of a {n}-row position table")
        if keep_rows is not None:
            _checks.check_indices("patch_embed", "keep_rows", keep_rows, B * T,
                                  "{op}: {name} must index the {n} patches, got {lo}..{hi}")
    reasons = _checks.autocast_reasons(pixels.device)
    if w2.dtype not in KERNEL_DTYPES:
        reasons.append(f"weight dtype {w2.dtype} is not one of float16/bfloat16/float32")
    if pixels.dtype != torch.uint8 and pixels.dtype not in KERNEL_DTYPES:
        reasons.append(f"pixels dtype {pixels.dtype} is not uint8/float16/bfloat16/float32")
    for name, t in (("bias", bias), ("position table", pos), ("class token", cls), ("norm weight", norm_weight),
                    ("norm bias", norm_bias)):
        if t is not None and t.dtype != w2.dtype:
            reasons.append(f"{name} is {t.dtype} but the weight is {w2.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("position table", pos), ("pos_rows", pos_rows),
                    ("class token", cls), ("pixel_scale", scale), ("pixel_shift", shift),
                    ("norm weight", norm_weight), ("norm bias", norm_bias)):
        if t is not None and t.device != pixels.device:
            reasons.append(f"{name} is on {t.device} but the pixels on {pixels.device}")
    def detail():  # (built only for a trace or a fallback report)
        text = f"pixels{tuple(pixels.shape)} {str(pixels.dtype).replace('torch.', '')} p{patch} -> {D}"
        if norm_weight is not None:
            text += " +rmsnorm" if norm_rms else " +layernorm"
        if image_hw is not None:
            text += " padded"
        if keep_rows is not None:
            text += f" keep {keep_rows.shape[0]}/{B * T}"
        return text

    if backend is None:
        backend = _dispatch.choose_backend(OP_NAME, pixels.device, reasons, detail)
    out = torch.empty(B, T + prefix, D, device=pixels.device, dtype=w2.dtype)
    first = prefix if cls_first else 0
    if backend == "triton":
        from fastvlm.kernels.gemm import fused_linear

        rows, cols = _tables(tuple(pixels.shape), tuple(pixels.stride()), patch, str(pixels.device))
        sc, sh = _affine_cols(scale, shift, patch)
        lim, pk = _pix_tables(image_hw, B, gh, gw, patch, C) if image_hw is not None else (None, None)
        out_rows = _out_rows(B, T, prefix, first, pixels.device)
        # (one image: its T rows as they are; a batch: repeated per image)
        prows = None if pos is None else pos_rows.repeat(B) if pos_rows.shape[0] == T and B != 1 else pos_rows
        if keep_rows is not None:  # only these patches: the A rows, positions and destinations of the kept ones
            out.zero_()
            rows = rows[keep_rows]
            prows = None if prows is None else prows[keep_rows]
            lim = None if lim is None else lim[keep_rows]
            out_rows = (out_rows[keep_rows] if out_rows is not None
                        else keep_rows if keep_rows.is_contiguous() else keep_rows.contiguous())
        fused_linear(pixels, w2, bias, a_mode="separable", a_rows=rows, a_cols=cols, col_scale=sc, col_shift=sh,
                     pix_limits=lim, pix_cols=pk, pos=pos, pos_rows=prows,
                     out_rows=out_rows, out=out.view(B * (T + prefix), D))
    else:
        a = im2col_ref(pixels, patch) if scale is None else _affine_patches(pixels, patch, scale, shift, image_hw)
        y = F.linear(a.to(w2.dtype), w2, bias).view(B, T, D)
        if pos is not None:
            y = y + pos[pos_rows].view(-1, T, D)
        if keep_rows is not None:  # dropped patches are 0, whatever their pixels hold (as the kernel skips them)
            y = y.masked_fill(~_kept(keep_rows, B * T).view(B, T, 1), 0)
        out[:, first:first + T] = y
    if cls is not None:
        row = 0 if cls_first else T
        out[:, row:row + prefix] = _prefix_values(cls, pos, cls_pos)
    if norm_weight is not None:
        if backend == "triton":
            from fastvlm.kernels.row_norm import row_norm_

            row_norm_(out.view(B * (T + prefix), D), norm_weight, norm_bias, eps, rms=norm_rms)
        else:
            out = _norm_ref(out, norm_weight, norm_bias, eps, norm_rms)
    return out


def _kept(keep_rows, n):
    """[n] bool mask of the kept patch rows."""
    mask = torch.zeros(n, dtype=torch.bool, device=keep_rows.device)
    mask[keep_rows] = True
    return mask


@shared_cache(64)  # device tables: safe across threads and CUDA streams
def _out_rows_cached(B, T, prefix, first, device):
    b = torch.arange(B, device=torch.device(device)).view(B, 1) * (T + prefix)
    return (b + first + torch.arange(T, device=torch.device(device)).view(1, T)).reshape(-1)


def _out_rows(B, T, prefix, first, device):
    return _out_rows_cached(B, T, prefix, first, str(device)) if prefix else None


def _backward(saved, g, patch, cls_pos, cls_first, needs, pos_len=0, eps=0.0, norm_rms=False):
    pixels, weight, pos_rows, scale, shift, bias, pos, cls, norm_weight, norm_bias, image_hw, keep_rows = saved
    need_px, need_w, need_b, need_pos, need_cls, need_nw, need_nb = needs
    B, C, gh, gw = _grid(pixels, patch)
    T = gh * gw
    D = weight.shape[0]
    prefix = _n_prefix(cls)
    first = prefix if cls_first else 0
    ct = torch.promote_types(weight.dtype, torch.float32)  # accumulation dtype (fp64 stays fp64)
    gnw = gnb = None
    if norm_weight is not None:  # recompute the pre-norm output (PyTorch path) and back-propagate the LayerNorm
        with torch.no_grad():
            y = _forward(pixels, weight, bias, pos, pos_rows, cls, cls_pos, scale, shift, patch, cls_first,
                         image_hw=image_hw, keep_rows=keep_rows, backend="torch")
        with torch.enable_grad():
            y = y.detach().requires_grad_()
            nw = norm_weight.detach().requires_grad_()
            nb = norm_bias.detach().requires_grad_() if norm_bias is not None else None
            z = _norm_ref(y, nw, nb, eps, norm_rms)
            grads = torch.autograd.grad(z, [t for t in (y, nw, nb) if t is not None], g)
        g, gnw = grads[0], grads[1]
        gnb = grads[2] if nb is not None else None
        gnw = gnw if need_nw else None
        gnb = gnb if need_nb else None
    gp = g[:, first:first + T].reshape(B * T, D)
    if keep_rows is not None:  # the other patch rows are constants (zero)
        gp = gp.masked_fill(~_kept(keep_rows, B * T)[:, None], 0)
    gx = gw_ = gb = gpos = gcls = None
    if need_w:
        a = im2col_ref(pixels, patch) if scale is None else _affine_patches(pixels, patch, scale, shift, image_hw)
        gw_ = (gp.t() @ a.to(weight.dtype)).view_as(weight).to(weight.dtype)
    if need_b and bias is not None:
        gb = gp.to(ct).sum(0).to(weight.dtype)
    row = 0 if cls_first else T
    if need_pos and pos is not None:
        acc = torch.zeros(pos_len, D, dtype=ct, device=g.device)  # the table's size: no data-dependent shapes
        acc.index_add_(0, pos_rows.repeat(B) if pos_rows.shape[0] == T else pos_rows, gp.to(ct))
        if cls is not None and cls_pos >= 0:
            acc[cls_pos:cls_pos + prefix] += g[:, row:row + prefix].to(ct).sum(0)
        gpos = acc
    if need_cls and cls is not None:
        gcls = g[:, row:row + prefix].to(ct).sum(0).reshape(cls.shape)
    if need_px and pixels.is_floating_point() and scale is None:
        ga = (gp @ weight.flatten(1)).to(pixels.dtype)  # [B*T, C*p*p] -> fold back
        gx = ga.view(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(pixels.shape)
    return gx, gw_, gb, gpos, gcls, gnw, gnb


def _save(ctx, pixels, weight, bias, pos, cls, pos_rows, cls_pos, scale, shift, patch, cls_first, norm_weight,
          norm_bias, eps, norm_rms=False, image_hw=None, keep_rows=None):
    ctx.cfg = (patch, cls_pos, cls_first, None if pos is None else pos.shape, float(eps), bool(norm_rms))
    ctx.save_for_backward(pixels, weight, pos_rows, scale, shift, bias, pos, cls, norm_weight, norm_bias, image_hw,
                          keep_rows)


def _grads(ctx, g):
    saved = ctx.saved_tensors
    patch, cls_pos, cls_first, pos_shape, eps, norm_rms = ctx.cfg
    n_in = len(ctx.needs_input_grad)  # the op may be called without its defaulted trailing arguments
    n = tuple(ctx.needs_input_grad) + (False,) * (17 - n_in)
    weight = saved[1]
    gx, gw, gb, gpos, gcls, gnw, gnb = _backward(saved, g, patch, cls_pos, cls_first,
                                                 (n[0], n[1], n[2], n[3], n[4], n[11], n[12]),
                                                 pos_shape[0] if pos_shape is not None else 0, eps, norm_rms)
    gpos = gpos.to(weight.dtype) if gpos is not None else None
    gcls = gcls.to(weight.dtype) if gcls is not None else None
    gnw = gnw.to(saved[8].dtype) if gnw is not None else None
    gnb = gnb.to(saved[9].dtype) if gnb is not None else None
    return (gx, gw, gb, gpos, gcls, None, None, None, None, None, None, gnw, gnb, None, None, None, None)[:n_in]


class _PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, weight, bias, pos, cls, pos_rows, cls_pos, scale, shift, patch, cls_first, norm_weight,
                norm_bias, eps, norm_rms, image_hw, keep_rows):
        _save(ctx, pixels, weight, bias, pos, cls, pos_rows, cls_pos, scale, shift, patch, cls_first, norm_weight,
              norm_bias, eps, norm_rms, image_hw, keep_rows)
        return _forward(pixels, weight, bias, pos, pos_rows, cls, cls_pos, scale, shift, patch, cls_first, norm_weight,
                        norm_bias, eps, norm_rms, image_hw, keep_rows)

    @staticmethod
    def backward(ctx, g):
        return _grads(ctx, g)


@torch.library.custom_op(OP_NAME, mutates_args=())
def patch_embed_op(pixels: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   pos: Optional[torch.Tensor], cls: Optional[torch.Tensor], pos_rows: Optional[torch.Tensor],
                   cls_pos: int, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], patch: int,
                   cls_first: bool, norm_weight: Optional[torch.Tensor] = None,
                   norm_bias: Optional[torch.Tensor] = None, eps: float = 0.0, norm_rms: bool = False,
                   image_hw: Optional[torch.Tensor] = None, keep_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _forward(pixels, weight, bias, pos, pos_rows, cls, cls_pos, scale, shift, patch, cls_first, norm_weight,
                    norm_bias, eps, norm_rms, image_hw, keep_rows)


@patch_embed_op.register_fake
def _(pixels, weight, bias, pos, cls, pos_rows, cls_pos, scale, shift, patch, cls_first, norm_weight=None,
      norm_bias=None, eps=0.0, norm_rms=False, image_hw=None, keep_rows=None):
    B, C, H, W = pixels.shape
    T = (H // patch) * (W // patch)
    return weight.new_empty((B, T + _n_prefix(cls), weight.shape[0]))


def _setup(ctx, inputs, output):
    _save(ctx, *inputs, *(None, None, 0.0, False, None, None)[len(inputs) - 11:])


patch_embed_op.register_autograd(_grads, setup_context=_setup)
compiled.register(patch_embed_op)  # its triton_op twin, taken while compiling (fastvlm.ops.compiled)


def patch_embed(pixels, weight, bias=None, *, pos=None, pos_rows=None, cls=None, cls_pos=0, cls_first=True,
                pixel_scale=None, pixel_shift=None, norm_weight=None, norm_bias=None, eps=1e-5, norm_rms=False,
                image_hw=None, keep_rows=None):
    """Patch embedding of ``pixels`` [B, C, H, W] (any strides; float, or uint8 with ``pixel_scale``/``pixel_shift``
    per channel: value * scale + shift, e.g. scale = 1 / (255 std), shift = -mean / std) by the conv ``weight``
    [D, C, p, p]. Returns [B, P + T, D] in the weight's dtype: the P prefix rows first (or last) when ``cls`` is
    given ([D]: one class token, or [P, D]: class and register tokens), ``pos`` [L, D] rows ``pos_rows`` ([T], or
    [B * T] per image) added to the patches and rows ``cls_pos + i`` to the prefix rows (none when ``cls_pos < 0``).
    ``norm_weight`` (and ``norm_bias``, ``eps``): a LayerNorm over every output row, applied last (a fused pre-norm);
    with ``norm_rms`` an RMSNorm (``norm_weight`` only), as Pixtral's ``ln_pre``.
    ``image_hw`` [B, 2] (uint8 pixels only): each image's height and width in pixels inside a batch padded at the
    bottom and right; pixels outside are taken as 0 *after* normalising, as Idefics2/3's and SmolVLM's processors pad.
    ``keep_rows`` [R] int64 (indices into the B * T patches, image-major): only these patches are computed; the
    others are zero before the norm and carry no gradient (for callers that crop padded images, as Pixtral does).
    """
    if pixels.dim() != 4:
        raise ValueError(f"patch_embed: pixels must be [batch, channels, height, width], got {tuple(pixels.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[1] != pixels.shape[1]:
        raise ValueError(f"patch_embed: weight must be a square conv kernel [D, {pixels.shape[1]}, p, p], got "
                         f"{tuple(weight.shape)}")
    patch = weight.shape[2]
    D = weight.shape[0]
    _, _, gh, gw = _grid(pixels, patch)
    if pixels.dtype == torch.uint8 and pixel_scale is None:
        raise ValueError("patch_embed: uint8 pixels need pixel_scale and pixel_shift (the processor's normalisation)")
    if pos is not None and (pos_rows is None or pos_rows.shape not in ((gh * gw,), (pixels.shape[0] * gh * gw,))):
        raise ValueError(f"patch_embed: pos_rows must be [{gh * gw}] (or per image [{pixels.shape[0] * gh * gw}])")
    if pos is not None:
        if pos.dim() != 2 or pos.shape[1] != D:
            raise ValueError(f"patch_embed: pos must be a [positions, {D}] table, got {tuple(pos.shape)}")
        pos_rows = _checks.index_tensor("patch_embed", "pos_rows", pos_rows, pos_rows.device, dims=1)
    if cls is not None and (cls.dim() not in (1, 2) or cls.shape[-1] != D):
        raise ValueError(f"patch_embed: cls must be [{D}] or [prefix, {D}], got {tuple(cls.shape)}")
    if pos is not None and cls is not None and cls_pos >= 0 and cls_pos + _n_prefix(cls) > pos.shape[0]:
        raise ValueError(f"patch_embed: prefix rows at cls_pos {cls_pos} run past the {pos.shape[0]}-row table")
    if norm_weight is not None and (norm_weight.shape != (D,) or (norm_bias is not None and norm_bias.shape != (D,))):
        raise ValueError(f"patch_embed: norm_weight and norm_bias must be [{D}]")
    if norm_rms and (norm_weight is None or norm_bias is not None):
        raise ValueError("patch_embed: norm_rms needs norm_weight and takes no norm_bias")
    if image_hw is not None:
        if pixel_scale is None:
            raise ValueError("patch_embed: image_hw applies to uint8 pixels given with pixel_scale / pixel_shift "
                             "(float pixels from the processor are already 0 where padded)")
        if (image_hw.shape != (pixels.shape[0], 2) or image_hw.is_floating_point()
                or image_hw.device != pixels.device):
            raise ValueError(f"patch_embed: image_hw must be an integer [{pixels.shape[0]}, 2] tensor of (height, "
                             f"width) on {pixels.device}, got {tuple(image_hw.shape)} {image_hw.dtype}")
    if keep_rows is not None and (keep_rows.dim() != 1 or keep_rows.dtype != torch.int64
                                  or keep_rows.device != pixels.device):
        raise ValueError(f"patch_embed: keep_rows must be a 1-D int64 tensor of patch indices on {pixels.device}")
    bias, pos, cls, norm_weight, norm_bias = _checks.dense(bias, pos, cls, norm_weight, norm_bias)
    args = (pixels, weight, bias, pos, cls, pos_rows, int(cls_pos), pixel_scale, pixel_shift, patch, bool(cls_first),
            norm_weight, norm_bias, float(eps), bool(norm_rms), image_hw, keep_rows)
    if torch.compiler.is_compiling() or _checks.is_meta(pixels):  # meta: shape tracing, answered by the fake
        op = compiled.op_for(OP_NAME, weight, (("bias", bias), ("pos", pos), ("cls", cls))) \
            if torch.compiler.is_compiling() else torch.ops.fastvlm.patch_embed
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5] + args[11:13]):
        return _PatchEmbedFunction.apply(*args)
    return _forward(pixels, weight, bias, pos, pos_rows, cls, int(cls_pos), pixel_scale, pixel_shift, patch,
                    bool(cls_first), norm_weight, norm_bias, float(eps), bool(norm_rms), image_hw, keep_rows)
