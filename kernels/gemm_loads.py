"""The fused GEMM's A-load hook and norm prologue (@triton.jit helpers of kernels/gemm.py's kernel)."""
import triton
import triton.language as tl

@triton.jit
def _load_a_tile(a_ptr, rows_ptr, cols_ptr, rm64, rk, mask_m, mask_k, stride_am, stride_ak, Q, D_SRC,
                 A_MODE: tl.constexpr, A_ALIGNED: tl.constexpr):
    """Load the [BLOCK_M, BLOCK_K] tile of the logical A at rows rm, columns rk; also return the source row of each
    element and its channel within that row (for norms over source rows). A_MODE:
      "strided"    A[m, k] = X[m, k]
      "concat"     A[m, q*D + d] = X[rows[m, q], d]         space-to-depth, patch-major (Idefics3, InternVL, Llama 4)
      "concat_cm"  A[m, d*Q + q] = X[rows[m, q], d]         space-to-depth, channel-major (F.unfold: Mistral 3)
      "mean"       A[m, d]       = mean_q X[rows[m, q], d]  average pooling (Gemma 3); K == D
      "max"        A[m, d]       = max_q X[rows[m, q], d]   max pooling (LLaVA-NeXT-Video's pooler); K == D
      "separable"  A[m, k]       = X.flat[rows[m] + cols[k]]  im2col of a patch embedding: rows[m] is the element
                                 offset of patch m's corner, cols[k] that of pixel k inside a patch (any layout)
      "separable_mean"  A[m, k]  = mean_q X.flat[rows[m, q] + cols[k]]  average pooling of a feature map read in
                                 place (NCHW or any strides): rows[m, q] is the element offset of window element q
                                 of output token m at channel 0, cols[k] = channel k's offset; pooled value rounded
                                 to X's dtype as PyTorch's avg_pool2d does
    ``rows`` [M, Q] (int64 source-row indices) encodes grid shapes, merge order and ragged images."""
    mask = mask_m[:, None] & mask_k[None, :]
    rk64 = rk.to(tl.int64)
    chan = rk64
    if A_MODE == "separable":
        src = rm64[:, None] + 0 * rk64[None, :]
        roff = tl.load(rows_ptr + rm64, mask=mask_m, other=0)
        coff = tl.load(cols_ptr + rk64, mask=mask_k, other=0)
        a = tl.load(a_ptr + roff[:, None] + coff[None, :], mask=mask, other=0)
    elif A_MODE == "separable_mean":
        src = rm64[:, None] + 0 * rk64[None, :]
        coff = tl.load(cols_ptr + rk64, mask=mask_k, other=0)
        acc = tl.zeros(mask.shape, dtype=tl.float32)
        for q in range(0, Q):
            roff = tl.load(rows_ptr + rm64 * Q + q, mask=mask_m, other=0)
            acc += tl.load(a_ptr + roff[:, None] + coff[None, :], mask=mask, other=0.0).to(tl.float32)
        a = (acc / Q).to(a_ptr.dtype.element_ty)
    elif A_MODE == "strided":
        src = rm64[:, None] + 0 * rk64[None, :]
        a = tl.load(a_ptr + rm64[:, None] * stride_am + rk64[None, :] * stride_ak, mask=mask, other=0.0)
    elif A_MODE == "mean":
        acc = tl.zeros(mask.shape, dtype=tl.float32)
        for q in range(0, Q):
            tok = tl.load(rows_ptr + rm64 * Q + q, mask=mask_m, other=0)
            acc += tl.load(a_ptr + tok[:, None] * stride_am + rk64[None, :] * stride_ak, mask=mask,
                           other=0.0).to(tl.float32)
        a = (acc / Q).to(a_ptr.dtype.element_ty)  # PyTorch's AvgPool rounds the pooled value to the input dtype
        src = rm64[:, None] + 0 * rk64[None, :]
    elif A_MODE == "max":  # exact in any dtype: the maximum is one of the loaded values
        best = tl.full(mask.shape, float("-inf"), dtype=tl.float32)
        for q in range(0, Q):
            tok = tl.load(rows_ptr + rm64 * Q + q, mask=mask_m, other=0)
            v = tl.load(a_ptr + tok[:, None] * stride_am + rk64[None, :] * stride_ak, mask=mask, other=0.0)
            best = tl.maximum(best, v.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)  # NaN wins, as in torch
        a = tl.where(mask, best, 0.0).to(a_ptr.dtype.element_ty)
        src = rm64[:, None] + 0 * rk64[None, :]
    else:
        if A_MODE == "concat":
            q = rk64 // D_SRC
            d = rk64 % D_SRC
        else:  # "concat_cm"
            q = rk64 % Q
            d = rk64 // Q
        if A_ALIGNED:  # the whole K tile comes from one source row per output row
            tok = tl.load(rows_ptr + rm64 * Q + tl.min(q, axis=0), mask=mask_m, other=0)
            src = tok[:, None] + 0 * rk64[None, :]
        else:
            src = tl.load(rows_ptr + rm64[:, None] * Q + q[None, :], mask=mask, other=0)
        a = tl.load(a_ptr + src * stride_am + d[None, :] * stride_ak, mask=mask, other=0.0)
        chan = d
    return a, src, chan


@triton.jit
def _prologue_norm(a, src, chan, rm64, rk, mask_m, mask_k, k0, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, n_groups, NORM_GROUP,
                   NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, NORM_ALIGNED: tl.constexpr,
                   NORM_SRC: tl.constexpr):
    xf = a.to(tl.float32)
    if NORM_SRC:
        # statistics belong to the gathered source rows (a norm over each patch before the space-to-depth merge)
        smask = mask_m[:, None] & mask_k[None, :]
        rs = tl.load(rstd_ptr + src, mask=smask, other=0.0)
        if NORM == "layernorm":
            mu = tl.load(mean_ptr + src, mask=smask, other=0.0)
    elif NORM_ALIGNED:
        # the whole K tile lies in one norm group: one statistic per row
        sidx = rm64 * n_groups + k0 // NORM_GROUP
        rs = tl.load(rstd_ptr + sidx, mask=mask_m, other=0.0)[:, None]
        if NORM == "layernorm":
            mu = tl.load(mean_ptr + sidx, mask=mask_m, other=0.0)[:, None]
    else:
        sidx = rm64[:, None] * n_groups + (rk // NORM_GROUP)[None, :]
        smask = mask_m[:, None] & mask_k[None, :]
        rs = tl.load(rstd_ptr + sidx, mask=smask, other=0.0)
        if NORM == "layernorm":
            mu = tl.load(mean_ptr + sidx, mask=smask, other=0.0)
    if NORM_SRC:
        wcol = chan
    else:
        wcol = rk % NORM_GROUP
    nw = tl.load(nw_ptr + wcol, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    if NORM == "layernorm":
        y = (xf - mu) * rs * nw
        if HAS_NORM_BIAS:
            y += tl.load(nb_ptr + wcol, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    elif NORM == "rmsnorm_1p":  # Gemma: fp32 x * rstd * (1 + w), one cast at the end
        y = xf * rs * (1.0 + nw)
    else:  # rmsnorm, transformers cast point: weight * (x * rstd).to(input dtype)
        y = (xf * rs).to(a.dtype).to(tl.float32) * nw
    return y.to(a.dtype)
