"""Hypothesis strategies shared by the property tests: sizes, dtypes, values (normal, NaN/Inf, near-overflow) and
memory layouts (contiguous, transposed, sliced with NaN-poisoned margins, expanded, channels_last).

Values are drawn from a seeded torch generator (a hypothesis-drawn seed), so an example is cheap to generate and
shrinks to small seeds; special values go to hypothesis-drawn positions.
"""
import math

import torch
from hypothesis import strategies as st

# sizes: 0 and 1, primes, widths that are not multiples of 16, a few powers of two
SMALL = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 8, 11, 13, 16, 17]), st.integers(0, 24))
WIDTH = st.one_of(st.sampled_from([1, 3, 5, 7, 12, 13, 16, 17, 24, 31, 33]), st.integers(1, 40))
ROWS = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 13, 17]), st.integers(0, 24))

TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALUE_KINDS = ("normal", "normal", "normal", "specials", "large")


def dtypes(path, extra=()):
    return st.sampled_from((KERNEL_DTYPES if path == "triton" else TORCH_DTYPES) + tuple(extra))


def big(dtype):
    """A magnitude whose square overflows ``dtype`` (fp16) or comes near fp32's range, while a linear of it does not."""
    return 2.0 ** 9 if dtype == torch.float16 else 2.0 ** 55


@st.composite
def values(draw, shape, dtype, kinds=VALUE_KINDS, scale=1.0, offset=0.0, positive=False):
    """A contiguous tensor of ``shape`` in ``dtype``: normal values, plus NaN/+-Inf at drawn positions ("specials"), or
    with some rows scaled to near-overflow magnitudes ("large")."""
    kind = draw(st.sampled_from(kinds))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    if positive:
        t = t.abs() + 0.1
    n = t.numel()
    if kind == "large" and n:
        rows = t.reshape(-1, shape[-1]) if len(shape) else t.reshape(1, 1)
        pick = torch.rand(rows.shape[0], generator=g) < 0.5
        rows[pick] *= big(dtype) / (1 + abs(offset))
    t = t.to(dtype)
    if kind == "specials" and n:
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, n - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return t


def has_specials(*ts):
    return any(t is not None and t.is_floating_point() and not torch.isfinite(t).all() for t in ts)


LAYOUTS = ("contiguous", "transposed", "sliced", "strided_rows", "expanded", "channels_last")


@st.composite
def laid_out(draw, t, allowed=LAYOUTS):
    """``t``'s values in another memory layout (the values are unchanged except for "expanded", which repeats a
    slice of ``t`` along one dimension, as ``expand`` would). Margins of sliced layouts hold NaN poison."""
    options = [a for a in allowed if _fits(a, t)]
    kind = draw(st.sampled_from(options)) if options else "contiguous"
    if kind == "transposed":  # storage of the last two dims swapped
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":  # a window of a larger, poisoned buffer: offset start, padded rows
        pad = draw(st.integers(1, 5))
        buf = torch.full((*t.shape[:-1], t.shape[-1] + pad + 1), _poison(t), dtype=t.dtype)
        view = buf[..., 1:1 + t.shape[-1]]
        view.copy_(t)
        return view
    if kind == "strided_rows":  # every other row of a poisoned buffer
        buf = torch.full((2 * t.shape[0], *t.shape[1:]), _poison(t), dtype=t.dtype)
        view = buf[::2]
        view.copy_(t)
        return view
    if kind == "expanded":  # a stride-0 dimension
        dim = draw(st.integers(0, t.dim() - 1))
        return t.narrow(dim, 0, 1).expand(t.shape)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _poison(t):
    return math.nan if t.is_floating_point() else (True if t.dtype == torch.bool else 123)


def _fits(kind, t):
    if kind == "transposed":
        return t.dim() >= 2
    if kind in ("sliced",):
        return t.dim() >= 1 and t.shape[-1] > 0
    if kind == "strided_rows":
        return t.dim() >= 1
    if kind == "expanded":
        return t.dim() >= 1 and t.numel() > 0
    if kind == "channels_last":
        return t.dim() == 4
    return True


def weight(draw, shape, dtype, layouts=("contiguous", "transposed", "sliced"), scale=None, kinds=("normal",)):
    """A weight ``[out, in]`` scaled ~1/sqrt(in), in a drawn layout."""
    s = scale if scale is not None else 1.0 / math.sqrt(max(shape[-1], 1))
    return draw(laid_out(draw(values(shape, dtype, kinds=kinds, scale=s)), layouts))


def f64(obj):
    """Floating tensors (nested) as float64 copies; others unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: f64(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(f64(v) for v in obj)
    return obj
