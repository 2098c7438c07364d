"""sm_90a audit cases of the attention kernel: the Q-Former and Perceiver tiles x every kept config (fastvlm audit)."""
import triton

from .attention import ATTN_CONFIGS, _attn_fwd_kernel, _config_ok

_PTR_ARGS = ("q_ptr", "k_ptr", "v_ptr", "k2_ptr", "v2_ptr", "km_ptr", "am_ptr", "o_ptr", "lse_ptr")


def _audit_case(vname, dt, prec, bq, heads, d, kmm, amm, expect_mma, bn, warps, stages, two=False, gqa=False):
    unit = ("stride_qd", "stride_kd", "stride_vd", "stride_kmn", "stride_amn", "stride_od", "stride_lm")
    if two:
        unit += ("stride_k2d", "stride_v2d")
    leading = ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
               "stride_vn", "stride_ob", "stride_om", "stride_oh", "stride_lb", "stride_lh")
    leading += (("stride_k2b", "stride_k2h", "stride_k2n", "stride_v2b", "stride_v2h", "stride_v2n") if two else
                ("stride_k2b", "stride_k2h", "stride_k2n", "stride_k2d", "stride_v2b", "stride_v2h", "stride_v2n",
                 "stride_v2d"))  # without a second source the launcher passes zeros
    masks = ("stride_kmb", "stride_amb", "stride_amh", "stride_amm")  # multiples of Lk (257): not divisible by 16
    sig = {name: f"*{dt}" for name in _PTR_ARGS}
    sig["lse_ptr"] = "*fp32"
    sig["km_ptr"] = "*i8" if kmm == "bool" else f"*{dt}"
    sig["am_ptr"] = "*i8" if amm == "bool" else f"*{dt}"
    ints = ("H", "LQ", "LK", "LK2", "D", "LK_BUCKET") + (("GROUP",) if gqa else ())
    for name in ints + leading + masks:
        sig[name] = "i32"
    sig["qk_scale"] = sig["inv_scale"] = "fp32"
    constexprs = {name: 1 for name in unit}
    if not gqa:
        constexprs["GROUP"] = 1  # the JIT specialises an int argument equal to 1
    constexprs.update(KEY_MASK=kmm, ATTN_MASK=amm, HAS_K2=two, PRECISION=prec, BLOCK_Q=bq, HEADS=heads,
                      BLOCK_D=triton.next_power_of_2(d), BLOCK_N=bn)
    for name in constexprs:
        sig[name] = "constexpr"
    divisible = _PTR_ARGS + ("LK_BUCKET",) + leading + (("D",) if d % 16 == 0 else ())  # GROUP (4) is not
    return dict(name=f"attention[{vname}] n{bn} w{warps} s{stages}", fn=_attn_fwd_kernel.fn, signature=sig,
                constexprs=constexprs, divisible=divisible, num_warps=warps, num_stages=stages, expect_mma=expect_mma)


AUDIT_VARIANTS = [  # (name, dtype, precision, BLOCK_Q, HEADS, D, KEY_MASK, ATTN_MASK, expect wgmma[, two sources,
    # grouped-query]); tiles as default_tile picks them
    ("bf16 q32x2h d64 keymask", "bf16", "ieee", 32, 2, 64, "bool", "none", True),  # BLIP-2 cross-attention
    ("bf16 q32x2h d64 additive", "bf16", "ieee", 32, 2, 64, "additive", "additive", True),
    ("bf16 q64x1h d64 fullmask", "bf16", "ieee", 64, 1, 64, "none", "bool", True),  # InstructBLIP self-attention
    ("bf16 q32x2h d128 keymask", "bf16", "ieee", 32, 2, 128, "bool", "none", True),
    ("bf16 q32x2h d80", "bf16", "ieee", 32, 2, 80, "none", "none", True),
    ("fp16 q16x4h d64 additive", "fp16", "ieee", 16, 4, 64, "additive", "none", True),
    ("fp32 tf32x3 q64x1h d64 keymask", "fp32", "tf32x3", 64, 1, 64, "bool", "none", True),  # the fp32 Q-Former
    ("fp32 tf32x3 q64x1h d64 fullmask", "fp32", "tf32x3", 64, 1, 64, "none", "additive", True),
    ("fp32 tf32x3 q32x2h d32", "fp32", "tf32x3", 32, 2, 32, "none", "none", True),
    ("fp32 tf32 q64x1h d64 keymask", "fp32", "tf32", 64, 1, 64, "bool", "none", True),
    ("fp32 tf32x3 q16x1h d128 keymask", "fp32", "tf32x3", 16, 1, 128, "bool", "none", False),  # mma.sync
    # Idefics2's Perceiver: 64 latents x 16 heads of 96 over concat(context, latents), 4 kv heads (GQA group 4)
    ("bf16 q64x1h d96 gqa two-source keymask", "bf16", "ieee", 64, 1, 96, "bool", "none", True, True, True),
    ("fp16 q64x1h d96 gqa two-source keymask", "fp16", "ieee", 64, 1, 96, "bool", "none", True, True, True),
    ("bf16 q64x1h d96 gqa two-source additive", "bf16", "ieee", 64, 1, 96, "additive", "additive", True, True, True),
    ("bf16 q32x2h d64 gqa two-source keymask", "bf16", "ieee", 32, 2, 64, "bool", "none", True, True, True),
    ("fp32 tf32 q64x1h d64 gqa two-source keymask", "fp32", "tf32", 64, 1, 64, "bool", "none", True, True, True),
    ("fp32 tf32x3 q16x1h d96 gqa two-source keymask", "fp32", "tf32x3", 16, 1, 96, "bool", "none", False, True,
     True),  # mma.sync (fp32 with D > 64)
]


def audit_cases():
    """Compile cases for ``fastvlm audit`` (sm_90): the Q-Former tiles (32 queries: 2 heads x 32 rows = a 64-row tile,
    which must reach wgmma), bf16/fp16 and fp32 (tf32, tf32x3), with and without masks, x every autotune config the
    pruner keeps for that tile. Specialisation as the JIT sees it for contiguous 16-aligned tensors: unit inner strides
    constexpr 1; pointers, D, LK_BUCKET and the Q/K/V/O/LSE leading strides divisible by 16."""
    cases = []
    for vname, dt, prec, bq, heads, d, kmm, amm, wgmma, *extra in AUDIT_VARIANTS:
        for bn, warps, stages in ATTN_CONFIGS:
            if _config_ok(bq * heads, heads * triton.next_power_of_2(d), bn, warps, dt == "fp32"):
                cases.append(_audit_case(vname, dt, prec, bq, heads, d, kmm, amm, wgmma, bn, warps, stages, *extra))
    return cases
