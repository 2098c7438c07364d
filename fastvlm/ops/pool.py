"""``fastvlm::pool_tokens``: average or max pooling of vision tokens over windows of a row table, with autograd.

The PyTorch path gathers the windows and reduces them; the Triton path (kernels/pool.py) reads the tokens in place.
Max-pooling gradients go to the first maximum of each window, as PyTorch's MaxPool2d does.
"""
from __future__ import annotations

import torch

from fastvlm import _dispatch
from fastvlm.ops import _checks, compiled

OP_NAME = "fastvlm::pool_tokens"


def _forward(x, rows, mode):
    _checks.check_indices("pool_tokens", "rows", rows, x.shape[0])  # here: torch.compile's calls check them too
    reasons = []
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"x dtype {x.dtype} is not one of float16/bfloat16/float32")
    detail = f"x{tuple(x.shape)} {mode} of {rows.shape[1]}"
    if _dispatch.choose_backend(OP_NAME, x.device, reasons, detail) == "triton":
        from fastvlm.kernels.pool import pool_rows

        if rows.shape[0] == 0 or x.shape[1] == 0:  # nothing to read or write: no launch
            return x.new_empty((rows.shape[0], x.shape[1]))
        return pool_rows(x if x.stride(1) == 1 else x.contiguous(), rows, mode)
    g = x[rows]
    if mode == "mean":
        return g.to(torch.promote_types(x.dtype, torch.float32)).mean(1).to(x.dtype)
    return g.amax(1)


def _backward(x, rows, mode, g):
    M, Q = rows.shape
    if mode == "mean":
        src = (g / Q)[:, None, :].expand(M, Q, g.shape[1])
    else:
        first = x[rows].argmax(1, keepdim=True)  # [M, 1, D]: the window position of the first maximum
        src = torch.zeros(M, Q, g.shape[1], dtype=g.dtype, device=g.device).scatter_(1, first, g[:, None, :])
    return torch.zeros_like(x).index_add_(0, rows.reshape(-1), src.reshape(M * Q, g.shape[1]).to(x.dtype))


@torch.library.custom_op(OP_NAME, mutates_args=())
def pool_tokens_op(x: torch.Tensor, rows: torch.Tensor, mode: str) -> torch.Tensor:
    return _forward(x, rows, mode)


@pool_tokens_op.register_fake
def _(x, rows, mode):
    return x.new_empty((rows.shape[0], x.shape[1]))


def _setup(ctx, inputs, output):
    x, rows, mode = inputs
    ctx.mode = mode
    ctx.save_for_backward(x, rows)


def _op_backward(ctx, g):
    x, rows = ctx.saved_tensors
    return _backward(x, rows, ctx.mode, g), None, None


pool_tokens_op.register_autograd(_op_backward, setup_context=_setup)
compiled.register(pool_tokens_op)  # its triton_op twin, taken while compiling (fastvlm.ops.compiled)


class _PoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, mode):
        ctx.mode = mode
        ctx.save_for_backward(x, rows)
        return _forward(x, rows, mode)

    @staticmethod
    def backward(ctx, g):
        x, rows = ctx.saved_tensors
        return _backward(x, rows, ctx.mode, g), None, None


def pool_tokens(x, rows, mode="mean"):
    """Pooled rows [M, D] of tokens ``x`` [T, D] over the windows ``rows`` [M, Q] (fastvlm.ops.layout.pool_rows)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"pool_tokens: x must be [tokens, D], got {tuple(getattr(x, 'shape', ()))}")
    rows = _checks.row_table("pool_tokens", rows, x)
    if mode not in ("mean", "max"):
        raise ValueError(f"pool_tokens: mode must be 'mean' or 'max', got {mode!r}")
    if torch.compiler.is_compiling() or _checks.is_meta(x):  # meta: shape tracing, answered by the fake
        op = compiled.op_for(OP_NAME, x) if torch.compiler.is_compiling() else torch.ops.fastvlm.pool_tokens
        return op(x, rows, mode)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PoolFunction.apply(x, rows, mode)
    return _forward(x, rows, mode)
