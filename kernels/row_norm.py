"""In-place LayerNorm or RMSNorm over whole rows of a freshly written GEMM output (the pre-norm of a patch embedding).

    x[r, :] = (x[r, :] - mean_r) * rstd_r * w + b        r < R, fp32 statistics, result rounded to x's dtype
    x[r, :] = x[r, :] * rstd_r * w                       RMS: rstd_r = 1 / sqrt(mean(x[r]^2) + eps) (Pixtral ln_pre)

Used by ``fastvlm::patch_embed`` right after its GEMM (and the class-token rows) when a pre-norm is fused (CLIP's
``pre_layrnorm``, timm's ``norm_pre``). The GEMM's N tiles are spread over programs, so no program sees a whole row
in its epilogue; this second pass reads each row once (from L2 for a typical image: 577 x 1024 x 2 bytes) and writes
it back in place, so no second [tokens, D] buffer is allocated. Each program owns BLOCK_R whole rows held in
registers (BLOCK_C >= D), so mean and variance are two exact sweeps over registers, not a sum of squares.
The input is read as stored (already rounded to its dtype by the GEMM), which is where eager PyTorch rounds the
embedding before its LayerNorm.
"""
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _row_norm_kernel(
    x_ptr,  # [R, C] rows, unit column stride; normalised in place
    w_ptr,  # [C]
    b_ptr,  # [C] (unused without HAS_BIAS)
    R,
    C,
    stride_r,
    eps,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask_r = rows < R
    mask_c = cols < C
    m = mask_r[:, None] & mask_c[None, :]
    ptrs = x_ptr + rows[:, None] * stride_r + cols[None, :]
    x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    n = C.to(tl.float32)
    if RMS:
        d = x  # (masked lanes were loaded as 0)
    else:
        mean = tl.sum(x, axis=1) / n
        d = tl.where(m, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / n
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(ptrs, y.to(x_ptr.dtype.element_ty), mask=m)


def _blocks(C):
    block_c = _launch.next_pow2(C)
    block_r = max(1, min(16, 4096 // block_c))
    return block_r, block_c


def row_norm_(x, weight, bias, eps, *, rms=False, block_r=None):
    """Normalise the rows of the 2-D ``x`` [R, C] (unit column stride) in place (LayerNorm, or RMSNorm with
    ``rms``: no centring, no bias); returns ``x``."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"row_norm_: x must be 2-D with unit column stride, got {tuple(x.shape)} {x.stride()}")
    R, C = x.shape
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"row_norm_: weight/bias must be [{C}]")
    if rms and bias is not None:
        raise ValueError("row_norm_: an RMSNorm has no bias")
    br, bc = _blocks(C)
    br = block_r or br
    if R == 0:
        return x
    _launch.run(_row_norm_kernel, (_launch.cdiv(R, br),),
                (x, weight, bias if bias is not None else weight, R, C, x.stride(0), float(eps)),
                HAS_BIAS=bias is not None, RMS=bool(rms), BLOCK_R=br, BLOCK_C=bc, num_warps=4 if bc * br <= 4096 else 8)
    return x


def audit_cases():
    """Compile cases for ``fastvlm audit`` (sm_90): the in-place LayerNorm at CLIP-L (1024) and SigLIP (1152)
    widths, the RMSNorm at Pixtral's (1024)."""
    cases = []
    for C, rms in ((1024, False), (1152, False), (1024, True)):
        br, bc = _blocks(C)
        cases.append(dict(
            name=f"row_norm[C={C}{',rms' if rms else ''}]",
            fn=_row_norm_kernel,
            signature={"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "R": "i32", "C": "i32", "stride_r": "i32",
                       "eps": "fp32", "HAS_BIAS": "constexpr", "RMS": "constexpr", "BLOCK_R": "constexpr",
                       "BLOCK_C": "constexpr"},
            constexprs={"HAS_BIAS": not rms, "RMS": rms, "BLOCK_R": br, "BLOCK_C": bc},
            divisible=("x_ptr", "w_ptr", "b_ptr", "C", "stride_r"),
            num_warps=4, num_stages=1, expect_mma=False,
        ))
    return cases
