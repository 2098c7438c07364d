"""Row tables that describe merged or pooled token layouts to the GEMM's A loads (kernels/gemm.py ``_load_a_tile``).

A table ``rows`` [M, Q] (int64) lists, for each output row, the Q source rows of the flattened vision tokens
[images * tokens, D] it is built from, in the order the original module concatenates them. One table covers square
and non-square grids, several images in a batch, and ragged images of different sizes (Mistral 3), with no data
movement: only M * Q indices (a few KB) are written.

    space_to_depth_rows(b, h, w, s)   pixel shuffle / unfold window order (di, dj), windows row-major
    pool_rows(b, h, w, k)             k x k pooling windows, row-major (Avg/MaxPool2d with stride == kernel)
"""
from __future__ import annotations


import torch

from fastvlm.ops._checks import trust_table
from fastvlm._cache import shared_cache


def _window_rows(batch, grid_h, grid_w, s, device):
    hb, wb = grid_h // s, grid_w // s
    img = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1) * (grid_h * grid_w)
    bh = torch.arange(hb, device=device).view(1, hb, 1, 1, 1) * (s * grid_w)
    bw = torch.arange(wb, device=device).view(1, 1, wb, 1, 1) * s
    di = torch.arange(s, device=device).view(1, 1, 1, s, 1) * grid_w
    dj = torch.arange(s, device=device).view(1, 1, 1, 1, s)
    return (img + bh + bw + di + dj).reshape(batch * hb * wb, s * s)


@shared_cache(64)  # device tables: safe across threads and CUDA streams
def _cached(batch, grid_h, grid_w, s, device):
    # trusted by the ops (no range check per call): its indices are exactly 0 .. batch * grid_h * grid_w - 1
    return trust_table(_window_rows(batch, grid_h, grid_w, s, torch.device(device)), batch * grid_h * grid_w)


def space_to_depth_rows(batch, grid_h, grid_w, scale, device="cpu"):
    """[batch * (grid_h/scale) * (grid_w/scale), scale**2] source rows of each merged token, patch-major order."""
    if grid_h % scale or grid_w % scale:
        raise ValueError(f"a {grid_h}x{grid_w} token grid cannot be merged in {scale}x{scale} windows")
    if torch.compiler.is_compiling():
        return _window_rows(batch, grid_h, grid_w, scale, torch.device(device))
    return _cached(batch, grid_h, grid_w, scale, str(device))


pool_rows = space_to_depth_rows  # a k x k pooling window lists the same rows as a k x k merge window


def ragged_space_to_depth_rows(sizes, scale, device="cpu"):
    """Rows for images of different token grids ``sizes`` [(h, w), ...] concatenated in one sequence (Mistral 3)."""
    tables, offset = [], 0
    for h, w in sizes:
        tables.append(space_to_depth_rows(1, h, w, scale, device) + offset)
        offset += h * w
    if not tables:
        return torch.empty(0, scale * scale, dtype=torch.int64, device=device)
    return trust_table(torch.cat(tables), offset)


def gather_ref(x, rows, mode):
    """The logical A that ``_load_a_tile`` reads, materialised with torch ops (the PyTorch path and tests)."""
    if mode == "strided":
        return x
    g = x[rows]  # [M, Q, D]
    M, Q, D = g.shape
    if mode == "concat":
        return g.reshape(M, Q * D)  # explicit widths: a -1 is ambiguous when M == 0
    if mode == "concat_cm":
        return g.transpose(1, 2).reshape(M, Q * D)
    if mode == "mean":
        return g.to(torch.promote_types(x.dtype, torch.float32)).mean(1).to(x.dtype)
    if mode == "max":
        return g.amax(1)
    raise ValueError(f"unknown a_mode {mode!r}")


def scatter_back(grad_a, rows, mode, num_rows, x=None):
    """Adjoint of ``gather_ref``: the gradient of the source rows [num_rows, D] from the gradient of A.
    "max" needs ``x``: each window's gradient goes to its first maximal element, as max_pool2d's backward does."""
    if mode == "strided":
        return grad_a
    M, Q = rows.shape
    if mode == "max":
        first = x[rows].argmax(1)  # [M, D]: the first maximal q per column (torch.argmax returns the first)
        src = rows.gather(1, first)  # [M, D] source row of each maximum
        out = torch.zeros(num_rows, grad_a.shape[1], dtype=grad_a.dtype, device=grad_a.device)
        return out.scatter_add_(0, src, grad_a)
    D = grad_a.shape[1] // Q if mode in ("concat", "concat_cm") else grad_a.shape[1]
    if mode == "concat":
        g = grad_a.reshape(M * Q, D)
    elif mode == "concat_cm":
        g = grad_a.reshape(M, D, Q).transpose(1, 2).reshape(M * Q, D)
    else:  # mean
        g = (grad_a / Q)[:, None, :].expand(M, Q, D).reshape(M * Q, D)
    out = torch.zeros(num_rows, D, dtype=grad_a.dtype, device=grad_a.device)
    return out.index_add_(0, rows.reshape(-1), g)
