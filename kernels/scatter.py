"""Image-token hand-off: write connector output rows into inputs_embeds at the image-token positions.

    out[r] = features[idx[r]]  where mask[r] and idx[r] < N   (idx = image tokens before r: csum[r] - 1)
    out[r] = NaN               where mask[r] and idx[r] >= N  (more image tokens than feature rows)
    out[r] = embeds[r]         elsewhere

One pass over the rows, several rows per program; the features are cast to the embeddings' dtype as transformers
does before ``masked_scatter``. ``csum`` is the inclusive cumulative sum of the mask on the device (no host
synchronisation; its last element is the image-token count the caller checks), the mask is read as bytes, and the
kernel never reads past the N feature rows whatever the count: the count itself is checked by the caller, on the
host whenever a synchronisation is acceptable (fastvlm.ops.scatter), and a mismatch left unchecked (CUDA graph
capture, torch.compile) shows as NaN rows instead of rows read out of bounds.
"""
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _scatter_rows_kernel(
    emb_ptr,  # [R, D]
    feat_ptr,  # [N, D]
    csum_ptr,  # [R] int64: inclusive running count of image tokens (feature row + 1 for image-token rows)
    mask_ptr,  # [R] uint8
    out_ptr,  # [R, D]
    R, D, N, stride_e, stride_f, stride_o,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < R
    rows64 = rows.to(tl.int64)
    is_img = tl.load(mask_ptr + rows64, mask=mr, other=0) != 0
    idx = tl.load(csum_ptr + rows64, mask=mr & is_img, other=1) - 1
    has_row = is_img & (idx < N)  # an image token beyond the last feature row gets NaN, never a read past it
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mc = (cols < D)[None, :]
        e = tl.load(emb_ptr + rows64[:, None] * stride_e + cols[None, :], mask=mr[:, None] & mc & ~is_img[:, None],
                    other=0.0)
        f = tl.load(feat_ptr + idx[:, None] * stride_f + cols[None, :], mask=mr[:, None] & mc & has_row[:, None],
                    other=float("nan"))
        v = tl.where(is_img[:, None], f.to(out_ptr.dtype.element_ty), e.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], v, mask=mr[:, None] & mc)


def scatter_rows(embeds, mask, features, csum=None):
    """embeds [R, D], mask [R] bool, features [N, D] -> new [R, D] (embeds' dtype). Image-token rows past the N
    feature rows are NaN (the caller checks the count). ``csum``: the mask's inclusive int64 cumulative sum, when the
    caller has it (its last element is the count)."""
    import torch

    R, D = embeds.shape
    out = torch.empty_like(embeds, memory_format=torch.contiguous_format)
    if R == 0:
        return out
    embeds = embeds if embeds.stride(1) == 1 else embeds.contiguous()
    features = features if features.stride(1) == 1 else features.contiguous()
    if csum is None:
        csum = torch.cumsum(mask, 0, dtype=torch.int64)
    mask = mask.view(torch.uint8)
    key = (R, D, features.shape[0], embeds.stride(0), features.stride(0), out.stride(0), embeds.dtype,
           features.dtype, out.dtype, csum.dtype, mask.dtype)
    call = _CALLS.get(key)
    if call is None:  # (the integer arguments and dtypes fix the plan and the kernel's specialisation but alignment)
        block_d = min(_launch.next_pow2(D), 1024)
        block_r = max(1, min(16, 4096 // block_d))
        consts = dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
        plan = _launch.simple_plan(_scatter_rows_kernel, 11, 5, consts, _PLANS, (block_r, block_d))
        call = _launch.Call(plan, (_launch.cdiv(R, block_r),), key[:6])
        _launch.remember(_CALLS, key, call)
    call.launch((embeds, features, csum, mask, out))
    return out


_CALLS = {}  # (sizes, strides, dtypes) -> Call
_PLANS = {}


def audit_cases():
    return [dict(name="scatter_rows[bf16]", fn=_scatter_rows_kernel,
                 signature={"emb_ptr": "*bf16", "feat_ptr": "*bf16", "csum_ptr": "*i64", "mask_ptr": "*u8",
                            "out_ptr": "*bf16", "R": "i32", "D": "i32", "N": "i32", "stride_e": "i32", "stride_f": "i32",
                            "stride_o": "i32", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                 constexprs={"BLOCK_R": 4, "BLOCK_D": 1024},
                 divisible=("emb_ptr", "feat_ptr", "csum_ptr", "out_ptr", "D", "stride_e", "stride_f", "stride_o"),
                 num_warps=4, num_stages=1, expect_mma=False)]
