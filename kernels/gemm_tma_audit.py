"""sm_90a audit cases of the TMA GEMM core (kernels/gemm_tma.py): every config x the dense epilogue variants, with
and without the split-K tail, bf16 (and fp16 for the projector's variant)."""
from .gemm_tma import KERNEL_ARGS, _tma_linear_kernel
from .gemm_tma_schedule import TMA_CONFIGS, config_ok, epi_split

_VARIANTS = [  # (name, NORM, HAS_NORM_BIAS, HAS_BIAS, ACT, HAS_RES, STORE_PRE, dtypes, split-K tail variants)
    ("linear_gelu+pre", "none", False, True, "gelu", False, True, ("bf16", "fp16"), (False, True)),
    ("linear+res", "none", False, False, "none", True, False, ("bf16",), (True,)),
    ("layernorm_linear_gelu", "layernorm", True, True, "gelu", False, False, ("bf16",), (False, True)),
]


def audit_cases():
    cases = []
    for name, norm, nbias, bias, act, res, pre, dtypes, splits in _VARIANTS:
        for dt in dtypes:
            for cfg in TMA_CONFIGS:
                if not config_ok(cfg, norm):
                    continue
                bm, bn, bk, warps, stages = cfg
                for split in (splits if dt == "bf16" else (True,)):
                    sig = {n: f"*{dt}" for n in KERNEL_ARGS}
                    sig.update(a_desc=f"tensordesc<{dt}[{bm}, {bk}]>", w_desc=f"tensordesc<{dt}[{bn}, {bk}]>",
                               mean_ptr="*fp32", rstd_ptr="*fp32", part_ptr="*fp32", cnt_ptr="*i32")
                    for n in ("M", "N", "K", "DP_TILES", "SPLIT", "K_TILES_PER_SPLIT", "NUM_PROGS", "stride_rm",
                              "stride_om", "stride_pm", "NORM_GROUP"):
                        sig[n] = "i32"
                    consts = dict(stride_rn=1, stride_on=1, stride_pn=1, NORM=norm, HAS_NORM_BIAS=nbias,
                                  HAS_BIAS=bias, ACT=act, HAS_RES=res, STORE_PRE=pre, HAS_SPLIT=split,
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                  EPI_SPLIT=epi_split(cfg), RED_N=min(64, bn))
                    for n in consts:
                        sig[n] = "constexpr"
                    divisible = KERNEL_ARGS[2:] + ("N", "K", "stride_rm", "stride_om", "stride_pm", "NORM_GROUP")
                    cases.append(dict(
                        name=f"tma_linear[{name}{'+splitk' if split else ''} {dt}] {bm}x{bn}x{bk} w{warps} s{stages}",
                        fn=_tma_linear_kernel,
                        signature=sig, constexprs=consts, divisible=divisible, num_warps=warps, num_stages=stages,
                        expect_mma=True, expect_tma=True))
    return cases
