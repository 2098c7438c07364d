"""The split-N variant of ``linear_norm`` (kernels/linear_norm.py) for small M: two launches, every SM busy.

The single-pass kernel gives each program BLOCK_M whole rows, so its grid is cdiv(M, 64) programs: 4 at a BLIP-2
batch of 8 images (M = 256 query rows), 1 at B = 1, on 132 SMs. Here the N dimension is split too:

    launch 1  grid cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N): each program computes its [BLOCK_M, BLOCK_N] output tile
              over the whole K (fp32 accumulator) + bias + residual, stores the pre-norm tile into ``out`` (the
              output buffer doubles as scratch, as in the single pass) and writes the tile's per-row fp32 mean and
              M2 (sum of squared deviations from the tile mean) into a workspace [2, T, M], T = cdiv(N, BLOCK_N)
    launch 2  grid cdiv(M, FIN_M) x cdiv(N, FIN_N): each program merges the T partials of its rows in tile order
              (Chan's pairwise formula, as the single pass merges its chunks: no sum-of-squares cancellation), then
              normalises its tile of ``out`` in place: (h - mean) * rstd * ln_weight + ln_bias

No atomics, no counters, no inter-program waiting: the launch boundary orders the two passes, and every program of
launch 2 recomputes its rows' statistics from the T partials (T <= N / 32 loads per row, a few hundred bytes), so
the result is deterministic and does not depend on which programs ran first. The bytes are those of the single pass
(h written once as ``out``, read and rewritten once) plus the workspace, 2 * T * M fp32 written and read once per
column tile of launch 2; the price is one more launch.
"""
import triton
import triton.language as tl

from ._interp import dot_operand

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of launch 1; the first one is what the interpreter runs. 64-row
# tiles are one warpgroup (wgmma); narrow N tiles give more programs at small M (BLIP-2 B = 8: 4 x 24 = 96 with
# BLOCK_N 32). fp32 (tf32x3) keeps to 64x64 accumulators and BLOCK_K 32, as in the single pass.
SPLIT_CONFIGS = [
    (64, 32, 32, 4, 4),  # fp32 and 16-bit
    (64, 64, 32, 4, 3),  # fp32 and 16-bit
    (64, 32, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 3),
]
FIN_M = 16  # rows per program of launch 2
FIN_N_MAX = 256  # columns per program of launch 2 (the next power of two of N when smaller)


@triton.jit
def _pre_norm_tile(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, rm64, mask_m, rn64, mask_n, K,
                   stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of a @ w.T over the whole K, + bias + residual (fp32), stored into ``out`` as the
    pre-norm values; returned for the caller's row statistics. Shared by the single pass and launch 1 here."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        rk64 = rk.to(tl.int64)
        a = tl.load(a_ptr + rm64[:, None] * stride_am + rk64[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + rk64[:, None] * stride_wk + rn64[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(dot_operand(a), dot_operand(w), acc, input_precision=PRECISION)
    omask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rm64[:, None] * stride_rm + rn64[None, :] * stride_rn,
                       mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=omask)
    return acc


@triton.jit
def _linear_norm_tile_kernel(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, ws_ptr, M, N, K, M_BUCKET,
                             stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                             HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # consecutive programs share their A rows (an M tile) and walk N: A stays in L2 while W streams
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = _pre_norm_tile(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, rm64, mask_m, rn64, mask_n, K,
                         stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                         HAS_BIAS, HAS_RES, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # the tile's per-row mean and M2 (fp32, from the accumulator, as the single pass takes its chunks')
    nc = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
    tmean = tl.sum(tl.where(mask_n[None, :], acc, 0.0), axis=1) / nc
    d = tl.where(mask_n[None, :], acc - tmean[:, None], 0.0)
    tm2 = tl.sum(d * d, axis=1)
    zero64 = tl.full((), 0, tl.int64)
    slot = (zero64 + pid_n) * M + rm64
    tl.store(ws_ptr + slot, tmean, mask=mask_m)
    tl.store(ws_ptr + (zero64 + n_tiles) * M + slot, tm2, mask=mask_m)


@triton.jit
def _linear_norm_finish_kernel(out_ptr, ws_ptr, lnw_ptr, lnb_ptr, M, N, eps, stride_om, stride_on,
                               HAS_LN_BIAS: tl.constexpr, TILE_N: tl.constexpr, FIN_M: tl.constexpr,
                               FIN_N: tl.constexpr):
    pid = tl.program_id(0)
    n_cols = tl.cdiv(N, FIN_N)
    pid_m = pid // n_cols
    pid_n = pid % n_cols
    rm = pid_m * FIN_M + tl.arange(0, FIN_M)
    mask_m = rm < M
    rm64 = rm.to(tl.int64)
    n_tiles = tl.cdiv(N, TILE_N)
    zero64 = tl.full((), 0, tl.int64)
    m2_base = (zero64 + n_tiles) * M
    mean = tl.zeros((FIN_M,), dtype=tl.float32)
    m2 = tl.zeros((FIN_M,), dtype=tl.float32)
    for j in range(0, n_tiles):  # merge the tiles' statistics in tile order (Chan et al.)
        slot = (zero64 + j) * M + rm64
        tmean = tl.load(ws_ptr + slot, mask=mask_m, other=0.0)
        tm2 = tl.load(ws_ptr + m2_base + slot, mask=mask_m, other=0.0)
        nc = tl.minimum(N - j * TILE_N, TILE_N).to(tl.float32)
        seen = j * TILE_N * 1.0
        total = seen + nc
        delta = tmean - mean
        mean += delta * (nc / total)
        m2 += tm2 + delta * delta * (seen * nc / total)
    rstd = 1.0 / tl.sqrt(m2 / N + eps)

    rn = pid_n * FIN_N + tl.arange(0, FIN_N)
    mask_n = rn < N
    rn64 = rn.to(tl.int64)
    omask = mask_m[:, None] & mask_n[None, :]
    optrs = out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on
    h = tl.load(optrs, mask=omask, other=0.0).to(tl.float32)
    lw = tl.load(lnw_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)
    y = (h - mean[:, None]) * rstd[:, None] * lw[None, :]
    if HAS_LN_BIAS:
        y += tl.load(lnb_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=omask)
