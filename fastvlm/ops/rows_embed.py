"""``fastvlm::rows_embed``: Qwen-VL's patch embedding on pre-patchified rows, with its position rows fused.

    out[n] = A[n] @ W^T + bias + sum_t pos_w[n, t] * pos[pos_idx[n, t]]

``x`` [N, C * T * p * p] holds one patch per row in the (c, t, i, j) order Qwen2-VL's image processor emits, ``W``
is the Conv3d weight viewed [D, C * T * p * p], so with ``frames == 0`` A = x. Qwen3-VL adds a learned position
table resampled to each image's grid (bilinear: 4 taps per patch, bicubic: 16); the taps and their weights come from
transformers' own helper and are summed in the GEMM's epilogue in fp32, so neither the [N, taps, D] gather nor the
separate add pass exists.

Still images (``frames == T > 1``): the processor repeats an image T times along time, so every row is T equal
slabs and x W^T = x_0 (sum_t W_t)^T. Then ``weight`` is the time-summed kernel [D, C * p * p] and A reads only
the first slab of each channel (columns c * T * p * p + r, r < p * p): half the FLOPs and half the A reads at
T = 2. The identity holds only for repeated frames, so the caller decides (fastvlm/nn/patch_embed.py uses it when
asked to, never by guessing). It holds for finite pixels only: with an Inf pixel Inf * (W0 + W1) can be Inf where the
original's Inf * W0 + Inf * W1 is NaN. Such a pixel makes its output row non-finite, so rows that come out non-finite
are computed again the original's way against ``full_weight`` (the kernel before the sum over time): on the kernel
path per tile inside the GEMM (kernels/gemm_still.py), on the PyTorch path per row (reading the flags is one host
synchronisation on a CUDA device; on the CPU none).

PyTorch path: ``F.linear`` in the weight dtype, the position taps summed in fp32 and added once. Backward: PyTorch
ops (x, weight, bias and the position table; the tap indices and weights are data).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastvlm import _dispatch
from fastvlm.ops import _checks, compiled
from fastvlm._cache import shared_cache

OP_NAME = "fastvlm::rows_embed"


def first_frame(x, frames, chunk):
    """The first time slab of each channel of ``x`` [N, C * frames * chunk] as [N, C * chunk]."""
    N = x.shape[0]
    C = x.shape[1] // (frames * chunk)  # explicit widths: -1 is ambiguous for 0 rows
    return x.reshape(N, C, frames, chunk)[:, :, 0].reshape(N, C * chunk)


@shared_cache(32)  # device tables: safe across threads and CUDA streams
def _frame_cols(k_eff, frames, chunk, stride, device):
    k = torch.arange(k_eff, device=torch.device(device))
    return ((k // chunk) * (frames * chunk) + k % chunk) * stride


def _acc_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # fp32 for the kernel dtypes (fp64 stays fp64)


def pos_sum(pos, idx, w):
    """sum_t w[:, t] * pos[idx[:, t]] in fp32, one tap at a time (no [N, taps, D] intermediate)."""
    acc = None
    ct = _acc_dtype(pos.dtype)
    for t in range(idx.shape[1]):
        term = pos[idx[:, t]].to(ct) * w[:, t, None].to(ct)
        acc = term if acc is None else acc + term
    return acc


def _still_exact(y, x, full_weight, bias):
    """PyTorch path, still images: the rows of ``y`` (x0 against the time-summed kernel, + bias) that are not finite,
    again as the original computes them, the whole row of ``x`` against ``full_weight``."""
    bad = ((y - y) != 0).any(1)  # (y - y is 0 for finite values only)
    if bool(bad.any()):
        y = y.clone()
        y[bad] = F.linear(x[bad].to(full_weight.dtype), full_weight, bias)
    return y


def _forward(x, weight, bias, pos, pos_idx, pos_w, frames, chunk, full_weight=None, backend=None):
    N = x.shape[0]
    D, k_eff = weight.shape
    if backend is None and pos is not None:  # the taps' values (here: torch.compile's calls check them too)
        _checks.check_indices("rows_embed", "pos_idx", pos_idx, pos.shape[0],
                              "{op}: {name} holds rows {lo}..{hi} of a {n}-row table")
    reasons = _dispatch.dtype_device_reasons(x, (("weight", weight), ("bias", bias), ("position table", pos)), "rows")
    reasons += _checks.autocast_reasons(x.device)
    detail = f"rows({N}, {x.shape[1]}) -> {D}" + (f" still x{frames}" if frames else "") + (
        f" +pos{pos_idx.shape[1]}" if pos is not None else "")
    if backend is None:
        backend = _dispatch.choose_backend(OP_NAME, x.device, reasons, detail)
    if backend == "triton":
        from fastvlm.kernels.gemm import fused_linear

        kw = dict(pos=pos, pos_rows=None if pos is None else pos_idx.contiguous(),
                  pos_weights=None if pos is None else pos_w.float().contiguous())
        if frames:
            rows = torch.arange(N, device=x.device) * x.stride(0)
            cols = _frame_cols(k_eff, frames, chunk, x.stride(1), str(x.device))
            return fused_linear(x, weight, bias, a_mode="separable", a_rows=rows, a_cols=cols, still_frames=frames,
                                full_weight=full_weight, **kw)
        return fused_linear(x, weight, bias, **kw)
    a = first_frame(x, frames, chunk) if frames else x
    y = F.linear(a.to(weight.dtype), weight, bias)
    if frames and y.numel():
        y = _still_exact(y, x, full_weight, bias)
    if pos is not None:
        y = (y.to(_acc_dtype(y.dtype)) + pos_sum(pos, pos_idx, pos_w)).to(weight.dtype)
    return y


def _grads(ctx, g):
    x, weight, bias, pos, pos_idx, pos_w, _ = ctx.saved_tensors
    frames, chunk, pos_len = ctx.cfg
    n = tuple(ctx.needs_input_grad) + (False,) * 8
    g = g.contiguous()
    gx = gw = gb = gpos = None
    if n[0]:
        ga = g @ weight
        if frames:
            gx = torch.zeros_like(x).view(x.shape[0], -1, frames, chunk)
            gx[:, :, 0] = ga.view(x.shape[0], -1, chunk).to(x.dtype)
            gx = gx.view_as(x)
        else:
            gx = ga.to(x.dtype)
    if n[1]:
        a = first_frame(x, frames, chunk) if frames else x
        gw = (g.t() @ a.to(weight.dtype)).to(weight.dtype)
    if n[2] and bias is not None:
        gb = g.sum(0).to(bias.dtype)
    if n[3] and pos is not None:
        ct = _acc_dtype(pos.dtype)
        acc = torch.zeros(pos_len, g.shape[1], dtype=ct, device=g.device)
        gf = g.to(ct)
        for t in range(pos_idx.shape[1]):
            acc.index_add_(0, pos_idx[:, t], gf * pos_w[:, t, None].to(ct))
        gpos = acc.to(pos.dtype)
    return gx, gw, gb, gpos, None, None, None, None, None


def _save(ctx, x, weight, bias, pos, pos_idx, pos_w, frames, chunk, full_weight):
    ctx.cfg = (int(frames), int(chunk), 0 if pos is None else pos.shape[0])
    ctx.save_for_backward(x, weight, bias, pos, pos_idx, pos_w, full_weight)


class _RowsEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pos, pos_idx, pos_w, frames, chunk, full_weight):
        _save(ctx, x, weight, bias, pos, pos_idx, pos_w, frames, chunk, full_weight)
        return _forward(x, weight, bias, pos, pos_idx, pos_w, frames, chunk, full_weight)

    @staticmethod
    def backward(ctx, g):
        return _grads(ctx, g)


@torch.library.custom_op(OP_NAME, mutates_args=())
def rows_embed_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos: Optional[torch.Tensor],
                  pos_idx: Optional[torch.Tensor], pos_w: Optional[torch.Tensor], frames: int,
                  chunk: int, full_weight: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward(x, weight, bias, pos, pos_idx, pos_w, frames, chunk, full_weight)


@rows_embed_op.register_fake
def _(x, weight, bias, pos, pos_idx, pos_w, frames, chunk, full_weight):
    return weight.new_empty((x.shape[0], weight.shape[0]))


def _setup(ctx, inputs, output):
    _save(ctx, *inputs)


rows_embed_op.register_autograd(_grads, setup_context=_setup)
compiled.register(rows_embed_op)  # its triton_op twin, taken while compiling (fastvlm.ops.compiled)


def rows_embed(x, weight, bias=None, *, pos=None, pos_idx=None, pos_weights=None, frames=0, chunk=0,
               full_weight=None):
    """Patch embedding of pre-patchified rows ``x`` [N, K] by ``weight`` [D, K] (a Conv3d kernel viewed 2-D), plus
    ``bias`` [D] and, with ``pos`` [L, D], the position rows ``pos_idx`` [N, taps] weighted by ``pos_weights``
    [N, taps] (one tap with weight 1 is a plain lookup). ``frames = T > 1``: still-image mode, ``x`` [N, C * T * q]
    holds T equal slabs per channel, ``weight`` [D, C * q] is the kernel summed over time and ``full_weight``
    [D, C * T * q] the kernel before that sum (rows with a non-finite value are computed against it, as the original
    computes them; it gets no gradient: ``weight``'s carries it). Returns [N, D] in the weight's dtype."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"rows_embed: x and weight must be 2-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    D, k_eff = weight.shape
    if frames:
        if frames < 2 or chunk < 1 or k_eff % chunk or x.shape[1] != frames * k_eff:
            raise ValueError(f"rows_embed: with frames={frames} and chunk={chunk}, x must be [N, {frames} * "
                             f"{k_eff}] and the time-summed weight's width {k_eff} a multiple of chunk, got x "
                             f"{tuple(x.shape)}")
        if (full_weight is None or full_weight.shape != (D, frames * k_eff) or full_weight.dtype != weight.dtype
                or full_weight.device != weight.device):
            raise ValueError(f"rows_embed: with frames={frames}, full_weight must be the kernel before its sum over "
                             f"time, [{D}, {frames * k_eff}] of weight's dtype and device, got "
                             f"{None if full_weight is None else (tuple(full_weight.shape), full_weight.dtype)}")
        full_weight = full_weight.detach()
    elif x.shape[1] != k_eff:
        raise ValueError(f"rows_embed: x must be [N, {k_eff}] to match weight {tuple(weight.shape)}, got "
                         f"{tuple(x.shape)}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"rows_embed: bias must be [{D}], got {tuple(bias.shape)}")
    if pos is not None:
        if pos.dim() != 2 or pos.shape[1] != D:
            raise ValueError(f"rows_embed: pos must be [L, {D}], got {tuple(pos.shape)}")
        if (pos_idx is None or pos_weights is None or pos_idx.dim() != 2 or pos_idx.shape[0] != x.shape[0]
                or pos_weights.shape != pos_idx.shape or pos_idx.dtype != torch.int64):
            raise ValueError(f"rows_embed: pos needs int64 pos_idx and pos_weights of one shape [{x.shape[0]}, taps]")
        if pos_idx.device != x.device or pos_weights.device != x.device:
            raise ValueError(f"rows_embed: pos_idx and pos_weights must be on {x.device}")
    bias, pos = _checks.dense(bias, pos)
    args = (x, weight, bias, pos, pos_idx, pos_weights, int(frames), int(chunk) if frames else 0,
            full_weight if frames else None)
    if torch.compiler.is_compiling() or _checks.is_meta(x):  # meta: shape tracing, answered by the fake
        op = compiled.op_for(OP_NAME, x, (("weight", weight), ("bias", bias), ("pos", pos))) \
            if torch.compiler.is_compiling() else torch.ops.fastvlm.rows_embed
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:4]):
        return _RowsEmbedFunction.apply(*args)
    return _forward(*args)
