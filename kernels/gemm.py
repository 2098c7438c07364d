"""The fused GEMM every fastvlm op is built on: ``out = epilogue(prologue(A) @ W^T)``.

    A  [M, K]  activations, any strides (a view such as Qwen2-VL's free 2x2 merge ``x.view(-1, 4 * D)`` is read as is)
    W  [N, K]  an nn.Linear weight, any strides (never transposed or copied)

Prologue, applied to each A tile right after it is loaded (fp32 math, then cast back to A's dtype for the tensor
cores, which is where PyTorch rounds the norm's output too):
    NORM = "none" | "layernorm" | "rmsnorm"
    The statistics come from kernels/norm_stats.py, one (mean, rstd) per *norm row*. A norm row is ``NORM_GROUP``
    consecutive columns of A, so a norm over the unmerged width (Qwen2-VL: LayerNorm(1280) then view(-1, 5120)) and a
    norm over the full row (InternVL, Qwen3-VL post-shuffle) are the same code.
    "rmsnorm" reproduces the transformers RMSNorm cast point: ``w * (x * rstd).to(x.dtype)``.

Epilogue, on the fp32 accumulator:
    + bias -> [store the pre-activation, for backward] -> ACT -> [* (A @ Wup^T + bup): gated pair, SwiGLU]
    -> [+ residual] -> cast to out's dtype -> store

A-load hook: ``_load_a_tile`` produces each tile of the *logical* A from the stored tensor X. "strided" reads X as A;
"concat"/"concat_cm" gather the source rows of a space-to-depth merge (pixel shuffle) through a small int64 row
table; "mean" averages the rows of a pooling window as they are loaded. Patch embedding's im2col will be one more
branch. The K loop, prologue and epilogue are shared by all.

Numerics: fp32 accumulation always. fp32 inputs use ``PRECISION``: "tf32x3" by default (three TF32 tensor-core dots,
about fp32-accurate), "tf32" when torch allows TF32 (torch.backends.cuda.matmul.allow_tf32), "ieee" (FMA units) only
on request (``precision=`` or FASTVLM_FP32_PRECISION; fastvlm._hot.fp32_precision). All offsets are int64.
"""
import triton
import triton.language as tl

from fastvlm import _hot

from . import _launch
from ._interp import autotune_configs, dot_operand
from .activations import ACTIVATIONS, apply_act
from .gemm_configs import GEMM_CONFIGS, _prune_configs, _triton_configs  # noqa: F401  (GEMM_CONFIGS re-exported)
from .gemm_loads import _load_a_tile, _prologue_norm
from .gemm_tma_plan import make_call as tma_call, tma_core_reason
from .gemm_still import _still_frames_tile


@triton.autotune(configs=autotune_configs(_triton_configs()), key=["M_BUCKET", "N", "K", "A_MODE", "GATED", "NORM", "ACT", "HAS_AFFINE", "PIX_MASK", "STILL_T"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.heuristics({
    "NORM_ALIGNED": lambda args: args["NORM"] != "none" and args["NORM_GROUP"] % args["BLOCK_K"] == 0,
    "A_ALIGNED": lambda args: args["A_MODE"] == "concat" and args["D_SRC"] % args["BLOCK_K"] == 0,
})
@triton.jit
def _fused_linear_kernel(
    a_ptr,  # [M, K]
    w_ptr,  # [N, K]
    wu_ptr,  # [N, K] up weight of the gated pair (GATED); [N, STILL_T * K] the full kernel over time (STILL_T)
    bias_ptr,  # [N] (HAS_BIAS)
    bu_ptr,  # [N] bias of the up weight (GATED and HAS_BIAS)
    res_ptr,  # [M, N] residual (HAS_RES)
    out_ptr,  # [M, N]
    pre_ptr,  # [M, N] pre-activation (STORE_PRE)
    preu_ptr,  # [M, N] pre-activation of the up weight (STORE_PRE and GATED)
    mean_ptr,  # [M * K / NORM_GROUP] fp32 (NORM == "layernorm")
    rstd_ptr,  # [M * K / NORM_GROUP] fp32 (NORM != "none")
    nw_ptr,  # [NORM_GROUP] norm weight
    nb_ptr,  # [NORM_GROUP] norm bias (HAS_NORM_BIAS)
    rows_ptr,  # [M, Q] int64 source rows (A_MODE != "strided"); [M] element offsets ("separable")
    cols_ptr,  # [K] int64 element offsets inside a patch ("separable")
    sc_ptr,  # [K] fp32 per-column scale applied on load (HAS_AFFINE): pixel rescale and normalisation
    sh_ptr,  # [K] fp32 per-column shift (HAS_AFFINE)
    plim_ptr,  # [M] int32 (rows << 16 | cols) of patch m that lie inside its image (PIX_MASK)
    pk_ptr,  # [K] int32 (ki << 16 | kj) position of column k inside a patch (PIX_MASK)
    pos_ptr,  # [L, N] position table (HAS_POS)
    pos_rows_ptr,  # [M] or [M, POS_TAPS] int64 rows of the position table for each output row (HAS_POS)
    pos_w_ptr,  # [M, POS_TAPS] fp32 weight of each of those rows (HAS_POS and POS_TAPS > 0): interpolated tables
    out_rows_ptr,  # [M] int64 destination row of each output row (OUT_REMAP): leaves room for class tokens
    M, N, K, M_BUCKET, Q, D_SRC,
    stride_am, stride_ak, stride_wn, stride_wk, stride_wun, stride_wuk,
    stride_rm, stride_rn, stride_om, stride_on, stride_pm, stride_pn, stride_pos,
    NORM_GROUP,
    HAS_AFFINE: tl.constexpr, PIX_MASK: tl.constexpr, HAS_POS: tl.constexpr, POS_TAPS: tl.constexpr, OUT_REMAP: tl.constexpr,
    A_MODE: tl.constexpr, A_ALIGNED: tl.constexpr, NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
    NORM_ALIGNED: tl.constexpr, NORM_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr, STORE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STILL_T: tl.constexpr = 0,
):
    # grouped program order: GROUP_M row-tiles share each column-tile of W while it is in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_m
    pid_n = (pid % num_in_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    n_groups = K // NORM_GROUP

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        rk64 = rk.to(tl.int64)
        a, src, chan = _load_a_tile(a_ptr, rows_ptr, cols_ptr, rm64, rk, mask_m, mask_k, stride_am, stride_ak, Q,
                                    D_SRC, A_MODE, A_ALIGNED)
        if HAS_AFFINE:  # x * scale + shift per column (uint8 pixels -> normalised), then the weights' dtype
            sc = tl.load(sc_ptr + rk64, mask=mask_k, other=0.0)
            sh = tl.load(sh_ptr + rk64, mask=mask_k, other=0.0)
            a = a.to(tl.float32) * sc[None, :] + sh[None, :]
            if PIX_MASK:  # pixels outside the image are 0 after normalisation (the processor pads after it)
                lim = tl.load(plim_ptr + rm64, mask=mask_m, other=0)
                pk = tl.load(pk_ptr + rk64, mask=mask_k, other=0)
                inside = ((pk[None, :] >> 16) < (lim[:, None] >> 16)) & ((pk[None, :] & 0xFFFF) < (lim[:, None] & 0xFFFF))
                a = tl.where(inside, a, 0.0)
            a = a.to(w_ptr.dtype.element_ty)
        elif A_MODE == "separable" or A_MODE == "separable_mean":  # cast to the weights' dtype (as the conv input)
            a = a.to(w_ptr.dtype.element_ty)
        if NORM != "none":
            a = _prologue_norm(a, src, chan, rm64, rk, mask_m, mask_k, k0, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, n_groups,
                               NORM_GROUP, NORM, HAS_NORM_BIAS, NORM_ALIGNED, NORM_SRC)
        wmask = mask_k[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + rk64[:, None] * stride_wk + rn64[None, :] * stride_wn, mask=wmask, other=0.0)
        acc = tl.dot(dot_operand(a), dot_operand(w), acc, input_precision=PRECISION)
        if GATED:
            wu = tl.load(wu_ptr + rk64[:, None] * stride_wuk + rn64[None, :] * stride_wun, mask=wmask, other=0.0)
            acc_up = tl.dot(dot_operand(a), dot_operand(wu), acc_up, input_precision=PRECISION)
    if STILL_T > 0:  # a non-finite value in the tile: see the end
        still_odd = tl.max(tl.max(((acc != acc) | (tl.abs(acc) == float("inf"))).to(tl.int32), axis=1), axis=0) > 0

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if HAS_POS:
        if POS_TAPS == 0:  # a plain lookup (no weights; a single weighted tap takes the loop)
            prow = tl.load(pos_rows_ptr + rm64, mask=mask_m, other=0)
            acc += tl.load(pos_ptr + prow[:, None] * stride_pos + rn64[None, :], mask=omask, other=0.0).to(tl.float32)
        else:  # sum_t w[m, t] * pos[rows[m, t]] (Qwen3-VL's bilinear / bicubic table resampling), fp32
            for t in range(POS_TAPS):  # a loop, not unrolled: one tap's [BLOCK_M, BLOCK_N] pointers live at a time
                prow = tl.load(pos_rows_ptr + rm64 * POS_TAPS + t, mask=mask_m, other=0)
                pw = tl.load(pos_w_ptr + rm64 * POS_TAPS + t, mask=mask_m, other=0.0)
                acc += pw[:, None] * tl.load(pos_ptr + prow[:, None] * stride_pos + rn64[None, :], mask=omask,
                                             other=0.0).to(tl.float32)
    orow = rm64
    if OUT_REMAP:
        orow = tl.load(out_rows_ptr + rm64, mask=mask_m, other=0)
    if STORE_PRE:
        tl.store(pre_ptr + rm64[:, None] * stride_pm + rn64[None, :] * stride_pn,
                 acc.to(pre_ptr.dtype.element_ty), mask=omask)
    acc = apply_act(acc, ACT)
    if GATED:
        if HAS_BIAS:
            acc_up += tl.load(bu_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if STORE_PRE:
            tl.store(preu_ptr + rm64[:, None] * stride_pm + rn64[None, :] * stride_pn,
                     acc_up.to(preu_ptr.dtype.element_ty), mask=omask)
        acc = acc * acc_up
    if HAS_RES:
        acc += tl.load(res_ptr + rm64[:, None] * stride_rm + rn64[None, :] * stride_rn,
                       mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + orow[:, None] * stride_om + rn64[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=omask)
    if STILL_T > 0:
        # Still images: A read one frame against the time-summed kernel. With an Inf pixel x0 * (W0 + W1) can be Inf
        # where the original's x0 * W0 + x0 * W1 is NaN, so a tile that met a non-finite value (never on finite
        # inputs short of overflow) is computed again the original's way, every frame against its own kernel, in a
        # called function (the main tile's registers stay as they were), and stored over.
        if still_odd:
            _still_frames_tile(pid_m, pid_n, a_ptr, rows_ptr, wu_ptr, bias_ptr, pos_ptr, pos_rows_ptr, pos_w_ptr,
                               out_ptr, M, N, K, stride_ak, stride_wun, stride_wuk, stride_om, stride_on, stride_pos,
                               HAS_BIAS, HAS_POS, POS_TAPS, STILL_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


A_MODES = ("strided", "concat", "concat_cm", "mean", "max", "separable", "separable_mean")
NORMS = ("none", "layernorm", "rmsnorm", "rmsnorm_1p")


def logical_k(a, a_rows, a_mode, a_cols=None):
    """Width of the logical A read from ``a`` (see ``_load_a_tile``)."""
    if a_mode in ("concat", "concat_cm"):
        return a_rows.shape[1] * a.shape[1]
    if a_mode in ("separable", "separable_mean"):
        return a_cols.shape[0]
    return a.shape[1]


def fused_linear(a, weight, bias=None, *, act="none", up_weight=None, up_bias=None, residual=None,
                 norm="none", norm_group=None, mean=None, rstd=None, norm_weight=None, norm_bias=None, norm_src=False,
                 a_rows=None, a_mode="strided", a_cols=None, col_scale=None, col_shift=None, pix_limits=None,
                 pix_cols=None, pos=None, pos_rows=None, pos_weights=None, out_rows=None, store_pre=False, out_dtype=None, precision=None, config=None, out=None, pre=None, memo=None,
                 still_frames=0, full_weight=None):
    """Launch the fused GEMM. Returns ``out`` or ``(out, pre)`` when ``store_pre``.

    ``a_mode``/``a_rows``: how the logical A [M, K] is read from ``a`` (see ``_load_a_tile``); with a row table,
    M = a_rows.shape[0]. ``norm_src``: the statistics are per source row of ``a`` (norm before the merge).
    "separable" (im2col): ``a`` is any tensor (e.g. NCHW pixels, uint8 or float), ``a_rows`` [M] and ``a_cols`` [K]
    int64 element offsets; ``col_scale``/``col_shift`` [K] fp32 normalise each loaded value, and with int32
    ``pix_limits`` [M] (rows << 16 | cols of each patch inside its image) and ``pix_cols`` [K] (ki << 16 | kj of each
    column) values outside the image become 0 after normalising (a padded batch).
    Epilogue: ``pos`` [L, N] with ``pos_rows`` [M] adds a position-table row to each output row (with ``pos_rows``
    and fp32 ``pos_weights`` [M, taps]: the weighted sum of ``taps`` rows, an interpolated table); ``out_rows`` [M]
    sends output row m to row out_rows[m] of ``out`` (which must then be given, with room for prefix rows).
    ``out`` / ``pre``: optional preallocated [M, N] outputs (any strides), written in place.
    With a gated pair and ``store_pre``, ``pre`` is [M, 2N] in the layout of one Linear whose output is chunked into
    (up, gate) halves, as Aya Vision's SwiGLU does: ``pre[:, :N]`` = up pre-activation, ``pre[:, N:]`` = gate.
    ``still_frames`` = T > 1 with ``full_weight`` [N, T * K] (the kernel before its sum over time): still images,
    "separable" with ``a_rows`` the element offsets of X's rows and ``a_cols`` the first frame's columns, ``weight``
    the time-summed kernel; a tile that meets a non-finite value is computed again against ``full_weight`` over
    every frame (columns ``a_rows[m] + j * a.stride(1)``), so NaN and Inf land where the original's do.
    ``config``: an explicit (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuple that bypasses the autotuner
    (tests use it to cover every tile shape under the interpreter).
    ``memo``: a one-element list an op keeps for this call site under its own checked key (which fixes every
    argument's shape, strides, dtype and device, and the fp32 precision ``fastvlm._hot.fp32_precision`` picks): the checks of the
    first call are kept there and trusted on the next ones, without keying them again here.
    """
    import torch

    call = memo[0] if memo is not None else None
    if call is not None:
        if out is None and not store_pre and call.plan is not None:  # the repeat path of an op's call site
            M, N, out_dtype, _, device = call.info
            out = torch.empty(M, N, dtype=out_dtype, device=device)  # (ints, not a tuple: a faster parse)
            call.launch((a, weight, up_weight if full_weight is None else full_weight, bias, up_bias, residual, out,
                         None, None, mean, rstd, norm_weight,
                         norm_bias, a_rows, a_cols, col_scale, col_shift, pix_limits, pix_cols, pos, pos_rows,
                         pos_weights if pos is not None else None, out_rows))
            return out
        return _run(call, a, weight, bias, up_weight if full_weight is None else full_weight, up_bias, residual, out,
                    pre, mean, rstd, norm_weight, norm_bias, a_rows, a_cols, col_scale, col_shift, pix_limits, pix_cols,
                    pos, pos_rows, pos_weights, out_rows, store_pre)
    if precision is None:
        precision = _hot.fp32_precision() if a.dtype == torch.float32 else "ieee"  # (16-bit dots ignore it)
    if config is not None:
        config = tuple(config)
    key = (act, norm, norm_group, norm_src, a_mode, store_pre, out_dtype, precision, config, still_frames,
           full_weight is not None, _launch.tensors_key(a.device, (
        a, weight, up_weight, bias, up_bias, residual, out, pre, mean, rstd, norm_weight, norm_bias, a_rows, a_cols,
        col_scale, col_shift, pix_limits, pix_cols, pos, pos_rows, pos_weights, out_rows, full_weight)))
    call = _CALLS.get(key)
    if call is None:  # a new shape key: full validation and a launch plan (the same checks pass for the same key)
        call = _prepare(a, weight, bias, act=act, up_weight=up_weight, up_bias=up_bias, residual=residual,
                        norm=norm, norm_group=norm_group, mean=mean, rstd=rstd, norm_weight=norm_weight,
                        norm_bias=norm_bias, norm_src=norm_src, a_rows=a_rows, a_mode=a_mode, a_cols=a_cols,
                        col_scale=col_scale, col_shift=col_shift, pix_limits=pix_limits, pix_cols=pix_cols, pos=pos,
                        pos_rows=pos_rows, pos_weights=pos_weights, out_rows=out_rows, store_pre=store_pre,
                        out_dtype=out_dtype, precision=precision, config=config, out=out, pre=pre,
                        still_frames=still_frames, full_weight=full_weight)
        _launch.remember(_CALLS, key, call)
    if memo is not None:
        memo[0] = call
    return _run(call, a, weight, bias, up_weight if full_weight is None else full_weight, up_bias, residual, out, pre,
                mean, rstd, norm_weight, norm_bias, a_rows, a_cols, col_scale, col_shift, pix_limits, pix_cols, pos,
                pos_rows, pos_weights, out_rows, store_pre)


def _run(call, a, weight, bias, up_weight, up_bias, residual, out, pre, mean, rstd, norm_weight, norm_bias, a_rows,
         a_cols, col_scale, col_shift, pix_limits, pix_cols, pos, pos_rows, pos_weights, out_rows, store_pre):
    """Allocate the outputs and launch ``call`` (the checks of these arguments' key have passed)."""
    import torch

    M, N, out_dtype, gated, device = call.info
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=device)
    elif out.device != a.device:  # (the key holds a's device only)
        raise ValueError(f"fused_linear: out must be on {a.device}, got {out.device}")
    pre_gate = pre_up = None
    if store_pre:
        if pre is None:
            pre = torch.empty((M, 2 * N if gated else N), device=a.device, dtype=out_dtype)
        pre_gate, pre_up = (pre[:, N:], pre[:, :N]) if gated else (pre, None)
    if call.plan is not None:  # (None: nothing to compute, M or N is 0)
        # pointers the variant does not read are None (constexpr: not specialised, not launched)
        call.launch((a, weight, up_weight, bias, up_bias, residual, out, pre_gate, pre_up, mean, rstd, norm_weight,
                     norm_bias, a_rows, a_cols, col_scale, col_shift, pix_limits, pix_cols, pos, pos_rows,
                     pos_weights if pos is not None else None, out_rows))
    return (out, pre) if store_pre else out


def _Call(M, N, out_dtype, gated, device, ints=(), plan=None, grid=None):
    """What the checks of one shape key established: sizes, output dtype, a's device (part of the key), the integer
    arguments and the plan."""
    return _launch.Call(plan, grid, ints, info=(M, N, out_dtype, gated, device))


_CALLS = {}


def _prepare(a, weight, bias, *, act, up_weight, up_bias, residual, norm, norm_group, mean, rstd, norm_weight,
             norm_bias, norm_src, a_rows, a_mode, a_cols, col_scale, col_shift, pix_limits, pix_cols, pos, pos_rows,
             pos_weights, out_rows, store_pre, out_dtype, precision, config, out, pre, still_frames=0, full_weight=None):
    """Validate a new shape key of ``fused_linear`` (ValueError naming the argument at fault) and plan its launch."""
    import torch

    _check(a.dim() == 2 or a_mode in ("separable", "separable_mean"),
           f"fused_linear: a must be 2-D, got shape {tuple(a.shape)}")
    _check(a_mode in A_MODES, f"fused_linear: a_mode must be one of {A_MODES}, got {a_mode!r}")
    if a_mode == "separable":
        _check(a_rows is not None and a_rows.dim() == 1 and a_rows.dtype == torch.int64 and a_cols is not None
               and a_cols.dim() == 1 and a_cols.dtype == torch.int64,
               "fused_linear: a_mode 'separable' needs int64 a_rows [M] and a_cols [K] element offsets")
        _check((col_scale is None) == (col_shift is None), "fused_linear: give col_scale and col_shift together")
        _check((pix_limits is None) == (pix_cols is None) and (pix_limits is None or col_scale is not None),
               "fused_linear: pix_limits and pix_cols come together, with col_scale / col_shift")
        _check(pix_limits is None or (pix_limits.shape == a_rows.shape and pix_limits.dtype == torch.int32
                                      and pix_cols.shape == a_cols.shape and pix_cols.dtype == torch.int32),
               "fused_linear: pix_limits must be int32 [M] and pix_cols int32 [K]")
    elif a_mode == "separable_mean":
        _check(a_rows is not None and a_rows.dim() == 2 and a_rows.dtype == torch.int64 and a_rows.is_contiguous()
               and a_cols is not None and a_cols.dim() == 1 and a_cols.dtype == torch.int64,
               "fused_linear: a_mode 'separable_mean' needs a contiguous int64 a_rows [M, Q] (window element offsets) "
               "and int64 a_cols [K] (channel offsets)")
        _check(col_scale is None and a.is_floating_point(), "fused_linear: 'separable_mean' reads float maps only")
    elif a_mode != "strided":
        _check(a_rows is not None and a_rows.dim() == 2 and a_rows.dtype == torch.int64,
               f"fused_linear: a_mode {a_mode!r} needs a_rows, an int64 [M, Q] table of rows of a")
        _check(a_rows.is_contiguous(), "fused_linear: a_rows must be contiguous")
    K = logical_k(a, a_rows, a_mode, a_cols)
    M = a.shape[0] if a_mode == "strided" else a_rows.shape[0]
    if a_mode == "separable":
        _check(not norm_src and norm in ("none", "layernorm", "rmsnorm"), "fused_linear: im2col takes no norm_src")
    if a_mode in ("separable_mean", "max"):
        _check(norm == "none", f"fused_linear: {a_mode!r} takes no norm")
    _check(weight.dim() == 2 and weight.shape[1] == K,
           f"fused_linear: weight must be [N, {K}] to match the logical A [M, K], got {tuple(weight.shape)}")
    _check(act in ACTIVATIONS, f"fused_linear: act must be one of {ACTIVATIONS}, got {act!r}")
    _check(norm in NORMS, f"fused_linear: unknown norm {norm!r}")
    N = weight.shape[0]
    gated = up_weight is not None
    still = int(still_frames or 0)
    _check((still > 1) == (full_weight is not None) and (not still or (
        a_mode == "separable" and not gated and act == "none" and norm == "none" and col_scale is None
        and residual is None and not store_pre and out_rows is None and a.dim() == 2
        and full_weight.shape == (N, still * K) and full_weight.dtype == weight.dtype
        and full_weight.device == weight.device)),
        f"fused_linear: still_frames T > 1 comes with full_weight [{N}, T * {K}] of weight's dtype, a 'separable' "
        "2-D a and no activation, norm, affine, gate, residual, pre or out_rows")
    if gated:
        _check(up_weight.shape == weight.shape, f"fused_linear: up_weight must be {tuple(weight.shape)}, got {tuple(up_weight.shape)}")
        _check((bias is None) == (up_bias is None), "fused_linear: give both bias and up_bias, or neither")
    if bias is not None:
        _check(bias.shape == (N,), f"fused_linear: bias must be [{N}], got {tuple(bias.shape)}")
    if residual is not None:
        _check(residual.shape == (M, N), f"fused_linear: residual must be [{M}, {N}], got {tuple(residual.shape)}")
    if norm != "none":
        _check(norm_group is not None and norm_group > 0 and K % norm_group == 0,
               f"fused_linear: norm_group must divide K={K}, got {norm_group}")
        _check(not norm_src or (a_mode in ("concat", "concat_cm") and norm_group == a.shape[1]
                                and norm in ("layernorm", "rmsnorm")),
               "fused_linear: norm_src needs a space-to-depth a_mode and norm_group equal to a's width")
        rows = a.shape[0] if norm_src else M * (K // norm_group)
        _check(rstd is not None and rstd.shape == (rows,) and rstd.dtype == torch.float32,
               f"fused_linear: rstd must be fp32 [{rows}]")
        _check(norm != "layernorm" or (mean is not None and mean.shape == (rows,)), f"fused_linear: mean must be fp32 [{rows}]")
        _check(norm_weight is not None and norm_weight.shape == (norm_group,),
               f"fused_linear: norm_weight must be [{norm_group}]")
    out_dtype = out_dtype or (out.dtype if out is not None else
                              (weight.dtype if a_mode in ("separable", "separable_mean") else a.dtype))
    if out_rows is not None:
        _check(out is not None and out.dim() == 2 and out.shape[1] == N and out_rows.shape == (M,),
               "fused_linear: out_rows needs a preallocated 2-D out with N columns and out_rows [M]")
    elif out is not None:
        _check(out.shape == (M, N) and out.device == a.device, f"fused_linear: out must be [{M}, {N}] on {a.device}")
    taps = 0  # 0: pos_rows [M] without weights, a plain lookup
    if pos is not None and pos_weights is not None:
        taps = pos_weights.shape[-1]
        _check(pos_weights.shape == (M, taps) and pos_weights.dtype == torch.float32 and pos_weights.is_contiguous()
               and pos_rows is not None and pos_rows.shape == (M, taps) and pos_rows.dtype == torch.int64
               and pos_rows.is_contiguous(),
               f"fused_linear: pos_weights must be contiguous fp32 [{M}, taps] with int64 pos_rows of the same shape")
    elif pos is not None:
        _check(pos_rows is not None and pos_rows.shape == (M,),
               f"fused_linear: pos must come with pos_rows [{M}]")
    if pos is not None:
        _check(pos.dim() == 2 and pos.shape[1] == N and pos.stride(1) == 1,
               f"fused_linear: pos must be [L, {N}] with unit column stride, got {tuple(pos.shape)}")
    pre_width = 2 * N if gated else N
    _check(pre is None or pre.shape == (M, pre_width), f"fused_linear: pre must be [{M}, {pre_width}]")
    if out_rows is not None:
        _check(out.device == a.device, f"fused_linear: out must be on {a.device}")
    if M == 0 or N == 0:
        return _Call(M, N, out_dtype, gated, a.device)
    out_strides = out.stride() if out is not None else (N, 1)
    pre_strides = (pre.stride() if pre is not None else (pre_width, 1)) if store_pre else (None, None)
    uses_q = a_mode in ("concat", "concat_cm", "mean", "max", "separable_mean")
    # integer arguments; strides the variant does not read are None
    ints = (M, N, K, _launch.next_pow2(M), a_rows.shape[1] if uses_q else None, a.shape[1] if a_mode == "concat" else None,
            a.stride(0), a.stride(1) if a.dim() > 1 else 1, weight.stride(0), weight.stride(1),
            (up_weight if gated else full_weight).stride(0) if gated or still else None,
            (up_weight if gated else full_weight).stride(1) if gated or still else None,
            residual.stride(0) if residual is not None else None, residual.stride(1) if residual is not None else None,
            out_strides[0], out_strides[1], pre_strides[0], pre_strides[1], pos.stride(0) if pos is not None else None,
            norm_group if norm != "none" else K)
    flags = (col_scale is not None, pix_limits is not None, pos is not None, taps, out_rows is not None, a_mode, norm,
             norm_bias is not None, bool(norm_src), bias is not None, act, gated, residual is not None,
             bool(store_pre), precision, still)
    if config is None:  # the Hopper core (kernels/gemm_tma.py) where the layout allows; why not: gemm_tma_plan
        why = tma_core_reason(a, weight, flags, out_dtype, ints[-1])
        if not why:
            return tma_call((M, N, out_dtype, gated, a.device), M, N, K, ints[12:18], flags, ints[-1],
                            a.element_size(), a.device)
    key = (flags, ints[3], N, K, ints[-1], ints[5], a.dtype, weight.dtype, out_dtype, config)
    plan = _PLANS.get(key)
    if plan is None:
        if config is None:  # the autotuner chooses (on a GPU it times each config): it launches into scratch outputs
            out = out if out is not None else torch.empty((M, N), device=a.device, dtype=out_dtype)
            if store_pre and pre is None:
                pre = torch.empty((M, pre_width), device=a.device, dtype=out_dtype)
        pre_gate, pre_up = ((pre[:, N:], pre[:, :N]) if gated else (pre, None)) if store_pre else (None, None)
        args = (a, weight, up_weight if full_weight is None else full_weight, bias, up_bias, residual, out, pre_gate,
                pre_up, mean, rstd, norm_weight,
                norm_bias, a_rows, a_cols, col_scale, col_shift, pix_limits, pix_cols, pos, pos_rows,
                pos_weights if pos is not None else None, out_rows, *ints)
        plan = _gemm_plan(args, flags, config)
        _launch.remember(_PLANS, key, plan)  # (not while traced: a rule-chosen config)
    bm, bn = plan.meta
    return _Call(M, N, out_dtype, gated, a.device, ints, plan, (_launch.cdiv(M, bm) * _launch.cdiv(N, bn),))


_PLANS = {}
_FLAG_NAMES = ("HAS_AFFINE", "PIX_MASK", "HAS_POS", "POS_TAPS", "OUT_REMAP", "A_MODE", "NORM", "HAS_NORM_BIAS",
               "NORM_SRC", "HAS_BIAS", "ACT", "GATED", "HAS_RES", "STORE_PRE", "PRECISION", "STILL_T")


def _gemm_plan(args, flags, config):
    """The plan of a new key: ``config``, or the autotuner's choice (it runs once, through its own path, on
    ``args``), with the heuristics' values."""
    kw = dict(zip(_FLAG_NAMES, flags))
    M, N = args[23], args[24]
    assert len(_PTR_ARGS) == 23 and _launch.jit_function(_fused_linear_kernel).arg_names[23] == "M"
    if config is None:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        chosen = _launch.autotuned_config(_fused_linear_kernel, grid, args, kw)
    else:
        bm, bn, bk, warps, stages = config
        chosen = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    fn = _launch.jit_function(_fused_linear_kernel)
    named = {**dict(zip(fn.arg_names, args)), **kw, **chosen}
    kw.update(chosen)
    kw.update(_launch.heuristic_values(_fused_linear_kernel, named))
    return _launch.Plan(fn, kw, len(args), meta=(chosen["BLOCK_M"], chosen["BLOCK_N"]), n_ptr=23)


_PTR_ARGS = ("a_ptr", "w_ptr", "wu_ptr", "bias_ptr", "bu_ptr", "res_ptr", "out_ptr", "pre_ptr", "preu_ptr", "mean_ptr",
             "rstd_ptr", "nw_ptr", "nb_ptr", "rows_ptr", "cols_ptr", "sc_ptr", "sh_ptr", "plim_ptr", "pk_ptr", "pos_ptr", "pos_rows_ptr",
             "pos_w_ptr", "out_rows_ptr")




def audit_cases():
    """Every GEMM variant x config for the sm_90a audit (kernels/gemm_audit.py)."""
    from .gemm_audit import audit_cases as cases

    return cases()
