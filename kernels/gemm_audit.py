"""sm_90a audit cases of the fused GEMM: every variant x tile configuration (fastvlm audit)."""
from .gemm import _PTR_ARGS, _fused_linear_kernel
from .gemm_configs import _config_ok, configs_for

# (label, pointer dtype, PRECISION, element bytes): bf16 (every 16-bit row), fp32 with the default tf32x3 dots (the
# fp32 rows), and fp32 "ieee" (on request only; the dense variant)
DTYPES = (("", "bf16", "ieee", 2), ("fp32 tf32x3 ", "fp32", "tf32x3", 4), ("fp32 ieee ", "fp32", "ieee", 4))
IEEE_VARIANTS = ("linear_gelu+pre",)


def audit_cases():
    """Compile cases for ``fastvlm audit``: every autotune config x the epilogue variants the ops launch on sm_90,
    with the specialisation the JIT would see for contiguous 16-aligned tensors (unit inner strides become
    constexpr 1; pointers, sizes and leading strides divisible by 16): bf16 with the 16-bit rows, fp32 (tf32x3) with
    the fp32 rows, and fp32 "ieee" for the dense variant."""
    base = dict(HAS_AFFINE=False, PIX_MASK=False, HAS_POS=False, POS_TAPS=0, OUT_REMAP=False, A_MODE="strided", NORM="none", HAS_NORM_BIAS=False, NORM_SRC=False, HAS_BIAS=False, ACT="none",
                GATED=False, HAS_RES=False, STORE_PRE=False, STILL_T=0)
    variants = [
        ("linear_gelu+pre", dict(base, HAS_BIAS=True, ACT="gelu", STORE_PRE=True)),
        ("layernorm_linear_gelu", dict(base, NORM="layernorm", HAS_NORM_BIAS=True, HAS_BIAS=True, ACT="gelu")),
        ("rmsnorm_linear", dict(base, NORM="rmsnorm", HAS_BIAS=True)),
        ("swiglu_gated+res", dict(base, ACT="silu", GATED=True, HAS_RES=True)),
        ("shuffle_layernorm_swiglu+pre", dict(base, A_MODE="concat", NORM="layernorm", HAS_NORM_BIAS=True,
                                              HAS_BIAS=True, ACT="silu", GATED=True, STORE_PRE=True)),
        ("shuffle_layernorm_linear_gelu", dict(base, A_MODE="concat", NORM="layernorm", HAS_NORM_BIAS=True,
                                               HAS_BIAS=True, ACT="gelu")),
        ("shuffle_cm_linear", dict(base, A_MODE="concat_cm")),
        ("avgpool_rmsnorm1p_linear", dict(base, A_MODE="mean", NORM="rmsnorm_1p")),
        ("maxpool_linear_gelu+pre", dict(base, A_MODE="max", HAS_BIAS=True, ACT="gelu", STORE_PRE=True)),
        ("im2col_bias_pos_remap", dict(base, A_MODE="separable", HAS_BIAS=True, HAS_POS=True, OUT_REMAP=True)),
        ("rows_bias_pos4", dict(base, HAS_BIAS=True, HAS_POS=True, POS_TAPS=4)),
        ("rows_still2_bias_pos4", dict(base, A_MODE="separable", HAS_BIAS=True, HAS_POS=True, POS_TAPS=4, STILL_T=2)),
        ("im2col_uint8_affine", dict(base, A_MODE="separable", HAS_AFFINE=True, HAS_BIAS=True)),
        ("im2col_uint8_padded_navit", dict(base, A_MODE="separable", HAS_AFFINE=True, PIX_MASK=True, HAS_BIAS=True,
                                           HAS_POS=True)),
        ("nchw_flatten_linear_gelu+pre", dict(base, A_MODE="separable", HAS_BIAS=True, ACT="gelu", STORE_PRE=True)),
        ("nchw_avgpool_linear_gelu+pre", dict(base, A_MODE="separable_mean", HAS_BIAS=True, ACT="gelu",
                                              STORE_PRE=True)),
        ("nchw_avgpool_linear", dict(base, A_MODE="separable_mean", HAS_BIAS=True)),
    ]
    cases = []
    for (label, dt, prec, elem), (vname, flags) in ((d, v) for d in DTYPES for v in variants):
        if prec == "ieee" and elem == 4 and vname not in IEEE_VARIANTS:
            continue
        for bm, bn, bk, warps, stages in configs_for(elem):
            if not _config_ok(bm, bn, bk, warps, stages, elem, flags["GATED"], flags["A_MODE"], flags["PIX_MASK"]):
                continue
            sig = {name: f"*{dt}" for name in _PTR_ARGS}
            sig.update(mean_ptr="*fp32", rstd_ptr="*fp32")
            for name in ("rows_ptr", "cols_ptr", "pos_rows_ptr", "out_rows_ptr"):
                sig[name] = "*i64"
            sig.update(sc_ptr="*fp32", sh_ptr="*fp32", pos_w_ptr="*fp32", plim_ptr="*i32", pk_ptr="*i32")
            if flags["HAS_AFFINE"]:
                sig["a_ptr"] = "*u8"  # raw pixels
            for name in ("M", "N", "K", "M_BUCKET", "Q", "D_SRC", "stride_am", "stride_wn", "stride_wun", "stride_rm",
                         "stride_om", "stride_pm", "stride_pos", "NORM_GROUP"):
                sig[name] = "i32"
            for name in ("stride_ak", "stride_wk", "stride_wuk", "stride_rn", "stride_on", "stride_pn"):
                sig[name] = "constexpr"
            constexprs = {name: 1 for name in ("stride_ak", "stride_wk", "stride_wuk", "stride_rn", "stride_on", "stride_pn")}
            constexprs.update(flags, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                              NORM_ALIGNED=flags["NORM"] != "none", A_ALIGNED=flags["A_MODE"] == "concat")
            for name in ("HAS_AFFINE", "PIX_MASK", "HAS_POS", "POS_TAPS", "OUT_REMAP", "A_MODE", "A_ALIGNED", "NORM", "HAS_NORM_BIAS", "NORM_ALIGNED", "NORM_SRC", "HAS_BIAS", "ACT",
                         "GATED", "HAS_RES", "STORE_PRE", "PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M",
                         "STILL_T"):
                sig[name] = "constexpr"
            divisible = _PTR_ARGS + ("N", "K", "M_BUCKET", "D_SRC", "stride_am", "stride_wn", "stride_wun", "stride_rm",
                                     "stride_om", "stride_pm", "NORM_GROUP")
            cases.append(dict(name=f"fused_linear[{label}{vname}] {bm}x{bn}x{bk} w{warps} s{stages}", fn=_fused_linear_kernel.fn.fn,
                              signature=sig, constexprs=constexprs, divisible=divisible, num_warps=warps,
                              num_stages=stages, expect_mma=not (prec == "ieee" and elem == 4)))  # (fp32 ieee: FMA)
    return cases
