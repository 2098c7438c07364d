"""Flash-style attention forward for short queries over a few hundred keys (BLIP-2 / InstructBLIP Q-Former,
Idefics2's Perceiver resampler).

    Q [B, H, Lq, D], K/V [B, Hkv, Lk, D]  any strides (the transposed views of a projection's [B, L, H*D] output are
                                        read in place; a stride-0 expanded batch works too). Hkv divides H:
                                        grouped-query attention, query head h reads kv head h // (H / Hkv)
    K2/V2 [B, Hkv, Lk2, D] (HAS_K2)     a second key/value source whose keys follow K's: the softmax runs over
                                        concat(K, K2) without building it (Idefics2: context keys, then latent keys);
                                        the key mask covers K only, a full mask indexes K2's keys at Lk + n
    O [B, Lq, H, D]                     the layout transformers' attention functions return, so the following dense
                                        layer reads ``O.view(B, Lq, H*D)`` without a transpose copy
    LSE [B, H, Lq] fp32                 natural-log log-sum-exp of each score row, for the backward pass

Scores ``S = scale * Q K^T + masks``; masks (both optional, combined):
    key_mask   [B, Lk]  per-key padding (transformers' encoder_attention_mask before expansion); KEY_MASK:
                        "bool"     nonzero = attend, zero = padding (stored as int8; the launcher views bool as int8)
                        "additive" a float bias added to the scores (0 / large negative)
    attn_mask  [B|1, H|1, Lq|1, Lk]  a full mask, broadcast by stride 0 (InstructBLIP's self-attention over
                        queries + instruction tokens; transformers' 4-D masks); ATTN_MASK "bool" or "additive"
Boolean-masked and out-of-range keys get -inf. Special values give what eager attention gives (details in
kernels/attention_tile.py, which holds the kernel's body): a finite additive bias at or below the masking value
(transformers' ``finfo.min``) absorbs the score, so a row masked entirely by it averages its values; -inf and NaN
biases are kept; a row whose kept keys all score -inf, or that meets a NaN, is NaN; a row whose keep-flags keep no key
(or Lk + Lk2 == 0) gives O = 0 and LSE = -inf, as SDPA does. A NaN/Inf key of one packed head never reaches the other
heads' rows (see the head isolation in ``_attn_fwd_kernel``). The full mask enters as the accumulator of the Q K^T
dot, which keeps the softmax in the MMA layout (see docs/design-attention.md).

Head packing (the M tile): one program owns ``HEADS`` consecutive heads x ``BLOCK_Q`` queries of one batch row, so
the tile has ``BLOCK_M = HEADS * BLOCK_Q`` rows: 2 x 32 = 64 for BLIP-2's 32 queries, which reaches wgmma on sm_90
(one warpgroup), where 32 rows only reach mma.sync. Each head has its own K and V, so the packed heads are multiplied
block-diagonally along the head dimension (columns ``c = h' * BLOCK_D + d``):

    Qbd [BLOCK_M, HEADS*BLOCK_D]   row (h, q) holds Q[b, h, q, :] in column block h, zeros elsewhere
    K^T [HEADS*BLOCK_D, BLOCK_N]   all packed heads' keys of BLOCK_N key positions
    S   = Qbd @ K^T                [BLOCK_M, BLOCK_N]: row (h, q) only meets head h's keys
    acc += P @ V                   [BLOCK_M, HEADS*BLOCK_D]; only the diagonal block of each row is stored

The MMAs do HEADS x the useful work (the same as padding 32 queries to a 64-row tile), but softmax/exp2 work is not
duplicated and programs = B * ceil(H / HEADS) * ceil(Lq / BLOCK_Q). ``HEADS = 1, BLOCK_Q = 64`` (pad instead of pack)
is also a valid config; fp32 (tf32x3 keeps operand halves in registers) packs only while HEADS * BLOCK_D <= 64.
D is padded to ``BLOCK_D = next_power_of_2(D)`` with masks (72, 80, 96 -> 128).

Numerics: fp32 statistics and accumulator; exp2 with ``scale * log2(e)`` folded into one multiply of the fp32 scores;
P is cast to the input dtype for the P @ V MMA (where eager attention rounds its softmax output too). fp32 inputs use
``PRECISION``: "tf32x3" (about fp32-accurate) unless TF32 is allowed (then "tf32", as kernels/gemm.py follows
torch.backends.cuda.matmul.allow_tf32); "ieee" FMA dots spill on sm_90. All offsets are int64.
"""
import triton
import triton.language as tl

from fastvlm import _hot

from . import _launch
from ._interp import autotune_configs
from .attention_tile import attend_tile, eager_rounded_rows, nan_unscored_rows

MASK_MODES = ("none", "bool", "additive")
# fp32 dots: "tf32x3" (three TF32 MMAs, about fp32-accurate; the default) or "tf32" (when TF32 is allowed). "ieee"
# runs the dots on FMA units and spills tens of KB per thread on sm_90 (audit), so it is not offered.
FP32_PRECISIONS = ("tf32", "tf32x3")
HEAD_DIMS = (16, 128)  # supported D range (inclusive); BLOCK_D = next_power_of_2(D)

# (BLOCK_N, num_warps, num_stages); the first one is what the interpreter runs. BLOCK_Q / HEADS come from the
# launcher (``default_tile``: they depend on Lq, H, D and the dtype, not on timing); ``_config_ok`` keeps the configs
# that compile without spills for that tile (audit_cases).
ATTN_CONFIGS = [
    (64, 4, 2),
    (64, 4, 3),
    (64, 8, 2),
    (128, 8, 2),
    (32, 4, 2),  # fp32 (tf32x3 splits every operand into hi/lo halves in registers)
    (32, 4, 3),
]


def _config_ok(block_m, block_c, block_n, warps, fp32):
    """Whether a config compiles without spills on sm_90 for a [block_m, block_c] accumulator tile. From the audit
    (ptxas, every mask mode): 16-bit inputs spill at 64x128 with BLOCK_N=128 on 4 warps, and at 64x256 with anything
    but BLOCK_N=64 on 8 warps; fp32 (tf32x3) spills beyond 64x64 accumulators or BLOCK_N > 32."""
    acc = block_m * block_c
    if fp32:
        return block_n == 32 and warps == 4 and acc <= 64 * 64
    if block_n < 64:
        return False
    if acc <= 64 * 128:
        return not (block_n == 128 and warps == 4)
    return acc <= 64 * 256 and block_n == 64 and warps == 8


def _triton_configs():
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in ATTN_CONFIGS]


def _prune_configs(configs, named_args, **kwargs):
    q = named_args["q_ptr"]
    fp32 = getattr(q, "element_size", lambda: 2)() == 4
    bm = kwargs["BLOCK_Q"] * kwargs["HEADS"]
    bc = kwargs["HEADS"] * kwargs["BLOCK_D"]
    kept = [c for c in configs if _config_ok(bm, bc, c.kwargs["BLOCK_N"], c.num_warps, fp32)]
    return kept or configs[:1]


@triton.autotune(configs=autotune_configs(_triton_configs()),
                 key=["LK_BUCKET", "BLOCK_Q", "HEADS", "BLOCK_D", "KEY_MASK", "ATTN_MASK", "HAS_K2", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # [B, H, LQ, D]
    k_ptr,  # [B, HKV, LK, D]   first key/value source (HKV = H / GROUP kv heads)
    v_ptr,  # [B, HKV, LK, D]
    k2_ptr,  # [B, HKV, LK2, D]  second source (HAS_K2): its keys follow the first's (Idefics2's concat[ctx, lat])
    v2_ptr,  # [B, HKV, LK2, D]
    km_ptr,  # [B, LK] key mask of the first source (KEY_MASK != "none"): int8 keep-flags or a float bias
    am_ptr,  # [B|1, H|1, LQ|1, LK + LK2] full mask (ATTN_MASK != "none"), broadcast dims have stride 0
    o_ptr,  # [B, LQ, H, D]
    lse_ptr,  # [B, H, LQ] fp32
    H, LQ, LK, LK2, D, GROUP, LK_BUCKET,
    qk_scale,  # softmax scale * log2(e)
    inv_scale,  # 1 / softmax scale
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_k2b, stride_k2h, stride_k2n, stride_k2d,
    stride_v2b, stride_v2h, stride_v2n, stride_v2d,
    stride_kmb, stride_kmn,
    stride_amb, stride_amh, stride_amm, stride_amn,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lm,
    KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr, HAS_K2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, HEADS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    n_groups = tl.cdiv(H, HEADS)
    b = (pid_bh // n_groups).to(tl.int64)
    h0 = (pid_bh % n_groups) * HEADS
    nan_rows, zero_rows, odd_rows = attend_tile(
        b, h0, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ, LK, LK2, D, GROUP,
        qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
        stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n,
        stride_k2d, stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amb,
        stride_amh, stride_amm, stride_amn, stride_ob, stride_om, stride_oh, stride_od, stride_lb,
        stride_lh, stride_lm, KEY_MASK, ATTN_MASK, HAS_K2, PRECISION,
        BLOCK_Q, HEADS, BLOCK_D, BLOCK_N, False)
    if HEADS > 1:
        # Head isolation: the block-diagonal product multiplies every packed head's key columns (by zeros outside
        # a row's own head), so a NaN/Inf key of one head would make every row of the tile NaN (0 * inf). A tile
        # that came out with a NaN row is recomputed one head at a time (plain [BLOCK_Q, BLOCK_D] tiles, an
        # unpipelined loop whose invariants are not hoisted: the packed loop keeps its registers) and those rows
        # are stored again. Never taken on finite inputs.
        if nan_rows:
            for hh in tl.range(0, HEADS, disable_licm=True):
                attend_tile(
                    b, h0 + hh, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ,
                    LK, LK2, D, GROUP, qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb,
                    stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b,
                    stride_k2h, stride_k2n, stride_k2d, stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb,
                    stride_kmn, stride_amb, stride_amh, stride_amm, stride_amn, stride_ob, stride_om, stride_oh,
                    stride_od, stride_lb, stride_lh, stride_lm, KEY_MASK, ATTN_MASK, HAS_K2, PRECISION,
                    BLOCK_Q, 1, BLOCK_D, BLOCK_N, True)
    # A row with finite statistics that stored a non-finite value met an Inf (or NaN) in V. Eager attention rounds
    # the normalised probabilities to the input dtype before P @ V, so a probability that rounds to 0 there meets the
    # Inf as 0 * Inf = NaN; the unnormalised P here (larger by the factor l) may not round to 0. A rare pass, one head
    # at a time (after the head isolation, which may have stored such rows), recomputes those rows with P normalised
    # first. Never taken on finite inputs.
    if odd_rows or (HEADS > 1 and nan_rows):
        eager_rounded_rows(
            b, h0, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ, LK, LK2, D,
            GROUP, qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
            stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n,
            stride_k2d, stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amb,
            stride_amh, stride_amm, stride_amn, stride_ob, stride_om, stride_oh, stride_od, stride_lb, stride_lh,
            stride_lm, KEY_MASK, ATTN_MASK, HAS_K2, PRECISION, BLOCK_Q, HEADS, BLOCK_D, BLOCK_N)
    if KEY_MASK == "bool" or ATTN_MASK == "bool":
        # Rows whose keep-flags keep no key were stored as O = 0 (as SDPA gives); where every score before the
        # keep-flags is -inf, eager attention gives NaN (-inf + finfo.min is -inf, softmax over -inf). That needs
        # those scores, which the main loop never forms: a rare pass, one head at a time like the head isolation
        # (and after it: a NaN row of a packed tile may hide such a row), recomputes them without V.
        if zero_rows or (HEADS > 1 and nan_rows):
            nan_unscored_rows(
                b, h0, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ, LK, LK2, D,
                GROUP, qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
                stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n,
                stride_k2d, stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amb,
                stride_amh, stride_amm, stride_amn, stride_ob, stride_om, stride_oh, stride_od, stride_lb, stride_lh,
                stride_lm, KEY_MASK, ATTN_MASK, HAS_K2, PRECISION, BLOCK_Q, HEADS, BLOCK_D, BLOCK_N)


# ------------------------------------------------------------------------------------------------ launcher


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def default_tile(lq, h, d, fp32=False):
    """(BLOCK_Q, HEADS) with BLOCK_Q * HEADS = 64 rows (one wgmma warpgroup tile on sm_90): heads are packed when Lq
    is short (32 queries x 2 heads), queries are padded when there are not enough heads to pack (H = 1, or fp32 where
    the packed accumulator would spill). fp32 with D > 64 uses 16-row tiles (mma.sync; larger ones spill)."""
    block_d = triton.next_power_of_2(d)
    max_c = 64 if fp32 else 256  # HEADS * BLOCK_D one program holds in its accumulator without spilling
    if block_d > max_c:
        return 16, 1
    block_q = min(64, max(16, triton.next_power_of_2(lq)))
    heads = min(64 // block_q, triton.next_power_of_2(h), max_c // block_d)
    return 64 // heads, heads


def _mask_mode(t, name):
    import torch

    if t is None:
        return "none", None
    if t.dtype == torch.bool:
        return "bool", t.view(torch.int8)
    if t.dtype in (torch.int8, torch.uint8):
        return "bool", t
    _check(t.is_floating_point(), f"attention_fwd: {name} must be bool, int8/uint8 keep-flags or a float bias, "
                                  f"got {t.dtype}")
    return "additive", t


def attention_fwd(q, k, v, *, key_mask=None, attn_mask=None, scale=None, precision=None, config=None, out=None,
                  lse=None, k2=None, v2=None):
    """Launch the attention forward. Returns ``(out [B, Lq, H, D], lse [B, H, Lq] fp32)``.

    ``k``/``v`` [B, Hkv, Lk, D]: Hkv may divide H (grouped-query attention: query head h reads kv head
    h // (H / Hkv); the kv heads are never repeated in memory).
    ``k2``/``v2`` [B, Hkv, Lk2, D]: an optional second key/value source whose keys follow the first's, i.e. the
    attention runs over concat(k, k2) without materialising it (Idefics2's Perceiver: context keys, then latent keys).
    ``key_mask`` [B, Lk]: bool / int8 / uint8 keep-flags (nonzero = attend) or a float additive bias, on the first
    source only (the second is always attended).
    ``attn_mask`` [B|1, H|1, Lq|1, Lk + Lk2]: bool keep-flags or a float additive bias (broadcast dims may be size 1).
    ``scale``: default ``D ** -0.5``. ``precision``: the fp32 dot precision, "tf32x3" (default) or "tf32" (default
    when torch.backends.cuda.matmul.allow_tf32); ignored for fp16/bf16. ``config``: an explicit
    (BLOCK_Q, HEADS, BLOCK_N, num_warps, num_stages) that bypasses the heuristics and the autotuner (tests use it).
    ``out`` / ``lse``: optional preallocated outputs (any strides), written in place.
    """
    import torch

    if config is not None:
        config = tuple(config)
    try:
        key = (scale, precision, _hot.allow_tf32(), config,
               _hot.devices_key((q, k, v, k2, v2, key_mask, attn_mask, out, lse)))
    except AttributeError:  # not tensors: the checks name the argument
        key = None
    call = _CALLS.get(key)
    if call is None:  # a new shape key: the checks (the same ones pass for the same key) and the launch plan
        call = _prepare(q, k, v, key_mask, attn_mask, scale, precision, config, out, lse, k2, v2)
        if key is not None:
            _launch.remember(_CALLS, key, call)
    B, LQ, H, D = call.info
    if out is None:
        out = torch.empty((B, LQ, H, D), device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty((B, H, LQ), device=q.device, dtype=torch.float32)
    if call.plan is not None:  # (None: nothing to compute)
        km = key_mask.view(torch.int8) if key_mask is not None and key_mask.dtype == torch.bool else key_mask
        am = attn_mask.view(torch.int8) if attn_mask is not None and attn_mask.dtype == torch.bool else attn_mask
        # the kernel always forms the mask pointers: an absent mask is a dummy (out) with zero strides
        call.launch((q, k, v, k2, v2, km if km is not None else out, am if am is not None else out, out, lse))
    return out, lse


_CALLS = {}
_PLANS = {}


def _prepare(q, k, v, key_mask, attn_mask, scale, precision, config, out, lse, k2, v2):
    """Check a new shape key of ``attention_fwd`` (ValueError naming the argument at fault) and plan its launch."""
    import torch

    for name, t in (("q", q), ("k", k), ("v", v)) + ((("k2", k2), ("v2", v2)) if k2 is not None or v2 is not None
                                                    else ()):
        _check(isinstance(t, torch.Tensor) and t.dim() == 4,
               f"attention_fwd: {name} must be a 4-D [B, H, L, D] tensor, got "
               f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, H, LQ, D = q.shape
    HKV, LK = k.shape[1], k.shape[2]
    _check(k.shape == (B, HKV, LK, D) and (HKV == 0) == (H == 0) and (HKV == 0 or H % HKV == 0),
           f"attention_fwd: k must be [{B}, Hkv, Lk, {D}] with Hkv dividing {H} to match q, got {tuple(k.shape)}")
    _check(v.shape == k.shape, f"attention_fwd: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    LK2 = 0
    if k2 is not None:
        LK2 = k2.shape[2]
        _check(k2.shape == (B, HKV, LK2, D), f"attention_fwd: k2 must be [{B}, {HKV}, Lk2, {D}], got {tuple(k2.shape)}")
        _check(v2.shape == k2.shape, f"attention_fwd: v2 must have k2's shape {tuple(k2.shape)}, got {tuple(v2.shape)}")
    _check(q.dtype in (torch.float16, torch.bfloat16, torch.float32),
           f"attention_fwd: q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("k2", k2), ("v2", v2)):
        if t is None:
            continue
        _check(t.dtype == q.dtype, f"attention_fwd: {name} is {t.dtype} but q is {q.dtype}")
        _check(t.device == q.device, f"attention_fwd: {name} is on {t.device} but q is on {q.device}")
    _check(HEAD_DIMS[0] <= D <= HEAD_DIMS[1], f"attention_fwd: head dim D={D} of q is outside {HEAD_DIMS}")
    km_mode, km = _mask_mode(key_mask, "key_mask")
    am_mode, am = _mask_mode(attn_mask, "attn_mask")
    if km is not None:
        _check(km.shape == (B, LK), f"attention_fwd: key_mask must be [{B}, {LK}] (batch, keys of the first source), "
                                    f"got {tuple(km.shape)}")
        _check(km.device == q.device, f"attention_fwd: key_mask is on {km.device} but q is on {q.device}")
    if am is not None:
        _check(am.dim() == 4 and am.shape[0] in (1, B) and am.shape[1] in (1, H) and am.shape[2] in (1, LQ)
               and am.shape[3] == LK + LK2,
               f"attention_fwd: attn_mask must be [{B} or 1, {H} or 1, {LQ} or 1, {LK + LK2}], got "
               f"{tuple(am.shape)}")
        _check(am.device == q.device, f"attention_fwd: attn_mask is on {am.device} but q is on {q.device}")
    _check(out is None or (out.shape == (B, LQ, H, D) and out.dtype == q.dtype and out.device == q.device),
           f"attention_fwd: out must be a {q.dtype} [{B}, {LQ}, {H}, {D}] tensor on {q.device}")
    _check(lse is None or (lse.shape == (B, H, LQ) and lse.dtype == torch.float32 and lse.device == q.device),
           f"attention_fwd: lse must be a float32 [{B}, {H}, {LQ}] tensor on {q.device}")
    if B == 0 or H == 0 or LQ == 0:
        return _launch.Call(info=(B, LQ, H, D))
    if scale is None:
        scale = D ** -0.5
    _check(0.0 < float(scale) < float("inf"), f"attention_fwd: scale must be positive and finite, got {scale}")
    if q.dtype != torch.float32:
        precision = "ieee"  # ignored by 16-bit dots
    elif precision is None:
        precision = "tf32" if _hot.allow_tf32() else "tf32x3"  # (a reader that survives torch's fp32_precision API)
    _check(precision in FP32_PRECISIONS or q.dtype != torch.float32,
           f"attention_fwd: precision must be one of {FP32_PRECISIONS} for float32 inputs, got {precision!r}")

    def strides(t, n):
        if t is None:
            return (0,) * n
        return tuple(0 if size == 1 else st for size, st in zip(t.shape, t.stride()))

    has_k2 = k2 is not None
    out_strides = out.stride() if out is not None else (LQ * H * D, H * D, D, 1)
    lse_strides = lse.stride() if lse is not None else (H * LQ, LQ, 1)
    # integer and float arguments; the second source's strides are None without it (not specialised, not launched)
    ints = (H, LQ, LK, LK2, D, H // HKV, _launch.next_pow2(max(LK + LK2, 1)),
            float(scale) * 1.4426950408889634, 1.0 / float(scale),
            *q.stride(), *k.stride(), *v.stride(), *(k2.stride() if has_k2 else (None,) * 4),
            *(v2.stride() if has_k2 else (None,) * 4), *strides(km, 2), *strides(am, 4), *out_strides, *lse_strides)
    block_d = _launch.next_pow2(D)
    flags = dict(KEY_MASK=km_mode, ATTN_MASK=am_mode, HAS_K2=has_k2, PRECISION=precision, BLOCK_D=block_d)
    if config is None:
        block_q, heads = default_tile(LQ, H, D, q.dtype == torch.float32)
        flags.update(BLOCK_Q=block_q, HEADS=heads)
        config_kw = None
    else:
        block_q, heads, block_n, warps, stages = config
        _check(heads * block_d <= 256 and block_q * heads >= 16 and block_n >= 16,
               f"attention_fwd: config {config} is invalid for D={D} (HEADS*BLOCK_D <= 256, BLOCK_Q*HEADS >= 16, "
               "BLOCK_N >= 16)")
        flags.update(BLOCK_Q=block_q, HEADS=heads)
        config_kw = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    grid = (B * _launch.cdiv(H, heads), _launch.cdiv(LQ, block_q))

    def make_args():  # for the autotuner's one run (on a GPU it times each config): the outputs, or scratch ones
        o = out if out is not None else torch.empty((B, LQ, H, D), device=q.device, dtype=q.dtype)
        ls = lse if lse is not None else torch.empty((B, H, LQ), device=q.device, dtype=torch.float32)
        return (q, k, v, k2, v2, km if km is not None else o, am if am is not None else o, o, ls, *ints)

    plan = _launch.tuned_plan(_attn_fwd_kernel, grid, make_args, flags, config_kw, 9, _PLANS,
                              (tuple(flags.values()), ints[6], q.dtype, km.dtype if km is not None else None,
                               am.dtype if am is not None else None, config))
    return _launch.Call(plan, grid, ints, info=(B, LQ, H, D))


# ------------------------------------------------------------------------------------------------ audit


def audit_cases():
    """Every attention tile x config for the sm_90a audit (kernels/attention_audit.py)."""
    from .attention_audit import audit_cases as cases

    return cases()
