"""The rare pass of the fused GEMM's still-image mode (``STILL_T``, kernels/gemm.py): Qwen-VL's patch embedding of
still images reads one of the T repeated frames against the time-summed kernel, x0 (W0 + ... + W(T-1))^T. On finite
inputs that is the original's x0 W0^T + ... + x0 W(T-1)^T up to rounding; with an Inf pixel it is not (Inf * (1 - 0.5)
is Inf where Inf * 1 + Inf * -0.5 is NaN, and Inf * (0 + 1) is Inf where Inf * 0 + Inf * 1 is NaN). Such a pixel
makes its whole output row non-finite, so a tile whose accumulator holds a non-finite value is computed again here,
the original's way, and stored over. Never taken on finite inputs short of an overflow of the accumulator.
"""
import triton
import triton.language as tl

from ._interp import dot_operand


@triton.jit(noinline=True)
def _still_frames_tile(pid_m, pid_n, a_ptr, rows_ptr, wf_ptr, bias_ptr, pos_ptr, pos_rows_ptr, pos_w_ptr, out_ptr, M,
                       N, K, stride_ak, stride_wfn, stride_wfk, stride_om, stride_on, stride_pos, HAS_BIAS: tl.constexpr,
                       HAS_POS: tl.constexpr, POS_TAPS: tl.constexpr, STILL_T: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The output tile (pid_m, pid_n) of still-image rows the original's way: A[m, :] is the whole row of X (every
    frame; its column j at ``rows[m] + j * stride_ak``) against the full kernel ``wf`` [N, STILL_T * K], + bias +
    position taps, stored (the rare pass of ``_fused_linear_kernel`` with STILL_T)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    roff = tl.load(rows_ptr + rm64, mask=mask_m, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, STILL_T * K, BLOCK_K, num_stages=1):
        rk64 = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = rk64 < STILL_T * K
        a = tl.load(a_ptr + roff[:, None] + rk64[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :],
                    other=0).to(wf_ptr.dtype.element_ty)
        w = tl.load(wf_ptr + rk64[:, None] * stride_wfk + rn64[None, :] * stride_wfn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(dot_operand(a), dot_operand(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if HAS_POS:
        if POS_TAPS == 0:
            prow = tl.load(pos_rows_ptr + rm64, mask=mask_m, other=0)
            acc += tl.load(pos_ptr + prow[:, None] * stride_pos + rn64[None, :], mask=omask, other=0.0).to(tl.float32)
        else:
            for t in range(POS_TAPS):
                prow = tl.load(pos_rows_ptr + rm64 * POS_TAPS + t, mask=mask_m, other=0)
                pw = tl.load(pos_w_ptr + rm64 * POS_TAPS + t, mask=mask_m, other=0.0)
                acc += pw[:, None] * tl.load(pos_ptr + prow[:, None] * stride_pos + rn64[None, :], mask=omask,
                                             other=0.0).to(tl.float32)
    tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=omask)
