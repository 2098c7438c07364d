"""Property tests of the embedding and perceiver ops against their eager compositions, on both paths:
``fastvlm.ops.patch_embed.patch_embed`` (conv2d + flatten + bias + positions + prefix tokens + pre-norm, float or
uint8 pixels), ``fastvlm.ops.rows_embed.rows_embed`` (Qwen-VL's Linear on patch rows + weighted position taps, still
frames) and ``fastvlm.ops.perceiver.norm_linear`` (RMSNorm -> Linear [gated pair] [+ residual])."""
import math

import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import budget, known
from fastvlm.ops.patch_embed import patch_embed
from fastvlm.ops.perceiver import norm_linear
from fastvlm.ops.rows_embed import rows_embed
from fastvlm.reference.activations import act_ref
from fastvlm.reference.projector import norm_ref
from prop_rule import check, check_grads
from prop_strategies import ROWS, WIDTH, dtypes, f64, has_specials, laid_out, values, weight

PIX_LAYOUTS = ("contiguous", "channels_last", "sliced", "strided_rows", "expanded", "transposed")


# --------------------------------------------------------------------------------------------------- patch_embed


def _pe_original(pixels, weight, bias=None, *, pos=None, pos_rows=None, cls=None, cls_pos=0, cls_first=True,
                 pixel_scale=None, pixel_shift=None, norm_weight=None, norm_bias=None, eps=1e-5, norm_rms=False,
                 image_hw=None, keep_rows=None):
    """The eager modules' composition: [processor normalisation] -> conv2d(stride = kernel) -> flatten -> + positions
    -> prefix tokens -> [LayerNorm / RMSNorm]."""
    p = weight.shape[-1]
    x = pixels
    if pixel_scale is not None:
        x = pixels.float() * pixel_scale[None, :, None, None] + pixel_shift[None, :, None, None]
        if image_hw is not None:
            H, W = pixels.shape[2:]
            ys = torch.arange(H)[None, :, None] < image_hw[:, 0, None, None]
            xs = torch.arange(W)[None, None, :] < image_hw[:, 1, None, None]
            x = x * (ys & xs)[:, None]
    y = F.conv2d(x.to(weight.dtype), weight, bias, stride=p)
    B, D, gh, gw = y.shape
    T = gh * gw
    y = y.flatten(2).transpose(1, 2)
    if pos is not None:
        y = y + pos[pos_rows].view(-1, T, D)
    if keep_rows is not None:
        kept = torch.zeros(B * T, dtype=torch.bool)
        kept[keep_rows] = True
        y = y.masked_fill(~kept.view(B, T, 1), 0)  # the op's contract: dropped patches are 0 before the norm
    if cls is not None:
        c = cls.reshape(-1, D)
        if pos is not None and cls_pos >= 0:
            c = c + pos[cls_pos:cls_pos + c.shape[0]]
        c = c.unsqueeze(0).expand(B, -1, -1)
        y = torch.cat([c, y] if cls_first else [y, c], dim=1)
    if norm_weight is not None:
        if norm_rms:
            y = F.rms_norm(y.float(), (D,), norm_weight.float(), eps).to(y.dtype)
        else:
            y = F.layer_norm(y, (D,), norm_weight, norm_bias, eps)
    return y


@st.composite
def patch_embed_case(draw, path, grads=False):
    dtype = draw(dtypes(path))
    p = draw(st.sampled_from([1, 2, 3, 4, 7]))
    B, C, D = draw(st.integers(0, 2)), draw(st.integers(1, 4)), draw(WIDTH)
    gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    T = gh * gw
    kw = {}
    if not grads and draw(st.integers(0, 3)) == 0:  # uint8 pixels + the processor's normalisation
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        pixels = torch.randint(0, 256, (B, C, gh * p, gw * p), generator=g, dtype=torch.uint8)
        kw["pixel_scale"] = (torch.rand(C, generator=g) + 0.5) / 255
        kw["pixel_shift"] = -torch.rand(C, generator=g) * 2
        if draw(st.booleans()):
            kw["image_hw"] = torch.stack([torch.randint(0, gh * p + 1, (B,), generator=g),
                                          torch.randint(0, gw * p + 1, (B,), generator=g)], 1)
    else:
        kinds = ("normal",) if grads else ("normal", "normal", "specials", "large")
        pixels = draw(values((B, C, gh * p, gw * p), dtype, kinds=kinds))
    pixels = draw(laid_out(pixels, PIX_LAYOUTS))
    w = draw(values((D, C, p, p), dtype, kinds=("normal",), scale=1 / math.sqrt(C * p * p)))
    b = draw(values((D,), dtype, kinds=("normal",))) if draw(st.booleans()) else None
    n_prefix = 0
    if draw(st.booleans()):
        cls = draw(values(draw(st.sampled_from([(D,), (1, D), (3, D)])), dtype, kinds=("normal",)))
        n_prefix = 1 if cls.dim() == 1 else cls.shape[0]
        kw.update(cls=cls, cls_first=draw(st.booleans()))
    if draw(st.booleans()):
        L = T + n_prefix + draw(st.integers(0, 3))
        kw["pos"] = draw(values((L, D), dtype, kinds=("normal",)))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        per_image = draw(st.booleans())
        kw["pos_rows"] = torch.randint(0, L, ((B if per_image else 1) * T,), generator=g)
        if n_prefix:
            kw["cls_pos"] = draw(st.sampled_from([-1, 0, L - n_prefix]))
    norm = draw(st.sampled_from(("none", "none", "layernorm", "rmsnorm")))
    if norm != "none":
        kw.update(norm_weight=draw(values((D,), dtype, kinds=("normal",), offset=1.0)),
                  eps=draw(st.sampled_from([1e-5, 1e-6])), norm_rms=norm == "rmsnorm")
        if norm == "layernorm" and draw(st.booleans()):
            kw["norm_bias"] = draw(values((D,), dtype, kinds=("normal",)))
    if draw(st.integers(0, 3)) == 0:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        kw["keep_rows"] = torch.randperm(B * T, generator=g)[:draw(st.integers(0, B * T))].sort().values
    return dict(args=(pixels, w, b), kw=kw, dtype=dtype, k=C * p * p + D, roundings=3 + (norm != "none"))


def test_patch_embed(path):
    @budget(path, torch=60, triton=8)
    @given(c=patch_embed_case(path))
    def run(c):
        check(patch_embed, _pe_original, c["args"], kwargs=c["kw"], original64=_pe_original, args64=f64(c["args"]),
              names=("pixels", "weight", "pos", "cls", "norm"), dtype=c["dtype"], k=c["k"], roundings=c["roundings"])

    run()


def test_patch_embed_gradients(path):
    @budget(path, torch=25, triton=3)
    @given(c=patch_embed_case(path, grads=True), seed=st.integers(0, 2 ** 31 - 1))
    def run(c, seed):
        pixels, w, b = c["args"]
        kw = c["kw"]
        assume("norm_weight" not in kw or w.shape[0] > 1)  # a norm over one element: gradients are rounding noise
        leaves = dict(pixels=pixels, w=w, **({"b": b} if b is not None else {}),
                      **{n: t for n, t in kw.items() if n in ("pos", "cls", "norm_weight", "norm_bias")})
        rest = {n: t for n, t in kw.items() if n not in leaves}

        def call(fn):
            return lambda d: fn(d["pixels"], d["w"], d.get("b"), **{n: d[n] for n in d if n in kw}, **rest)

        check_grads(call(patch_embed), call(_pe_original), leaves, dtype=c["dtype"], k=c["k"] + pixels.shape[0] * 16,
                    roundings=c["roundings"] + 2, gy_seed=seed)

    run()


# ---------------------------------------------------------------------------------------------------- rows_embed


def _rows_original(x, weight, bias=None, *, pos=None, pos_idx=None, pos_weights=None, frames=0, chunk=0,
                   full_weight=None):
    """Qwen-VL: Conv3d as a Linear on the patch rows (the full, not time-summed, kernel), + the position taps."""
    y = F.linear(x, full_weight if full_weight is not None else weight, bias)
    if pos is not None:
        y = y + (pos[pos_idx] * pos_weights.to(pos.dtype)[..., None]).sum(1)
    return y


@st.composite
def rows_embed_case(draw, path, grads=False):
    dtype = draw(dtypes(path))
    N, D = draw(ROWS), draw(WIDTH)
    kinds = ("normal",) if grads else ("normal", "normal", "specials", "large")
    kw, full = {}, None
    if draw(st.booleans()):  # still frames: T equal slabs per channel, the kernel summed over time
        C, T, q = draw(st.integers(1, 3)), draw(st.integers(2, 3)), draw(st.sampled_from([1, 4, 9]))
        if known("rows_embed_still_zero_rows"):
            assume(N > 0)
        frame = draw(values((N, C, 1, q), dtype, kinds=kinds))
        x = frame.expand(N, C, T, q).reshape(N, C * T * q)
        full = draw(values((D, C, T, q), dtype, kinds=("normal",), scale=1 / math.sqrt(C * T * q)))
        w = full.sum(2).reshape(D, C * q)
        full = full.reshape(D, -1)
        kw.update(frames=T, chunk=q, full_weight=full)
        K = C * T * q
    else:
        K = draw(WIDTH)
        x = draw(values((N, K), dtype, kinds=kinds))
        w = weight(draw, (D, K), dtype)
    x = draw(laid_out(x, ("contiguous", "transposed", "sliced", "strided_rows", "expanded")))
    b = draw(values((D,), dtype, kinds=("normal",))) if draw(st.booleans()) else None
    if draw(st.booleans()):
        L, taps = draw(st.integers(1, 9)), draw(st.sampled_from([1, 4, 16]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        kw.update(pos=draw(values((L, D), dtype, kinds=("normal",))),
                  pos_idx=torch.randint(0, L, (N, taps), generator=g), pos_weights=torch.rand(N, taps, generator=g))
    return dict(args=(x, w, b), kw=kw, full=full, dtype=dtype, k=K + 16)


def test_rows_embed(path):
    @budget(path, torch=60, triton=8)
    @given(c=rows_embed_case(path))
    def run(c):
        check(rows_embed, _rows_original, c["args"], kwargs=c["kw"], original64=_rows_original, args64=f64(c["args"]),
              names=("x", "weight", "bias", "pos"), dtype=c["dtype"], k=c["k"], roundings=3 + bool(c["kw"].get(
                  "frames")))

    run()


def test_rows_embed_gradients(path):
    @budget(path, torch=25, triton=3)
    @given(c=rows_embed_case(path, grads=True), seed=st.integers(0, 2 ** 31 - 1))
    def run(c, seed):
        assume(not c["kw"].get("frames"))  # still mode's gradient is the time-summed kernel's, checked in its tests
        x, w, b = c["args"]
        kw = c["kw"]
        leaves = dict(x=x, w=w, **({"b": b} if b is not None else {}), **({"pos": kw["pos"]} if "pos" in kw else {}))
        rest = {n: t for n, t in kw.items() if n != "pos"}

        def call(fn):
            return lambda d: fn(d["x"], d["w"], d.get("b"), pos=d.get("pos"), **rest)

        check_grads(call(rows_embed), call(_rows_original), leaves, dtype=c["dtype"], k=c["k"] + x.shape[0],
                    roundings=4, gy_seed=seed)

    run()


# --------------------------------------------------------------------------------------------------- norm_linear


def _nl_original(x, w, *, w_up=None, norm_weight=None, residual=None, eps=1e-6, act="none", rstd=None):
    """Idefics2's perceiver pieces: [residual +] Linear(RMSNorm(x)) or act(gate_proj) * up_proj (no biases)."""
    a = x if norm_weight is None else norm_ref(x.reshape(-1, x.shape[-1]), "rmsnorm", norm_weight, None,
                                                x.shape[-1], eps).reshape(x.shape)
    y = F.linear(a, w) if w_up is None else act_ref(F.linear(a, w), act) * F.linear(a, w_up)
    return y if residual is None else residual + y


@st.composite
def norm_linear_case(draw, path, grads=False):
    dtype = draw(dtypes(path))
    lead = draw(st.sampled_from([(), (2,), (2, 3)]))
    M, K, N = draw(ROWS), draw(WIDTH), draw(WIDTH)
    kinds = ("normal",) if grads else ("normal", "normal", "specials", "large")
    x = draw(laid_out(draw(values((*lead, M, K), dtype, kinds=kinds)), ("contiguous", "transposed", "sliced",
                                                                       "strided_rows", "expanded")))
    kw = {}
    if draw(st.booleans()):
        kw["w_up"] = weight(draw, (N, K), dtype)
        kw["act"] = draw(st.sampled_from(("none", "silu", "gelu")))
    if draw(st.booleans()):
        kw["norm_weight"] = draw(values((K,), dtype, kinds=("normal",), offset=1.0))
        kw["eps"] = draw(st.sampled_from([1e-6, 1e-5]))
    if draw(st.booleans()):
        kw["residual"] = draw(laid_out(draw(values((*lead, M, N), dtype, kinds=kinds))))
    return dict(args=(x, weight(draw, (N, K), dtype)), kw=kw, dtype=dtype, k=K)


def test_norm_linear(path):
    @budget(path, torch=60, triton=8)
    @given(c=norm_linear_case(path))
    def run(c):
        check(norm_linear, _nl_original, c["args"], kwargs=c["kw"], original64=_nl_original, args64=f64(c["args"]),
              names=("x", "weight", "norm", "residual"), dtype=c["dtype"], k=c["k"], roundings=4)

    run()


def test_norm_linear_gradients(path):
    @budget(path, torch=25, triton=3)
    @given(c=norm_linear_case(path, grads=True), seed=st.integers(0, 2 ** 31 - 1))
    def run(c, seed):
        x, w = c["args"]
        kw = c["kw"]
        assume("norm_weight" not in kw or x.shape[-1] > 1)  # an RMSNorm over one element is sign(x): noise gradients
        leaves = dict(x=x, w=w, **{n: t for n, t in kw.items() if isinstance(t, torch.Tensor)})
        rest = {n: t for n, t in kw.items() if n not in leaves}

        def call(fn):
            return lambda d: fn(d["x"], d["w"], **{n: d[n] for n in d if n in kw}, **rest)

        check_grads(call(norm_linear), call(_nl_original), leaves, dtype=c["dtype"],
                    k=c["k"] + x.numel() // max(x.shape[-1], 1), roundings=5, gy_seed=seed)

    run()
