"""Per-row normalisation statistics (fp32), the first half of a LayerNorm/RMSNorm prologue.

The GEMM (kernels/gemm.py) applies ``(x - mean) * rstd * w + b`` to each A tile as it is loaded, so the normalised
activations never reach HBM. It needs the statistics of every norm row before its K loop starts; this kernel computes
them in one pass over x (several rows per program, two sweeps over the row for a numerically safe variance) and they are
kept for the backward pass (8 bytes per row instead of the normalised tensor).
"""
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(
    x_ptr,  # [R, C], unit column stride
    mean_ptr,  # [R] fp32 (untouched when RMS)
    rstd_ptr,  # [R] fp32
    R,
    C,
    stride_r,
    eps,
    RMS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_r
    mean = tl.zeros((BLOCK_R,), tl.float32)
    if not RMS:
        acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = mask_r[:, None] & (cols < C)[None, :]
            acc += tl.load(base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=1) / C
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = mask_r[:, None] & (cols < C)[None, :]
        x = tl.load(base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - mean[:, None], 0.0)
        acc2 += d * d
    var = tl.sum(acc2, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    if not RMS:
        tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


def row_stats(x, eps, rms, *, block_r=None, block_c=None):
    """Statistics of the rows of a 2-D tensor ``x`` [R, C]: returns (mean, rstd) in fp32 (mean is None for RMS)."""
    import torch

    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"row_stats: x must be 2-D with unit column stride, got shape {tuple(x.shape)} strides {x.stride()}")
    R, C = x.shape
    rstd = torch.empty(R, device=x.device, dtype=torch.float32)
    mean = None if rms else torch.empty(R, device=x.device, dtype=torch.float32)
    if R == 0:
        return mean, rstd
    block_c = block_c or min(triton.next_power_of_2(C), 1024)
    block_r = block_r or max(1, min(16, 4096 // block_c))
    grid = (triton.cdiv(R, block_r),)
    _row_stats_kernel[grid](
        x, mean if mean is not None else rstd, rstd, R, C, x.stride(0), float(eps),
        RMS=bool(rms), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return mean, rstd


def audit_cases():
    """Compile cases for ``fastvlm audit`` (sm_90): the stats pass over bf16 rows of width 1280 and 4096."""
    cases = []
    for rms in (False, True):
        cases.append(dict(
            name=f"row_stats[{'rms' if rms else 'ln'}]",
            fn=_row_stats_kernel,
            signature={"x_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "R": "i32", "C": "i32",
                       "stride_r": "i32", "eps": "fp32", "RMS": "constexpr", "BLOCK_R": "constexpr",
                       "BLOCK_C": "constexpr"},
            constexprs={"RMS": rms, "BLOCK_R": 4, "BLOCK_C": 1024},
            divisible=("x_ptr", "mean_ptr", "rstd_ptr", "C", "stride_r"),
            num_warps=4, num_stages=1, expect_mma=False,
        ))
    return cases
