"""Per-row normalisation statistics (fp32), the first half of a LayerNorm/RMSNorm prologue.

The GEMM (kernels/gemm.py) applies ``(x - mean) * rstd * w + b`` to each A tile as it is loaded, so the normalised
activations never reach HBM. It needs the statistics of every norm row before its K loop starts; this kernel computes
them in one pass over x (several rows per program, two sweeps over the row for a numerically safe variance) and they are
kept for the backward pass (8 bytes per row instead of the normalised tensor).
"""
import triton
import triton.language as tl

from . import _launch

MODES = ("strided", "concat", "concat_cm", "mean")


@triton.jit
def _load_chunk(x_ptr, rows_ptr, rows64, mask_r, cols, mask_c, q, Q, stride_r, MODE: tl.constexpr):
    """fp32 [BLOCK_R, BLOCK_C] chunk of the logical rows (see ``row_stats``)."""
    m = mask_r[:, None] & mask_c[None, :]
    if MODE == "strided":
        x = tl.load(x_ptr + rows64[:, None] * stride_r + cols[None, :], mask=m, other=0.0).to(tl.float32)
    elif MODE == "concat":
        tok = tl.load(rows_ptr + rows64 * Q + q, mask=mask_r, other=0)
        x = tl.load(x_ptr + tok[:, None] * stride_r + cols[None, :], mask=m, other=0.0).to(tl.float32)
    else:  # "mean" (the launcher admits no other mode): the pooled row, rounded to the input dtype as PyTorch's AvgPool does
        x = tl.zeros(m.shape, dtype=tl.float32)
        for qq in range(0, Q):
            tok = tl.load(rows_ptr + rows64 * Q + qq, mask=mask_r, other=0)
            x += tl.load(x_ptr + tok[:, None] * stride_r + cols[None, :], mask=m, other=0.0).to(tl.float32)
        x = (x / Q).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _row_stats_kernel(
    x_ptr,  # [T, C] source rows, unit column stride
    rows_ptr,  # [R, Q] int64 source-row table (MODE != "strided")
    mean_ptr,  # [R] fp32 (untouched when RMS)
    rstd_ptr,  # [R] fp32
    R,
    C,
    Q,
    stride_r,
    eps,
    RMS: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    rows64 = rows.to(tl.int64)
    NQ = Q if MODE == "concat" else 1
    n = (NQ * C).to(tl.float32)
    mean = tl.zeros((BLOCK_R,), tl.float32)
    if not RMS:
        acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for q in range(0, NQ):
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                acc += _load_chunk(x_ptr, rows_ptr, rows64, mask_r, cols, cols < C, q, Q, stride_r, MODE)
        mean = tl.sum(acc, axis=1) / n
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for q in range(0, NQ):
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mc = cols < C
            x = _load_chunk(x_ptr, rows_ptr, rows64, mask_r, cols, mc, q, Q, stride_r, MODE)
            d = tl.where(mask_r[:, None] & mc[None, :], x - mean[:, None], 0.0)
            acc2 += d * d
    var = tl.sum(acc2, axis=1) / n
    rstd = 1.0 / tl.sqrt(var + eps)
    if not RMS:
        tl.store(mean_ptr + rows64, mean, mask=mask_r)
    tl.store(rstd_ptr + rows64, rstd, mask=mask_r)


def row_stats(x, eps, rms, *, rows=None, mode="strided", block_r=None, block_c=None, memo=None):
    """fp32 (mean, rstd) of logical rows of the 2-D tensor ``x`` [T, C] (mean is None for RMS).

    mode "strided": the rows of x; "concat" / "concat_cm": row r is the concatenation of x[rows[r, q]] over q (a
    space-to-depth merged row, patch-major or channel-major: the same elements in another order, so the same
    statistics); "mean": row r is the average of x[rows[r, q]] over q (a pooled row). ``rows``: int64 [R, Q].
    ``memo``: a one-element list receiving the launch's ``Call`` (plan, grid and integer arguments; its tensors are
    (x, rows or rstd, mean or rstd, rstd)), for a caller that repeats this launch under its own checked key.
    """
    import torch

    if mode not in MODES:
        raise ValueError(f"row_stats: mode must be one of {MODES}, got {mode!r}")
    if mode == "concat_cm":  # a permutation of the "concat" row: mean and variance do not depend on the order
        mode = "concat"

    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"row_stats: x must be 2-D with unit column stride, got shape {tuple(x.shape)} strides {x.stride()}")
    if mode != "strided" and (rows is None or rows.dtype != torch.int64 or not rows.is_contiguous()):
        raise ValueError(f"row_stats: mode {mode!r} needs rows, a contiguous int64 [R, Q] table")
    C = x.shape[1]
    R = x.shape[0] if mode == "strided" else rows.shape[0]
    rstd = torch.empty(R, device=x.device, dtype=torch.float32)
    mean = None if rms else torch.empty(R, device=x.device, dtype=torch.float32)
    if R == 0:
        return mean, rstd
    block_c = block_c or min(_launch.next_pow2(C), 1024)
    block_r = block_r or max(1, min(16, 4096 // block_c))
    args = (x, rows if rows is not None else rstd, mean if mean is not None else rstd, rstd, R, C,
            rows.shape[1] if rows is not None else 1, x.stride(0), float(eps))
    consts = dict(RMS=bool(rms), MODE=mode, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    if memo is None:
        _launch.run(_row_stats_kernel, (_launch.cdiv(R, block_r),), args, **consts)
    else:
        plan = _launch.simple_plan(_row_stats_kernel, len(args), 4, consts, _PLANS, tuple(consts.items()))
        memo[0] = call = _launch.Call(plan, (_launch.cdiv(R, block_r),), args[4:])
        call.launch(args[:4])
    return mean, rstd


_PLANS = {}


def audit_cases():
    """Compile cases for ``fastvlm audit`` (sm_90): the stats pass in each mode over bf16 rows."""
    cases = []
    for rms, mode in ((False, "strided"), (True, "strided"), (False, "concat"), (True, "mean")):
        cases.append(dict(
            name=f"row_stats[{'rms' if rms else 'ln'},{mode}]",
            fn=_row_stats_kernel,
            signature={"x_ptr": "*bf16", "rows_ptr": "*i64", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "R": "i32",
                       "C": "i32", "Q": "i32", "stride_r": "i32", "eps": "fp32", "RMS": "constexpr",
                       "MODE": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
            constexprs={"RMS": rms, "MODE": mode, "BLOCK_R": 4, "BLOCK_C": 1024},
            divisible=("x_ptr", "rows_ptr", "mean_ptr", "rstd_ptr", "C", "stride_r"),
            num_warps=4, num_stages=1, expect_mma=False,
        ))
    return cases
