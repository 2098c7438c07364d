"""Image-token hand-off: write connector output rows into inputs_embeds at the image-token positions.

    out[r] = features[idx[r]]  where mask[r]   (idx = running count of image tokens before r)
    out[r] = embeds[r]         elsewhere

One pass over the rows, several rows per program; the features are cast to the embeddings' dtype as transformers
does before ``masked_scatter``. ``idx`` comes from a cumulative sum on the device (no host synchronisation).
"""
import triton
import triton.language as tl


@triton.jit
def _scatter_rows_kernel(
    emb_ptr,  # [R, D]
    feat_ptr,  # [N, D]
    idx_ptr,  # [R] int64: feature row for image-token rows
    mask_ptr,  # [R] uint8
    out_ptr,  # [R, D]
    R, D, stride_e, stride_f, stride_o,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < R
    rows64 = rows.to(tl.int64)
    is_img = tl.load(mask_ptr + rows64, mask=mr, other=0) != 0
    idx = tl.load(idx_ptr + rows64, mask=mr & is_img, other=0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mc = (cols < D)[None, :]
        e = tl.load(emb_ptr + rows64[:, None] * stride_e + cols[None, :], mask=mr[:, None] & mc & ~is_img[:, None],
                    other=0.0)
        f = tl.load(feat_ptr + idx[:, None] * stride_f + cols[None, :], mask=mr[:, None] & mc & is_img[:, None],
                    other=0.0)
        v = tl.where(is_img[:, None], f.to(out_ptr.dtype.element_ty), e.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], v, mask=mr[:, None] & mc)


def scatter_rows(embeds, mask, features):
    """embeds [R, D], mask [R] bool, features [N, D] -> new [R, D] (embeds' dtype)."""
    import torch

    R, D = embeds.shape
    out = torch.empty_like(embeds, memory_format=torch.contiguous_format)
    if R == 0:
        return out
    embeds = embeds if embeds.stride(1) == 1 else embeds.contiguous()
    features = features if features.stride(1) == 1 else features.contiguous()
    idx = torch.cumsum(mask.to(torch.int64), 0) - 1
    block_d = min(triton.next_power_of_2(D), 1024)
    block_r = max(1, min(16, 4096 // block_d))
    _scatter_rows_kernel[(triton.cdiv(R, block_r),)](
        embeds, features, idx, mask.to(torch.uint8), out, R, D, embeds.stride(0), features.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out


def audit_cases():
    return [dict(name="scatter_rows[bf16]", fn=_scatter_rows_kernel,
                 signature={"emb_ptr": "*bf16", "feat_ptr": "*bf16", "idx_ptr": "*i64", "mask_ptr": "*u8",
                            "out_ptr": "*bf16", "R": "i32", "D": "i32", "stride_e": "i32", "stride_f": "i32",
                            "stride_o": "i32", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                 constexprs={"BLOCK_R": 4, "BLOCK_D": 1024},
                 divisible=("emb_ptr", "feat_ptr", "idx_ptr", "out_ptr", "D", "stride_e", "stride_f", "stride_o"),
                 num_warps=4, num_stages=1, expect_mma=False)]
