"""``fastvlm::feature_map_projector``: a CNN feature map [B, C, H, W] -> tokens -> Linear [-> act -> Linear -> act2].

Convolutional and hybrid vision encoders (timm ConvNeXt, FastViT / FastViTHD in transformers' ``fast_vlm``) end in
a feature map, not a token sequence. The usual glue is ``x.flatten(2).transpose(1, 2)`` (tokens = H * W, features =
C), often after a k x k average pool, then the connector's MLP. Eagerly that is a transpose copy (the Linear needs
unit-stride rows) and, with pooling, a pooled map written and read back. Here the first GEMM reads the map in place
(kernels/gemm.py ``_load_a_tile``):

    pool (1, 1)    a_mode "strided" on the view [B*H*W, C] when the token rows are affine (channels-last maps,
                   one NCHW image: A = X[0].view(C, T).T with unit row stride), else
                   a_mode "separable":       A[m, c] = X.flat[rows[m] + cols[c]]
                   rows[m] = b*sN + h*sH + w*sW,  cols[c] = c*sC        (any strides: a batch of NCHW maps, views)
    pool (kh, kw)  a_mode "separable_mean":  A[m, c] = mean_q X.flat[rows[m, q] + cols[c]]
                   rows[m, q] = offset of window element q of output token m: AvgPool2d(kernel = stride = (kh, kw)),
                   floor mode (a ragged right/bottom edge is dropped, as PyTorch does); the pooled value is rounded
                   to the map's dtype before the GEMM, where avg_pool2d rounds it too

then bias + activation in the epilogue and, with ``w2``, a second fused GEMM (bias + act2). Tables are int64 element
offsets cached per (shape, strides, window); no copy of the map is made.

Backward (PyTorch ops): saves the map (held by the caller anyway), h (the first pre-activation) and z (only with
act2); recomputes the pooled tokens; the map's gradient is the adjoint of the pool / flatten, written in the map's
shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fastvlm import _dispatch, choice
from fastvlm.ops import _checks, _fast, compiled
from fastvlm._cache import shared_cache
from fastvlm.reference.activations import ACTIVATIONS, act_grad_ref, act_ref

OP_NAME = "fastvlm::feature_map_projector"


@dataclass(frozen=True)
class Spec:
    act: str
    act2: str
    pool_h: int
    pool_w: int

    @property
    def pooled(self):
        return self.pool_h * self.pool_w > 1


def out_grid(h, w, pool_h, pool_w):
    """Token grid after AvgPool2d(kernel = stride = (pool_h, pool_w)) in floor mode."""
    return h // pool_h, w // pool_w


# ------------------------------------------------------------------------------------------------ offset tables


def _tables_impl(shape, strides, pool_h, pool_w, device):
    (B, C, H, W), (sn, sc, sh, sw) = shape, strides
    ho, wo = out_grid(H, W, pool_h, pool_w)
    dev = torch.device(device)
    b = torch.arange(B, device=dev).view(B, 1, 1) * sn
    y = torch.arange(ho, device=dev).view(1, ho, 1) * (pool_h * sh)
    x = torch.arange(wo, device=dev).view(1, 1, wo) * (pool_w * sw)
    corner = (b + y + x).reshape(-1)  # [B * ho * wo], tokens row-major per image
    cols = torch.arange(C, device=dev) * sc
    if pool_h * pool_w == 1:
        return corner, cols
    win = (torch.arange(pool_h, device=dev).view(pool_h, 1) * sh
           + torch.arange(pool_w, device=dev).view(1, pool_w) * sw).reshape(-1)
    return (corner[:, None] + win[None, :]).contiguous(), cols


@shared_cache(64)  # device tables: safe across threads and CUDA streams
def _tables_cached(shape, strides, pool_h, pool_w, device):
    return _tables_impl(shape, strides, pool_h, pool_w, device)


def offset_tables(x, pool_h=1, pool_w=1):
    """(rows, cols) int64 element offsets for reading ``x`` [B, C, H, W] (any strides) as tokens [B*T, C]:
    rows [B*T] (no pooling) or [B*T, pool_h*pool_w] (window elements), cols [C]. Cached per shape and strides."""
    key = (tuple(x.shape), tuple(x.stride()), int(pool_h), int(pool_w), str(x.device))
    if torch.compiler.is_compiling():
        return _tables_impl(*key)
    return _tables_cached(*key)


# ------------------------------------------------------------------------------------------------ reference pieces


def map_tokens_ref(x, pool_h=1, pool_w=1):
    """The logical A [B*T, C]: (avg_pool2d then) flatten(2).transpose(1, 2), as the eager glue computes it."""
    if pool_h * pool_w > 1:
        x = F.avg_pool2d(x, (pool_h, pool_w))
    B, C = x.shape[:2]
    return x.flatten(2).transpose(1, 2).reshape(B * x.shape[2] * x.shape[3], C)  # no -1: C may be 0


def map_tokens_adjoint(g, shape, pool_h=1, pool_w=1):
    """Gradient of the map [B, C, H, W] from the gradient of ``map_tokens_ref``'s output [B*T, C]."""
    B, C, H, W = shape
    ho, wo = out_grid(H, W, pool_h, pool_w)
    gm = g.reshape(B, ho, wo, C).permute(0, 3, 1, 2)
    if pool_h * pool_w == 1:
        return gm.contiguous()
    gm = (gm / (pool_h * pool_w)).repeat_interleave(pool_h, 2).repeat_interleave(pool_w, 3)
    return F.pad(gm, (0, W - wo * pool_w, 0, H - ho * pool_h))  # the dropped ragged edge gets zero gradient


# ------------------------------------------------------------------------------------------------ forward


def _validate(x, w1, b1, w2, b2, s: Spec):
    if x.dim() != 4:
        raise ValueError(f"feature_map_projector: x must be a [batch, channels, height, width] map, got "
                         f"{tuple(x.shape)}")
    B, C, H, W = x.shape
    if s.pool_h < 1 or s.pool_w < 1 or (s.pooled and (s.pool_h > H or s.pool_w > W)):  # avg_pool2d's limit
        raise ValueError(f"feature_map_projector: pool window {s.pool_h}x{s.pool_w} does not fit a {H}x{W} map")
    if w1.dim() != 2 or w1.shape[1] != C:
        raise ValueError(f"feature_map_projector: linear_1.weight must be [out, {C}] for a map of {C} channels, "
                         f"got {tuple(w1.shape)}")
    if b1 is not None and b1.shape != (w1.shape[0],):
        raise ValueError(f"feature_map_projector: linear_1.bias must be [{w1.shape[0]}], got {tuple(b1.shape)}")
    if w2 is not None:
        if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
            raise ValueError(f"feature_map_projector: linear_2.weight must be [out, {w1.shape[0]}], got "
                             f"{tuple(w2.shape)}")
        if b2 is not None and b2.shape != (w2.shape[0],):
            raise ValueError(f"feature_map_projector: linear_2.bias must be [{w2.shape[0]}], got {tuple(b2.shape)}")
    elif b2 is not None or s.act2 != "none":
        raise ValueError("feature_map_projector: linear_2.bias / act2 given without linear_2.weight")
    for name, a in (("act", s.act), ("act2", s.act2)):
        if a not in ACTIVATIONS:
            raise ValueError(f"feature_map_projector: {name} must be one of {ACTIVATIONS}, got {a!r}")


def _kernel_reasons(x, named):
    """Why the Triton kernels cannot run these inputs (empty list when they can)."""
    return _dispatch.dtype_device_reasons(x, named, what="the map") + _checks.autocast_reasons(x.device)


def _saves_h(w2, s: Spec):
    return w2 is not None or s.act != "none"


def token_matrix_view(x):
    """``x`` [B, C, H, W] as a strided 2-D view [B*H*W, C] (token-major rows) when one (row stride, column stride)
    pair describes every token, else None. True for any channels-last map (rows of unit-stride channels) and for a
    single NCHW image (A = X[0].view(C, T).T, unit row stride); not for a batch of NCHW images."""
    B, C, H, W = x.shape
    sn, sc, sh, sw = x.stride()
    if W > 1:
        st = sw
        if H > 1 and sh != W * sw:
            return None
    elif H > 1:
        st = sh
    else:
        st = sn if B > 1 else 1
    if B > 1 and sn != H * W * st:
        return None
    return x.as_strided((B * H * W, C), (st, sc), x.storage_offset())


def _forward_triton(x, w1, b1, w2, b2, s: Spec, save, memo=None):
    """``memo`` (a dict): receives the launchers' checked calls of the plain token-view path (fastvlm.ops._fast)."""
    from fastvlm.kernels.gemm import fused_linear

    view = None if s.pooled else token_matrix_view(x)
    m1 = m2 = None
    if memo is not None and view is not None and not save:
        m1, m2 = memo[(1, False)], memo[(2, False)] = [None], [None]
    if view is not None:  # affine token rows: the plain strided A load (the compiler sees the strides)
        first = fused_linear(view, w1, b1, act=s.act, store_pre=save and _saves_h(w2, s), memo=m1)
    else:  # a batch of NCHW images, or pooling: gathered loads through int64 offset tables
        rows, cols = offset_tables(x, s.pool_h, s.pool_w)
        first = fused_linear(x, w1, b1, act=s.act, a_mode="separable_mean" if s.pooled else "separable",
                             a_rows=rows, a_cols=cols, store_pre=save and _saves_h(w2, s))
    a, h = first if isinstance(first, tuple) else (first, None)
    y, z = a, None
    if w2 is not None:
        second = fused_linear(a, w2, b2, act=s.act2, store_pre=save and s.act2 != "none", memo=m2)
        y, z = second if isinstance(second, tuple) else (second, None)
    return y, h, z


def _forward_torch(x, w1, b1, w2, b2, s: Spec, save):
    h = F.linear(map_tokens_ref(x, s.pool_h, s.pool_w), w1, b1)
    y = act_ref(h, s.act)
    z = None
    if w2 is not None:
        z = F.linear(y, w2, b2)
        y = act_ref(z, s.act2)
    return y, (h if save and _saves_h(w2, s) else None), (z if save and s.act2 != "none" else None)


def _forward(x, w1, b1, w2, b2, s: Spec, save, memo_out=None):
    """(y [B*T, N], h, z); h/z are None unless saved for backward. ``memo_out`` (a dict): receives the launchers'
    memo of a plain token-view call that ran the kernels, and the state token it ran under (fastvlm.ops._fast)."""
    tok = _fast.token() if memo_out is not None else None
    B, C, H, W = x.shape
    out_w = (w2 if w2 is not None else w1).shape[0]
    detail = f"map{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if s.pooled:
        detail += f" avgpool {s.pool_h}x{s.pool_w}"
    detail += f" -> {out_w}"
    named = (("linear_1.weight", w1), ("linear_1.bias", b1), ("linear_2.weight", w2), ("linear_2.bias", b2))
    kernel, eager = (lambda impl=impl: impl(x, w1, b1, w2, b2, s, save) for impl in (_forward_triton, _forward_torch))
    fast_key = lambda: (x.shape, x.dtype, x.device, w1.shape, None if w2 is None else w2.shape, s, save)  # noqa: E731
    per_shape = choice.per_shape(OP_NAME, x.device, fast_key, lambda: f"{detail} {s} save={save}", kernel, eager)
    backend = _dispatch.choose_backend(OP_NAME, x.device, _kernel_reasons(x, named), detail, per_shape)
    if backend != "triton":
        return eager()
    if memo_out is None or tok is None:
        return kernel()
    memo = {}
    out = _forward_triton(x, w1, b1, w2, b2, s, save, memo)
    if memo.get((1, False), [None])[0] is not None:
        _fast.launched(memo, tok)
        memo_out.update(memo=memo, token=tok)
    return out


# ------------------------------------------------------------------------------------------------ backward


def _acc(t):
    return torch.promote_types(t.dtype, torch.float32)


def _backward(s: Spec, saved, gy, needs):
    x, w1, w2, h, z = saved
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    gx = gw1 = gb1 = gw2 = gb2 = None
    gy = gy.reshape(-1, gy.shape[-1])
    if w2 is not None:
        gz = act_grad_ref(z, gy, s.act2) if s.act2 != "none" else gy
        if need_w2:
            gw2 = (gz.t() @ act_ref(h, s.act)).to(w2.dtype)
        if need_b2:
            gb2 = gz.to(_acc(gz)).sum(0).to(w2.dtype)
        ga = gz @ w2
    else:
        ga = gy
    gh = act_grad_ref(h, ga, s.act) if s.act != "none" else ga
    if need_b1:
        gb1 = gh.to(_acc(gh)).sum(0).to(w1.dtype)
    if need_w1:
        gw1 = (gh.t() @ map_tokens_ref(x, s.pool_h, s.pool_w).to(gh.dtype)).to(w1.dtype)
    if need_x:
        gx = map_tokens_adjoint(gh @ w1, x.shape, s.pool_h, s.pool_w).to(x.dtype)
    return gx, gw1, gb1, gw2, gb2


# ------------------------------------------------------------------------------------------------ registration


def _spec(act, act2, pool_h, pool_w):
    return Spec(act, act2, int(pool_h), int(pool_w))


def _out_shape(x, w1, w2, s: Spec):
    B, C, H, W = x.shape
    ho, wo = out_grid(H, W, s.pool_h, s.pool_w)
    return B, ho * wo, (w2 if w2 is not None else w1).shape[0]


@torch.library.custom_op(OP_NAME, mutates_args=())
def feature_map_projector_op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                             w2: Optional[torch.Tensor], b2: Optional[torch.Tensor], act: str, act2: str, pool_h: int,
                             pool_w: int, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [B, T, N], h, z); h and z are what backward needs (empty unless ``save``)."""
    s = _spec(act, act2, pool_h, pool_w)
    y, h, z = _forward(x, w1, b1, w2, b2, s, save)
    e = lambda: x.new_empty((0,), dtype=w1.dtype)  # noqa: E731  (two outputs must never be one tensor)
    return y.reshape(_out_shape(x, w1, w2, s)), (h if h is not None else e()), (z if z is not None else e())


@feature_map_projector_op.register_fake
def _(x, w1, b1, w2, b2, act, act2, pool_h, pool_w, save):
    s = _spec(act, act2, pool_h, pool_w)
    B, T, N = _out_shape(x, w1, w2, s)
    y = x.new_empty((B, T, N), dtype=w1.dtype)
    h = x.new_empty((B * T, w1.shape[0]) if save and _saves_h(w2, s) else (0,), dtype=w1.dtype)
    z = x.new_empty((B * T, N) if save and w2 is not None and act2 != "none" else (0,), dtype=w1.dtype)
    return y, h, z


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, act, act2, pool_h, pool_w, save = inputs
    _, h, z = output
    ctx.spec = _spec(act, act2, pool_h, pool_w)
    ctx.save_for_backward(x, w1, w2, h, z)
    ctx.mark_non_differentiable(h, z)


def _op_backward(ctx, gy, _gh, _gz):
    gx, gw1, gb1, gw2, gb2 = _backward(ctx.spec, ctx.saved_tensors, gy, ctx.needs_input_grad[:5])
    return gx, gw1, gb1, gw2, gb2, None, None, None, None, None


feature_map_projector_op.register_autograd(_op_backward, setup_context=_setup_context)
compiled.register(feature_map_projector_op)  # its triton_op twin (fastvlm.ops.compiled)


class _FeatureMapFunction(torch.autograd.Function):
    """The custom op's forward/backward without the dispatcher's per-call cost (eager mode)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, s):
        y, h, z = _forward(x, w1, b1, w2, b2, s, True)
        ctx.spec = s
        ctx.save_for_backward(x, w1, w2, h, z)
        return y.reshape(_out_shape(x, w1, w2, s))

    @staticmethod
    def backward(ctx, gy):
        return (*_backward(ctx.spec, ctx.saved_tensors, gy, ctx.needs_input_grad[:5]), None)


# ------------------------------------------------------------------------------------------------ functional


def _pair(p):
    if isinstance(p, int):
        return p, p
    ph, pw = p
    return int(ph), int(pw)


def feature_map_projector(x, w1, b1=None, w2=None, b2=None, *, act="none", act2="none", pool=1, _memo_out=None):
    """``act2(linear_2(act(linear_1(tokens))))`` with ``tokens = avg_pool2d(x, pool).flatten(2).transpose(1, 2)``.

    ``x`` [B, C, H, W], any strides (NCHW, channels-last, a permuted view); ``pool``: int or (kh, kw), the
    AvgPool2d kernel (= stride, floor mode), 1 for a plain flatten. ``w2=None``: a single (optionally activated)
    Linear. Returns [B, T, out] with T = (H // kh) * (W // kw), in the weights' dtype. On CUDA the map is read in
    place by the fused GEMM (no transpose copy, no pooled copy); elsewhere the PyTorch path runs (and says why).
    ``_memo_out`` (internal): see ``_forward``.
    """
    ph, pw = _pair(pool)
    s = _spec(act, act2, ph, pw)
    _validate(x, w1, b1, w2, b2, s)
    b1, b2 = _checks.dense(b1, b2)
    tensors = (x, w1, b1, w2, b2)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if torch.compiler.is_compiling() or _checks.is_meta(x):  # meta: shape tracing, answered by the fake
        op = compiled.op_for(OP_NAME, x, (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))) \
            if torch.compiler.is_compiling() else torch.ops.fastvlm.feature_map_projector
        return op(*tensors, s.act, s.act2, s.pool_h, s.pool_w, needs_grad)[0]
    if needs_grad:
        return _FeatureMapFunction.apply(*tensors, s)
    y = _forward(*tensors, s, False, _memo_out)[0]
    return y.reshape(_out_shape(x, w1, w2, s))


def tokens_as_map(x):
    """A [B, T, C] token view (any strides) as the [B, C, T, 1] map the op reads: free, no copy. Lets a projector
    fed by ``map.flatten(2).transpose(1, 2)`` (transformers' fast_vlm) read the original map's memory in place."""
    return x.transpose(1, 2).unsqueeze(-1)
