"""``out = LayerNorm(a @ W^T + bias + residual)`` over full rows in one kernel (BERT SelfOutput / Output, i.e. every
``dense -> dropout -> LayerNorm(h + input)`` of the Q-Former).

    a        [M, K]  activations, any strides
    W        [N, K]  an nn.Linear weight, any strides (never transposed or copied)
    residual [M, N]  any strides
    out      [M, N]  any strides (may not alias a or residual)

Each program owns BLOCK_M whole rows, so the LayerNorm needs no cross-program reduction:

    pass 1  for each BLOCK_N chunk of the row: K loop of dots (fp32 accumulator), + bias + residual, store the
            pre-norm chunk into ``out`` (the output buffer doubles as scratch), fold the chunk's fp32 mean and M2
            into the row's running statistics (Chan's pairwise merge: no sum-of-squares cancellation when
            |mean| >> std)
    barrier every thread of the program sees pass 1's stores (the load layout need not be the store layout)
    pass 2  reload the chunks this program wrote, normalise in fp32, * ln_weight + ln_bias, store

Only the program that wrote a chunk reads it back, so there are no races between programs. The price: the grid is
cdiv(M, BLOCK_M) programs (1 program for one 32-query BLIP-2 image, 4 for eight). Where those programs fill less than
SINGLE_PASS_MIN_FILL of the SMs' waves, the launcher runs the split-N variant (kernels/linear_norm_split.py: an
[M tiles x N tiles] grid writing per-tile row statistics, then a light normalising launch) instead; see
docs/design-qformer.md for the byte and grid arithmetic.

Numerics: fp32 accumulation and statistics; the pre-norm value is rounded once to ``out``'s dtype between the passes
(eager rounds dense's output and the residual sum). fp32 inputs use ``PRECISION`` "tf32x3" (about fp32-accurate on
tensor cores; the default), "tf32" (when torch allows TF32) or "ieee" (FMA; on request: ``precision=`` or
FASTVLM_FP32_PRECISION, see fastvlm._hot.fp32_precision). 16-bit inputs go to the tensor cores as they are. All
offsets are int64.
"""
import triton
import triton.language as tl

from . import _launch
from ._interp import autotune_configs
from .gemm_configs import SMEM_BUDGET, fit_stages, smem_budget
from .linear_norm_split import (FIN_M, FIN_N_MAX, SPLIT_CONFIGS, _linear_norm_finish_kernel, _pre_norm_tile,
                                _linear_norm_tile_kernel)
from fastvlm import _hot

FP32_PRECISIONS = ("tf32x3", "tf32", "ieee")

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first one is what the interpreter runs. 64-row tiles are
# one warpgroup (wgmma). fp32 (tf32x3 keeps hi/lo halves of both operands in registers) only takes the "fp32" rows.
LN_CONFIGS = [
    (64, 64, 32, 4, 3),  # fp32 and 16-bit
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (64, 256, 64, 8, 3),
    (64, 32, 32, 4, 4),  # fp32
    (64, 64, 32, 4, 4),  # fp32
]
BLOCK_M = 64  # every config's row tile (one wgmma warpgroup): the variant is chosen before the autotuner runs
assert all(c[0] == BLOCK_M for c in LN_CONFIGS + SPLIT_CONFIGS)
SINGLE_PASS_MIN_FILL = 0.85  # below this SM fill of its cdiv(M, 64) programs, the split-N variant runs
H100_SMS = 132  # the SM count off CUDA (the interpreter, the compile-only audit): H100 and H200 both have 132
_DEVICE_SMS = {}


def single_pass_fill(M, sms, block_m=BLOCK_M):
    """The mean fraction of ``sms`` SMs the single-pass grid (cdiv(M, block_m) programs) keeps busy over its waves."""
    tiles = -(-M // block_m)
    return tiles / (-(-tiles // sms) * sms)


def num_sms(t):
    """Streaming multiprocessors of the device of tensor ``t`` (read once per device); H100_SMS off CUDA."""
    idx = t.get_device() if hasattr(t, "get_device") else -1
    if idx < 0:
        return H100_SMS
    sms = _DEVICE_SMS.get(idx)
    if sms is None:
        import torch

        sms = _DEVICE_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return sms


def _config_ok(bm, bn, bk, warps, stages, elem_bytes, smem=SMEM_BUDGET):
    """Whether a config fits: pipeline buffers within ``smem`` bytes (the launch device's ``smem_budget``), and the
    audit's register limits."""
    if (bm * bk + bk * bn) * elem_bytes * stages > smem:
        return False
    if elem_bytes == 4:  # tf32x3: the audit spills beyond a 64x64 accumulator and BLOCK_K 32
        return bm * bn <= 64 * 64 and bk <= 32 and warps == 4
    return True


def _prune_configs(configs, named_args, **kwargs):
    a = named_args["a_ptr"]
    elem = a.element_size() if hasattr(a, "element_size") else 2
    smem = smem_budget(a)
    kept = [c for c in configs if _config_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                             c.num_warps, c.num_stages, elem, smem)]
    if kept:
        return kept
    first = configs[0]
    return [fit_stages(first, (first.kwargs["BLOCK_M"] + first.kwargs["BLOCK_N"]) * first.kwargs["BLOCK_K"] * elem,
                       smem)]


def _triton_configs(configs=LN_CONFIGS):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in configs]


@triton.jit
def _linear_norm_body(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, lnw_ptr, lnb_ptr, M, N, K, eps,
                      stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rm64 = rm.to(tl.int64)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # pass 1: GEMM chunk + bias + residual -> out (pre-norm), running statistics
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rn64 = rn.to(tl.int64)
        acc = _pre_norm_tile(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, rm64, mask_m, rn64, mask_n, K,
                             stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                             HAS_BIAS, HAS_RES, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        # the chunk's statistics, merged into the row's (Chan et al.): exact for any |mean| / std ratio
        nc = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
        seen = n0 * 1.0
        total = seen + nc
        cmean = tl.sum(tl.where(mask_n[None, :], acc, 0.0), axis=1) / nc
        d = tl.where(mask_n[None, :], acc - cmean[:, None], 0.0)
        cm2 = tl.sum(d * d, axis=1)
        delta = cmean - mean
        mean += delta * (nc / total)
        m2 += cm2 + delta * delta * (seen * nc / total)

    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    tl.debug_barrier()  # pass 1's stores are visible to every thread of this program

    # pass 2: normalise the chunks this program wrote
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rn64 = rn.to(tl.int64)
        omask = mask_m[:, None] & mask_n[None, :]
        optrs = out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on
        h = tl.load(optrs, mask=omask, other=0.0).to(tl.float32)
        lw = tl.load(lnw_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)
        y = (h - mean[:, None]) * rstd[:, None] * lw[None, :]
        if HAS_LN_BIAS:
            y += tl.load(lnb_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.autotune(configs=autotune_configs(_triton_configs()), key=["M_BUCKET", "N", "K", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _linear_norm_kernel(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, lnw_ptr, lnb_ptr, M, N, K, M_BUCKET, eps,
                        stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    _linear_norm_body(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, lnw_ptr, lnb_ptr, M, N, K, eps,
                      stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                      HAS_BIAS, HAS_RES, HAS_LN_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


_linear_norm_tile_tuned = triton.autotune(
    configs=autotune_configs(_triton_configs(SPLIT_CONFIGS)), key=["M_BUCKET", "N", "K", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs})(_linear_norm_tile_kernel)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def linear_norm(a, weight, bias=None, residual=None, ln_weight=None, ln_bias=None, eps=1e-12, *, precision=None,
                config=None, split=None, out=None):
    """Launch ``LayerNorm(a @ weight^T + bias + residual) * ln_weight + ln_bias`` over rows of N; returns ``out``.

    ``precision`` (fp32 only): "tf32x3" (default), "tf32" (default when torch allows TF32), "ieee"; unset, it is
    ``fastvlm._hot.fp32_precision()`` (FASTVLM_FP32_PRECISION when set). ``split``: None picks the variant (the
    split-N one when the single pass's cdiv(M, 64) programs fill under SINGLE_PASS_MIN_FILL of the device's SMs),
    True / False force it. ``config``: an explicit (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) bypassing the
    autotuner, for either variant (tests cover every tile shape this way under the interpreter).
    """
    import torch

    if a.dtype != torch.float32:
        precision = "ieee"  # ignored by 16-bit dots
    elif precision is None:
        precision = _hot.fp32_precision()
    if config is not None:
        config = tuple(config)
    key = (eps, precision, config, split,
           _launch.tensors_key(a.device, (a, weight, bias, residual, ln_weight, ln_bias, out)))
    call = _CALLS.get(key)
    if call is None:  # a new shape key: the checks (the same ones pass for the same key) and the launch plan
        call = _prepare(a, weight, bias, residual, ln_weight, ln_bias, eps, precision, config, split, out)
        _launch.remember(_CALLS, key, call)
    if out is None:
        out = torch.empty(call.info, device=a.device, dtype=a.dtype)
    elif out.device != a.device:
        raise ValueError(f"linear_norm: out must be on {a.device}, got {out.device}")
    if call.plan is not None:  # (None: nothing to compute)
        call.launch((a, weight, bias, residual, out, ln_weight, ln_bias))
    return out


_CALLS = {}
_PLANS = {}


class _SplitCall:
    """The split-N variant's two launches for one call key: the tile GEMM + partial statistics into a fresh fp32
    workspace [2, T, M], then the normalising pass over ``out``."""

    __slots__ = ("plan", "tile", "finish", "ws_numel", "info")

    def __init__(self, tile, finish, ws_numel, info):
        self.plan, self.tile, self.finish, self.ws_numel, self.info = tile.plan, tile, finish, ws_numel, info

    def launch(self, tensors):
        import torch

        a, weight, bias, residual, out, ln_weight, ln_bias = tensors
        ws = torch.empty(self.ws_numel, device=a.device, dtype=torch.float32)
        self.tile.launch((a, weight, bias, residual, out, ws))
        self.finish.launch((out, ws, ln_weight, ln_bias))


def _prepare(a, weight, bias, residual, ln_weight, ln_bias, eps, precision, config, split, out):
    import torch

    _check(a.dim() == 2, f"linear_norm: a must be 2-D [M, K], got shape {tuple(a.shape)}")
    M, K = a.shape
    _check(weight.dim() == 2 and weight.shape[1] == K,
           f"linear_norm: weight must be [N, {K}], got {tuple(weight.shape)}")
    N = weight.shape[0]
    _check(bias is None or bias.shape == (N,), f"linear_norm: bias must be [{N}]")
    _check(residual is None or residual.shape == (M, N), f"linear_norm: residual must be [{M}, {N}]")
    _check(ln_weight is not None and ln_weight.shape == (N,), f"linear_norm: ln_weight must be [{N}]")
    _check(ln_bias is None or ln_bias.shape == (N,), f"linear_norm: ln_bias must be [{N}]")
    _check(out is None or out.shape == (M, N), f"linear_norm: out must be [{M}, {N}]")
    if M == 0 or N == 0:
        return _launch.Call(info=(M, N))
    _check(precision in FP32_PRECISIONS or a.dtype != torch.float32,
           f"linear_norm: precision must be one of {FP32_PRECISIONS}")
    out_strides = out.stride() if out is not None else (N, 1)
    res_strides = residual.stride() if residual is not None else (None, None)  # (None: not specialised, not launched)
    config_kw = None
    if config is not None:
        bm, bn, bk, warps, stages = config
        config_kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if split is None:
        split = single_pass_fill(M, num_sms(a), config[0] if config else BLOCK_M) < SINGLE_PASS_MIN_FILL
    if split:
        return _prepare_split(a, weight, bias, residual, ln_bias, eps, precision, config, config_kw, out,
                              out_strides, res_strides)
    ints = (M, N, K, _launch.next_pow2(M), float(eps), a.stride(0), a.stride(1), weight.stride(0), weight.stride(1),
            *res_strides, *out_strides)
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_LN_BIAS=ln_bias is not None,
                 PRECISION=precision)

    def make_args():  # for the autotuner's one run (on a GPU it times each config): out, or a scratch output
        scratch = out if out is not None else torch.empty((M, N), device=a.device, dtype=a.dtype)
        return (a, weight, bias, residual, scratch, ln_weight, ln_bias, *ints)

    plan = _launch.tuned_plan(_linear_norm_kernel, lambda meta: (_launch.cdiv(M, meta["BLOCK_M"]),), make_args, flags,
                              config_kw, 7, _PLANS, (tuple(flags.values()), ints[3], N, K, a.dtype, config))
    return _launch.Call(plan, (_launch.cdiv(M, plan.meta["BLOCK_M"]),), ints, info=(M, N))


def _prepare_split(a, weight, bias, residual, ln_bias, eps, precision, config, config_kw, out, out_strides,
                   res_strides):
    import torch

    (M, K), N = a.shape, weight.shape[0]
    ints = (M, N, K, _launch.next_pow2(M), a.stride(0), a.stride(1), weight.stride(0), weight.stride(1),
            *res_strides, *out_strides)
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, PRECISION=precision)
    most_tiles = max(_launch.cdiv(N, c[1]) for c in SPLIT_CONFIGS + ([config] if config else []))

    def make_args():  # the autotuner's run: scratch output and a workspace for the narrowest tiles
        scratch = out if out is not None else torch.empty((M, N), device=a.device, dtype=a.dtype)
        ws = torch.empty(2 * most_tiles * M, device=a.device, dtype=torch.float32)
        return (a, weight, bias, residual, scratch, ws, *ints)

    grid_of = lambda meta: (_launch.cdiv(M, meta["BLOCK_M"]) * _launch.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    plan = _launch.tuned_plan(_linear_norm_tile_tuned, grid_of, make_args, flags, config_kw, 6, _PLANS,
                              ("split", tuple(flags.values()), ints[3], N, K, a.dtype, config))
    tile = _launch.Call(plan, grid_of(plan.meta), ints)
    fin_n = min(_launch.next_pow2(N), FIN_N_MAX)
    consts = dict(HAS_LN_BIAS=ln_bias is not None, TILE_N=plan.meta["BLOCK_N"], FIN_M=FIN_M, FIN_N=fin_n,
                  num_warps=4, num_stages=1)
    fplan = _launch.simple_plan(_linear_norm_finish_kernel, 9, 4, consts, _PLANS, ("finish", *consts.items()))
    finish = _launch.Call(fplan, (_launch.cdiv(M, FIN_M) * _launch.cdiv(N, fin_n),),
                          (M, N, float(eps), *out_strides))
    return _SplitCall(tile, finish, 2 * _launch.cdiv(N, plan.meta["BLOCK_N"]) * M, (M, N))


_PTR_ARGS = ("a_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr", "lnw_ptr", "lnb_ptr")


def audit_cases():
    """Both variants x every config for the sm_90a audit (kernels/linear_norm_audit.py)."""
    from .linear_norm_audit import audit_cases as cases

    return cases()
