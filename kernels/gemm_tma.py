"""The Hopper core of the dense fused GEMM: ``out = epilogue(norm(A) @ W^T)`` with TMA tile loads, a persistent grid
and split-K on the last wave.

Same contract as ``kernels/gemm.py``'s kernel for the "plain" dense variant (a strided A with a unit inner stride, no
row table): optional norm prologue (statistics per ``NORM_GROUP`` columns, one statistic per row and K tile), bias,
pre-activation store, activation, residual, any output strides. The gathered and pooled A-modes, gated pairs,
position tables and row remaps stay on the pointer kernel. ``kernels/gemm_tma_plan.py`` decides when this core runs
and with which tile, grid and split.

* **TMA.** A [M, K] and W [N, K] are read through host-side tensor descriptors (``triton.tools.tensor_descriptor``,
  triton >= 3.4): each K step is one bulk tensor copy per operand into shared memory, zero-filled past the edges, so
  the K loop has no address arithmetic and no masks. The host builds the 128-byte tensor map per launch and passes it
  as a kernel parameter (no device allocation, no host-to-device copy, no ``triton.set_allocator``).
* **Persistent, grouped.** ``NUM_PROGS`` programs (at most one per SM; a runtime integer, so a new grid size does
  not compile a new kernel) walk the work units in steps of ``NUM_PROGS``; consecutive tiles run ``GROUP_M``
  row-tiles against one column-tile of W (L2 reuse of W).
* **Epilogue.** Tiles wider than 128x128 run it on two column halves (``EPI_SPLIT``), and the split tail sums its
  partials ``RED_N`` columns at a time: fewer live registers (0 spills in the sm_90a audit on triton 3.6 and 3.8).
* **Split-K on the last wave only** (data-parallel + split-K tail): the first ``DP_TILES`` tiles (whole waves) run
  over all of K; each remaining tile is cut into ``SPLIT`` K ranges run by different programs. Every range stores
  its fp32 partial tile, then counts itself in on the tile's counter; the one that arrives last sums the ``SPLIT``
  partials in index order (deterministic, whatever the arrival order) and runs the epilogue. Only tail tiles write
  partials: LLaVA B=1 (160 tiles of 128x128 on 132 SMs) moves 28 tiles x 4 splits through L2, not all 160.
"""
import triton
import triton.language as tl

from ._interp import dot_operand
from .activations import apply_act
from .gemm_loads import _prologue_norm


@triton.jit
def _tile_of(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile number ``tile`` in grouped order."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % group_m, (tile % in_group) // group_m


@triton.jit
def _epilogue(acc, rm64, rn64, mask_m, mask_n, bias_ptr, res_ptr, out_ptr, pre_ptr, stride_rm, stride_rn,
              stride_om, stride_on, stride_pm, stride_pn,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, STORE_PRE: tl.constexpr):
    """The dense variant's epilogue of kernels/gemm.py, in the same order: + bias, [store pre], act, + residual."""
    omask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + rm64[:, None] * stride_pm + rn64[None, :] * stride_pn,
                 acc.to(pre_ptr.dtype.element_ty), mask=omask)
    acc = apply_act(acc, ACT)
    if HAS_RES:
        acc += tl.load(res_ptr + rm64[:, None] * stride_rm + rn64[None, :] * stride_rn,
                       mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=omask)


@triton.jit
def _tma_linear_kernel(
    a_desc,  # TensorDescriptor over A [M, K], block [BLOCK_M, BLOCK_K]
    w_desc,  # TensorDescriptor over W [N, K], block [BLOCK_N, BLOCK_K]
    bias_ptr,  # [N] (HAS_BIAS)
    res_ptr,  # [M, N] (HAS_RES)
    out_ptr,  # [M, N]
    pre_ptr,  # [M, N] pre-activation (STORE_PRE)
    mean_ptr,  # [M * K / NORM_GROUP] fp32 (NORM == "layernorm")
    rstd_ptr,  # [M * K / NORM_GROUP] fp32 (NORM != "none")
    nw_ptr,  # [NORM_GROUP] norm weight
    nb_ptr,  # [NORM_GROUP] norm bias (HAS_NORM_BIAS)
    part_ptr,  # [tail tiles * SPLIT, BLOCK_M, BLOCK_N] fp32 partial tiles (SPLIT > 1)
    cnt_ptr,  # [tail tiles] int32 arrival counters, zero on entry (SPLIT > 1)
    M, N, K, DP_TILES, SPLIT, K_TILES_PER_SPLIT, NUM_PROGS,
    stride_rm, stride_rn, stride_om, stride_on, stride_pm, stride_pn,
    NORM_GROUP,
    NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, STORE_PRE: tl.constexpr, HAS_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr, RED_N: tl.constexpr,
):
    EPI_N: tl.constexpr = BLOCK_N // EPI_SPLIT
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    units = DP_TILES + (num_tiles - DP_TILES) * SPLIT
    n_groups = K // NORM_GROUP
    for unit in range(pid, units, NUM_PROGS):
        if unit < DP_TILES:  # a whole tile
            tile = unit
            split = 0
            kt_lo = 0
            kt_hi = k_tiles
        else:  # one K range of a tail tile
            tail = (unit - DP_TILES) // SPLIT
            tile = DP_TILES + tail
            split = (unit - DP_TILES) % SPLIT
            kt_lo = split * K_TILES_PER_SPLIT
            kt_hi = min(kt_lo + K_TILES_PER_SPLIT, k_tiles)
        pid_m, pid_n = _tile_of(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            a = a_desc.load([off_m, k0])
            if NORM != "none":  # NORM_GROUP % BLOCK_K == 0 (the plan checks): one statistic per row and K tile
                rk = k0 + tl.arange(0, BLOCK_K)
                a = _prologue_norm(a, rm64, rk, rm64, rk, mask_m, rk < K, k0, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
                                   n_groups, NORM_GROUP, NORM, HAS_NORM_BIAS, True, False)
            w = w_desc.load([off_n, k0])
            acc = tl.dot(dot_operand(a), dot_operand(w).T, acc)

        if HAS_SPLIT and unit >= DP_TILES:
            tail = tile - DP_TILES
            rt = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tile_elems = BLOCK_M * BLOCK_N
            base = part_ptr + (tail * SPLIT).to(tl.int64) * tile_elems
            tl.store(base + split * tile_elems + rt, acc, cache_modifier=".cg")
            tl.debug_barrier()  # every thread's partial is written before the counter says so
            arrived = tl.atomic_add(cnt_ptr + tail, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:  # the last range of this tile: sum all partials in index order, RED_N columns
                for h in tl.static_range(BLOCK_N // RED_N):  # at a time (few live registers: 0 spills at 128x256)
                    cols = h * RED_N + tl.arange(0, RED_N)
                    rh = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + cols[None, :]
                    part = tl.load(base + rh, cache_modifier=".cg")
                    for s in range(1, SPLIT):
                        part += tl.load(base + s * tile_elems + rh, cache_modifier=".cg")
                    rnh = off_n + cols
                    _epilogue(part, rm64, rnh.to(tl.int64), mask_m, rnh < N, bias_ptr, res_ptr, out_ptr, pre_ptr,
                              stride_rm, stride_rn, stride_om, stride_on, stride_pm, stride_pn, HAS_BIAS, ACT,
                              HAS_RES, STORE_PRE)
        elif EPI_SPLIT == 2:  # two column halves, one after the other: half the epilogue's live registers
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, EPI_N)), (0, 2, 1)))
            rn0 = off_n + tl.arange(0, EPI_N)
            rn1 = rn0 + EPI_N
            _epilogue(acc0, rm64, rn0.to(tl.int64), mask_m, rn0 < N, bias_ptr, res_ptr, out_ptr, pre_ptr, stride_rm,
                      stride_rn, stride_om, stride_on, stride_pm, stride_pn, HAS_BIAS, ACT, HAS_RES, STORE_PRE)
            _epilogue(acc1, rm64, rn1.to(tl.int64), mask_m, rn1 < N, bias_ptr, res_ptr, out_ptr, pre_ptr, stride_rm,
                      stride_rn, stride_om, stride_on, stride_pm, stride_pn, HAS_BIAS, ACT, HAS_RES, STORE_PRE)
        else:
            _epilogue(acc, rm64, rn64, mask_m, mask_n, bias_ptr, res_ptr, out_ptr, pre_ptr, stride_rm, stride_rn,
                      stride_om, stride_on, stride_pm, stride_pn, HAS_BIAS, ACT, HAS_RES, STORE_PRE)


KERNEL_ARGS = ("a_desc", "w_desc", "bias_ptr", "res_ptr", "out_ptr", "pre_ptr", "mean_ptr", "rstd_ptr", "nw_ptr",
               "nb_ptr", "part_ptr", "cnt_ptr")
