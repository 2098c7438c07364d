"""Argument checks shared by the public ops, run before the backend is chosen so both paths behave the same.

Cheap by design: shapes, dtypes and devices only, except for index tables, whose values decide what memory a kernel
reads. Index tables (``rows`` of ``mlp_projector`` / ``pool_tokens``, position rows, kept-patch rows) are checked

* not at all when the table came from ``fastvlm.ops.layout`` (``trust_table``: its extent is known when it is built,
  so only ``extent <= rows of x`` is compared, and an in-place edit of the table, which bumps its version counter,
  withdraws the trust);
* on the host when the table is on the CPU (a min/max reduction; no device is involved): an ``IndexError`` naming
  the table, the same text on the PyTorch path and in the Triton interpreter;
* on the device otherwise: ``torch._assert_async`` (a device-side assert, as an embedding lookup makes), never a
  host synchronisation.

A table checked once (a module's ``position_ids`` buffer) is marked with what the check found, its version counter
and its data pointer: the next call with the same, unedited table compares the mark with the rows of x and checks
nothing again (an in-place edit bumps the version; ``.data = ...`` and ``.to()`` move the memory).

Meta tensors (shape tracing) skip the value checks: there are no values.
"""
from __future__ import annotations

import math

import torch

from fastvlm import _hot

_TRUST = "_fastvlm_extent"  # attribute of a trusted table: (extent, version counter when trusted)


def trust_table(table, extent):
    """Mark ``table`` (built by fastvlm.ops.layout) as holding indices in [0, ``extent``); returns it. The mark is an
    attribute of the tensor object: it dies with it, and copies (``contiguous()``, ``clone()``) are not trusted."""
    if not torch.compiler.is_compiling():
        setattr(table, _TRUST, (int(extent), table._version))
    return table


def trusted_extent(table):
    """The extent of a trusted, unedited table, else None."""
    mark = getattr(table, _TRUST, None)
    return mark[0] if mark is not None and mark[1] == table._version else None


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)  # one C call when autocast is off


def autocast_on(device) -> bool:
    """``torch.is_autocast_enabled`` for ``device``'s type; False for device types without autocast (meta)."""
    if not _any_autocast():
        return False
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def autocast_reasons(device):
    """A fallback reason while autocast is on: the PyTorch path's ops apply autocast's casts, the kernels do not."""
    if autocast_on(device):
        return [f"autocast is enabled on {device.type} (the PyTorch path applies its casts; the kernels do not)"]
    return []


def as_rows(x):
    """``x`` [..., K] as 2-D rows [prod(...), K]; unlike ``reshape(-1, K)`` also when K == 0 (F.linear takes it)."""
    k = x.shape[-1]
    if x.dim() == 2:
        return x
    return x.reshape(-1, k) if k else x.reshape(math.prod(x.shape[:-1]), 0)


def dense(*tensors):
    """The tensors (None passes through) made contiguous where they are not. The kernels read biases, norm weights
    and position tables as dense rows; the PyTorch path takes any strides, so both paths must see the same values
    (a strided bias was read as a dense one, an expanded one past its storage). A no-op for module parameters."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def is_meta(t) -> bool:
    """True for a meta tensor: shape tracing, answered by the op's fake implementation (no backend runs)."""
    return t is not None and t.device.type == "meta"


RANGE_ERROR = "{op}: {name} holds indices {lo}..{hi}, outside the {n} rows of x"


def check_indices(op, name, idx, n, error=RANGE_ERROR):
    """Every entry of the integer tensor ``idx`` lies in [0, n) (see the module docstring for how). ``error``: the
    IndexError's text, formatted with op, name, lo, hi (the smallest and largest index) and n."""
    if idx.numel() == 0 or idx.device.type == "meta":
        return
    extent = trusted_extent(idx)
    if extent is not None:
        if extent > n:  # a layout table's indices are exactly 0 .. extent - 1
            raise IndexError(error.format(op=op, name=name, lo=0, hi=extent - 1, n=n))
        return
    compiling = torch.compiler.is_compiling() or _hot.traced()  # (traced calls check every time, mark nothing)
    mark = None if compiling else getattr(idx, _CHECKED, None)  # checked before, unedited since
    if mark is not None and mark[2] == idx._version and mark[3] == idx.data_ptr():
        lo, hi = mark[0], mark[1]
        if lo is None:  # asserted on the device against ``hi`` rows: holds for as many rows or more
            if n >= hi:
                return
        elif lo >= 0 and hi < n:
            return
    if idx.device.type == "cpu" and not _hot.traced():  # (traced by torch.compile: no value read, the device check)
        lo, hi = torch.aminmax(idx)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n:
            raise IndexError(error.format(op=op, name=name, lo=lo, hi=hi, n=n))
    else:
        torch._assert_async(((idx >= 0) & (idx < n)).all(), f"{op}: {name} holds indices outside [0, {n})")
        lo, hi = None, n  # (a failing assert stops the device's work: a later call never reads past it)
    if not compiling:
        setattr(idx, _CHECKED, (lo, hi, idx._version, idx.data_ptr()))


_CHECKED = "_fastvlm_checked"  # attribute of a table whose values were checked: (lo, hi, version, data pointer)


def index_tensor(op, name, idx, device, dims=None):
    """Check that ``idx`` is an int32/int64 tensor on ``device`` (with ``dims`` dimensions when given): the dtypes
    both paths index with. Returns it contiguous (the kernels read it row-major)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) or (
            dims is not None and idx.dim() != dims):
        got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"{op}: {name} must be an int64 (or int32) {dims or ''}{'-D ' if dims else ''}tensor of "
                         f"indices, got {got}")
    if idx.device != device:
        raise ValueError(f"{op}: {name} is on {idx.device} but the input on {device}")
    return idx if idx.is_contiguous() else idx.contiguous()


def row_table(op, rows, x, name="rows"):
    """Check a [M, Q] int64 table of row indices into ``x`` [T, D] (dtype, shape, device); returns it contiguous
    (the kernels read it row-major; the PyTorch path takes any layout, so both accept any). The values are checked
    by ``check_indices`` in the op's forward, which also runs under torch.compile (real tensors there)."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.dtype != torch.int64:
        got = f"{tuple(rows.shape)} {rows.dtype}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"{op}: {name} must be an int64 [M, Q] table of row indices into x, got {got}")
    if rows.shape[1] == 0:
        raise ValueError(f"{op}: {name} must list at least one source row per output row, got {tuple(rows.shape)}")
    if rows.device != x.device:
        raise ValueError(f"{op}: {name} is on {rows.device} but x on {x.device}")
    return rows if rows.is_contiguous() else rows.contiguous()
