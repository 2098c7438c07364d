"""Tile configurations of the fused GEMM (kernels/gemm.py) and the pruning that keeps each variant within the
registers and shared memory the sm_90a audit found safe."""
import triton

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of 16-bit inputs. The first one is what the interpreter runs.
# 64-row tiles reach wgmma with 4 warps (one warpgroup); 128-row tiles use 8 warps (two warpgroups).
GEMM_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 64, 64, 8, 3),  # for gated pairs (two accumulators): wider tiles spill
    (64, 64, 64, 4, 4),
]
# fp32 inputs (tf32x3 by default: each operand split into hi/lo TF32 halves in registers) run their own rows, all
# BLOCK_K 32 and at most 32 accumulator elements per thread. With the 16-bit rows above, ptxas spilled in the dense
# fp32 GEMM at 3 of the 5 rows that fit (20-700 B tf32x3; 16-64 B "ieee") and in 7 of 32 variant x row cases at the
# other two (8-428 B); 128x128x32 on 8 warps (64 accumulators per thread) spilled 16-1628 B in 4 of 16 variants.
# These rows compile every variant with 0 spills (fastvlm audit, the "fused_linear[fp32 ..." rows; numbers in
# docs/design-projector.md). 16-bit inputs never run them, nor fp32 the 16-bit rows.
FP32_GEMM_CONFIGS = [
    (128, 64, 32, 8, 4),
    (128, 64, 32, 8, 3),
    (64, 64, 32, 4, 4),
    (64, 32, 32, 4, 4),
]
FP32_BLOCK_K = 32
assert all(c[2] == FP32_BLOCK_K for c in FP32_GEMM_CONFIGS) and all(c[2] != FP32_BLOCK_K for c in GEMM_CONFIGS)
GATED_MAX_ACC_PER_THREAD = 32  # a gated pair holds two fp32 accumulators; more than this per thread spills
# "separable_mean" sums each A tile in an fp32 register tile with int64 offsets: above 32 A elements per thread
# (128x64 A tiles on 4 warps) ptxas spilled 144-156 B (fastvlm audit), so those tiles are not launched for it
POOLED_MAX_A_PER_THREAD = 32
# uint8 im2col with the padding mask (PIX_MASK): 128-wide N tiles spilled 376-472 B in the sm_90a audit (the affine
# A path is already at 250 registers), so the masked variant runs N tiles of at most 64
PIX_MASK_MAX_BLOCK_N = 64


def _config_ok(bm, bn, bk, warps, stages, elem_bytes, gated, a_mode="strided", pix_mask=False, smem=None):
    """Whether a config fits: its pipeline buffers within ``smem`` bytes (default SMEM_BUDGET, the H100 budget; the
    pruner passes ``smem_budget`` of the launch device) and the register limits the audit found."""
    if (bk == FP32_BLOCK_K) != (elem_bytes == 4):  # each dtype runs its own rows
        return False
    if _smem_estimate(bm, bn, bk, stages, elem_bytes, gated) > (SMEM_BUDGET if smem is None else smem):
        return False
    if pix_mask and bn > PIX_MASK_MAX_BLOCK_N:
        return False
    if a_mode == "separable_mean" and bm * bk // (32 * warps) > POOLED_MAX_A_PER_THREAD:
        return False
    return not gated or bm * bn // (32 * warps) <= GATED_MAX_ACC_PER_THREAD
# 128x256 tiles were tried and dropped: ptxas spills (80-208 B) with a GELU or norm epilogue at 8 warps.
SMEM_BUDGET = 200 * 1024  # of the 227 KB an H100 block may use; leaves room for the epilogue's layout conversion
H100_SMEM_PER_BLOCK = 232448  # 227 KB: the most shared memory one block may use on sm_90 (H100, H200)
_SMEM_HEADROOM = H100_SMEM_PER_BLOCK - SMEM_BUDGET  # kept free on every device
_DEVICE_SMEM = {}  # CUDA device index -> budget


def _smem_estimate(bm, bn, bk, stages, elem_bytes, gated):
    """Shared memory of the main loop's pipeline: ``stages`` buffers of the A tile and the weight tile(s), in the
    inputs' element size (fp32 takes twice bf16's). The sm_90a audit reports exactly this for wgmma tiles (fp32 TF32
    128x128x64, 3 stages: 196608 B; 4 stages: 262144 B, over the limit); the epilogue reuses the buffers."""
    return (bm * bk + bk * bn * (2 if gated else 1)) * elem_bytes * stages


def smem_budget(t):
    """Bytes of shared memory a config may use on the device of tensor ``t``: the device's per-block limit (Triton's
    ``max_shared_mem``, read once per device) less the headroom SMEM_BUDGET leaves on an H100, and at most
    SMEM_BUDGET (the audited budget). SMEM_BUDGET off CUDA (the interpreter, the sm_90 host-only driver)."""
    idx = t.get_device() if hasattr(t, "get_device") else -1
    if idx < 0:
        return SMEM_BUDGET
    budget = _DEVICE_SMEM.get(idx)
    if budget is None:
        budget = _DEVICE_SMEM[idx] = min(SMEM_BUDGET, _device_limit(idx) - _SMEM_HEADROOM)
    return budget


def _device_limit(idx):
    return triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"]


def fit_stages(config, per_stage, smem):
    """``config`` with fewer pipeline stages when ``stages * per_stage`` bytes exceed ``smem`` (at least 1): the
    pruners' last resort when no config fits a small device."""
    stages = max(1, min(config.num_stages, smem // max(per_stage, 1)))
    if stages == config.num_stages:
        return config
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=stages)


def _prune_configs(configs, named_args, **kwargs):
    gated = named_args.get("GATED", kwargs.get("GATED", False))
    a_mode = named_args.get("A_MODE", kwargs.get("A_MODE", "strided"))
    pix_mask = named_args.get("PIX_MASK", kwargs.get("PIX_MASK", False))
    a = named_args["a_ptr"]
    elem = a.element_size() if hasattr(a, "element_size") else 2
    smem = smem_budget(a)
    kept = [c for c in configs if _config_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                             c.num_stages, elem, gated, a_mode, pix_mask, smem)]
    if kept:
        return kept
    last = ([c for c in configs if (c.kwargs["BLOCK_K"] == FP32_BLOCK_K) == (elem == 4)] or configs)[-1]
    bm, bn, bk = last.kwargs["BLOCK_M"], last.kwargs["BLOCK_N"], last.kwargs["BLOCK_K"]
    return [fit_stages(last, _smem_estimate(bm, bn, bk, 1, elem, gated), smem)]


def configs_for(elem_bytes):
    """The rows inputs of ``elem_bytes`` per element may run (before the shared-memory and register pruning)."""
    return FP32_GEMM_CONFIGS if elem_bytes == 4 else GEMM_CONFIGS


def _triton_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in GEMM_CONFIGS + FP32_GEMM_CONFIGS]
