"""Tile configurations of the fused GEMM (kernels/gemm.py) and the pruning that keeps each variant within the
registers and shared memory the sm_90a audit found safe."""
import triton

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The first one is what the interpreter runs.
# 64-row tiles reach wgmma with 4 warps (one warpgroup); 128-row tiles use 8 warps (two warpgroups).
GEMM_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 64, 64, 8, 3),  # for gated pairs (two accumulators): wider tiles spill
    (64, 64, 64, 4, 4),
]
GATED_MAX_ACC_PER_THREAD = 32  # a gated pair holds two fp32 accumulators; more than this per thread spills
# "separable_mean" sums each A tile in an fp32 register tile with int64 offsets: above 32 A elements per thread
# (128x64 A tiles on 4 warps) ptxas spilled 144-156 B (fastvlm audit), so those tiles are not launched for it
POOLED_MAX_A_PER_THREAD = 32
# uint8 im2col with the padding mask (PIX_MASK): 128-wide N tiles spilled 376-472 B in the sm_90a audit (the affine
# A path is already at 250 registers), so the masked variant runs N tiles of at most 64
PIX_MASK_MAX_BLOCK_N = 64


def _config_ok(bm, bn, bk, warps, stages, elem_bytes, gated, a_mode="strided", pix_mask=False):
    if _smem_estimate(bm, bn, bk, stages, elem_bytes, gated) > SMEM_BUDGET:
        return False
    if pix_mask and bn > PIX_MASK_MAX_BLOCK_N:
        return False
    if a_mode == "separable_mean" and bm * bk // (32 * warps) > POOLED_MAX_A_PER_THREAD:
        return False
    return not gated or bm * bn // (32 * warps) <= GATED_MAX_ACC_PER_THREAD
# 128x256 tiles were tried and dropped: ptxas spills (80-208 B) with a GELU or norm epilogue at 8 warps.
SMEM_BUDGET = 200 * 1024  # of the 227 KB an H100 block may use; leaves room for the epilogue's layout conversion


def _smem_estimate(bm, bn, bk, stages, elem_bytes, gated):
    return (bm * bk + bk * bn * (2 if gated else 1)) * elem_bytes * stages


def _prune_configs(configs, named_args, **kwargs):
    gated = named_args.get("GATED", kwargs.get("GATED", False))
    a_mode = named_args.get("A_MODE", kwargs.get("A_MODE", "strided"))
    pix_mask = named_args.get("PIX_MASK", kwargs.get("PIX_MASK", False))
    a = named_args["a_ptr"]
    elem = a.element_size() if hasattr(a, "element_size") else 2
    kept = [c for c in configs if _config_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                             c.num_stages, elem, gated, a_mode, pix_mask)]
    return kept or configs[-1:]


def _triton_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in GEMM_CONFIGS]
