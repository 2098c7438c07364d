"""sm_90a audit cases of ``linear_norm`` (fastvlm audit): the single pass and both launches of the split-N variant,
x every config kept for bf16 and for fp32 (tf32x3, tf32), with the specialisation the JIT sees for contiguous
16-aligned tensors (unit inner strides become constexpr 1; pointers, sizes and leading strides divisible by 16)."""
from .linear_norm import LN_CONFIGS, _PTR_ARGS, _config_ok, _linear_norm_kernel
from .linear_norm_split import (FIN_M, FIN_N_MAX, SPLIT_CONFIGS, _linear_norm_finish_kernel,
                                _linear_norm_tile_kernel)

_DTYPES = (("bf16", "ieee", 2), ("fp32", "tf32x3", 4), ("fp32", "tf32", 4))
_TILE_PTRS = ("a_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr", "ws_ptr")
_UNIT = ("stride_ak", "stride_wk", "stride_rn", "stride_on")


def _case(name, fn, ptrs, ints, constexprs, divisible, warps, stages, expect_mma, ptr_dtypes):
    sig = {p: f"*{ptr_dtypes.get(p, ptr_dtypes[''])}" for p in ptrs}
    sig.update({n: "i32" for n in ints})
    if "eps" in fn.arg_names:
        sig["eps"] = "fp32"
    sig.update({n: "constexpr" for n in constexprs})
    return dict(name=name, fn=fn, signature=sig, constexprs=constexprs, divisible=divisible, num_warps=warps,
                num_stages=stages, expect_mma=expect_mma)


def audit_cases():
    cases = []
    for dt, prec, elem in _DTYPES:
        for bm, bn, bk, warps, stages in LN_CONFIGS:
            if not _config_ok(bm, bn, bk, warps, stages, elem):
                continue
            constexprs = dict.fromkeys(_UNIT, 1)
            constexprs.update(HAS_BIAS=True, HAS_RES=True, HAS_LN_BIAS=True, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_K=bk)
            ints = ("M", "N", "K", "M_BUCKET", "stride_am", "stride_wn", "stride_rm", "stride_om")
            cases.append(_case(f"linear_norm[{dt} {prec}] {bm}x{bn}x{bk} w{warps} s{stages}", _linear_norm_kernel.fn,
                               _PTR_ARGS, ints, constexprs, _PTR_ARGS + ints[1:], warps, stages, True, {"": dt}))
        for bm, bn, bk, warps, stages in SPLIT_CONFIGS:
            if not _config_ok(bm, bn, bk, warps, stages, elem):
                continue
            constexprs = dict.fromkeys(_UNIT, 1)
            constexprs.update(HAS_BIAS=True, HAS_RES=True, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
            ints = ("M", "N", "K", "M_BUCKET", "stride_am", "stride_wn", "stride_rm", "stride_om")
            cases.append(_case(f"linear_norm_split[{dt} {prec}] {bm}x{bn}x{bk} w{warps} s{stages}",
                               _linear_norm_tile_kernel, _TILE_PTRS, ints, constexprs, _TILE_PTRS + ints[1:], warps,
                               stages, True, {"": dt, "ws_ptr": "fp32"}))
        if prec == "tf32":
            continue  # the normalising launch has no dot: one case per dtype
        for tile_n in (SPLIT_CONFIGS[0][1],):  # (TILE_N only scales the statistics loop's bounds)
            constexprs = dict(stride_on=1, HAS_LN_BIAS=True, TILE_N=tile_n, FIN_M=FIN_M, FIN_N=FIN_N_MAX)
            ints = ("M", "N", "stride_om")
            ptrs = ("out_ptr", "ws_ptr", "lnw_ptr", "lnb_ptr")
            cases.append(_case(f"linear_norm_finish[{dt}] tile_n {tile_n} {FIN_M}x{FIN_N_MAX} w4",
                               _linear_norm_finish_kernel, ptrs, ints, constexprs, ptrs + ints[1:], 4, 1, False,
                               {"": dt, "ws_ptr": "fp32"}))
    return cases
