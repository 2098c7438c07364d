"""Token pooling over windows of rows: ``out[m, d] = mean_q or max_q x[rows[m, q], d]``.

The windows are the same int64 row tables the GEMM's A loads use (fastvlm.ops.layout), so a k x k average or max
pool over a token grid (LLaVA-NeXT-Video's pooler) reads the tokens in place, without the NCHW permute copy. Several
rows per program, fp32 accumulation, the result cast to the input dtype (where PyTorch's pooling rounds too).
"""
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _pool_rows_kernel(
    x_ptr,  # [T, D]
    rows_ptr,  # [M, Q] int64
    out_ptr,  # [M, D]
    M, D, Q, stride_x, stride_o,
    MODE: tl.constexpr,  # "mean" | "max"
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rd = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = (rm < M)[:, None] & (rd < D)[None, :]
    if MODE == "max":
        acc = tl.full((BLOCK_M, BLOCK_D), float("-inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for q in range(0, Q):
        tok = tl.load(rows_ptr + rm * Q + q, mask=rm < M, other=0)
        v = tl.load(x_ptr + tok[:, None] * stride_x + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == "max":  # NaN wins, as in PyTorch's max pooling (max.NaN.f32: no extra instruction)
            acc = tl.maximum(acc, v, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc += v
    if MODE == "mean":
        acc = acc / Q
    tl.store(out_ptr + rm[:, None] * stride_o + rd[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def pool_rows(x, rows, mode):
    """[M, D] pooled rows of ``x`` [T, D] (unit column stride) over the windows ``rows`` [M, Q]."""
    import torch

    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"pool_rows: x must be 2-D with unit column stride, got {tuple(x.shape)} / {x.stride()}")
    if mode not in ("mean", "max"):
        raise ValueError(f"pool_rows: mode must be 'mean' or 'max', got {mode!r}")
    M, Q = rows.shape
    D = x.shape[1]
    out = torch.empty(M, D, device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    block_d = min(_launch.next_pow2(D), 256)
    block_m = 16
    _launch.run(_pool_rows_kernel, (_launch.cdiv(M, block_m), _launch.cdiv(D, block_d)),
                (x, rows, out, M, D, Q, x.stride(0), out.stride(0)), MODE=mode, BLOCK_M=block_m, BLOCK_D=block_d,
                num_warps=4)
    return out


def audit_cases():
    return [dict(name=f"pool_rows[bf16,{mode}]", fn=_pool_rows_kernel,
                 signature={"x_ptr": "*bf16", "rows_ptr": "*i64", "out_ptr": "*bf16", "M": "i32", "D": "i32",
                            "Q": "i32", "stride_x": "i32", "stride_o": "i32", "MODE": "constexpr",
                            "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
                 constexprs={"MODE": mode, "BLOCK_M": 16, "BLOCK_D": 256},
                 divisible=("x_ptr", "rows_ptr", "out_ptr", "D", "stride_x", "stride_o"),
                 num_warps=4, num_stages=1, expect_mma=False) for mode in ("mean", "max")]
