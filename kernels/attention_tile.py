"""The body of the attention kernel (kernels/attention.py): one tile of HEADS packed heads x BLOCK_Q queries, its
online softmax over one or two key/value sources, and the epilogue that normalises and stores O and LSE.

Non-finite inputs give what eager attention gives (tests/test_nonfinite.py):
* additive biases go through ``_mask_bias``: transformers' finite ``finfo.min`` masking value becomes a floor that
  absorbs the score (a row masked entirely by it averages its values, as in eager attention, in fp32, bf16 and fp16);
  -inf and NaN biases are kept;
* a row whose keep-flag masks keep no key gives O = 0 and LSE = -inf (as SDPA gives); a row whose kept keys all score
  -inf gives NaN (softmax over -inf); NaN anywhere in a row's scores makes the row NaN; keep-flags add -inf, so a
  masked key's NaN or +Inf score makes its row NaN, as eager's ``score + finfo.min`` does; a row without a kept key
  whose every score before the flags is -inf is NaN as in eager (the rare ``UNSCORED`` pass finds those rows);
* the block-diagonal Q K^T product of packed heads meets every packed head's key columns (times zeros), so a NaN/Inf
  key of one head would turn the other heads' rows NaN (0 * inf): a tile that comes out with a NaN row is recomputed
  one head at a time (``FIXUP``), never on finite inputs.
"""
import triton
import triton.language as tl

from ._interp import dot_operand

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Finite additive biases at or below the masking value become this (natural units): low enough to absorb any real
# score in fp32 (as finfo.min does in eager attention), high enough that neither the log2 scaling nor two added masks
# overflow to -inf.
_BIAS_FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _mask_bias(b, FP16: tl.constexpr):
    """An additive bias (fp32, natural units) as the kernel applies it: a finite bias at or below the masking value
    (finfo(float16).min for an fp16 mask, else _BIAS_FLOOR, below every real score) becomes _BIAS_FLOOR, which
    absorbs the score in fp32 as adding finfo.min does in eager attention (so a row masked entirely by such biases
    averages its values); -inf and NaN pass through (eager: -inf drops the key, NaN makes the row NaN)."""
    if FP16:  # the only finite fp16 value at or below finfo(float16).min is itself
        y = tl.where(b == -65504.0, _BIAS_FLOOR, b)
    else:
        # max.NaN clamps finite biases and keeps NaN; adding b * 1e-30 brings -inf back (-inf * 1e-30 = -inf) and
        # changes nothing else (|b| * 1e-30 <= 3.4e8 vanishes next to the floor, and is below half an ulp of any
        # larger b): one FMA instead of a compare and a select on every score of the tile
        y = tl.maximum(b, _BIAS_FLOOR, propagate_nan=tl.PropagateNan.ALL) + b * 1e-30
    return y


@triton.jit
def _attend_source(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, LKS, col_ok, km_base, stride_kmn,
                   am_base, stride_amn, AM_OFF, qk_scale, inv_scale,
                   KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                   FIXUP: tl.constexpr, SCORES_ONLY: tl.constexpr = False, NORM_P: tl.constexpr = False,
                   NO_V: tl.constexpr = False):
    """Online-softmax update of (acc, m_i, l_i) over the LKS keys of one key/value source. ``k_base``/``v_base``
    [BLOCK_C] point at key 0 of each packed column (its kv head and channel); ``km_base`` at this source's key mask
    (KEY_MASK "none" for a source without one); the full mask's key index is ``AM_OFF + n`` (the second source's keys
    follow the first's in the mask, as in the concatenation it stands for).
    SCORES_ONLY (the rare ``_scored_rows`` pass): only m_i and l_i, of the scores before the keep-flags (boolean masks
    are skipped, additive ones applied), without V.
    NORM_P (the rare ``eager_rounded_rows`` pass): m_i and l_i are the rows' final statistics and stay as given; P is
    normalised before it is rounded to V's dtype for P @ V, as eager attention rounds its softmax output.
    """
    # FIXUP: the rare head-isolation pass, not pipelined (its buffers would raise the whole kernel's registers)
    for n0 in tl.range(0, LKS, BLOCK_N, num_stages=1 if FIXUP or SCORES_ONLY or NORM_P else None):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < LKS
        n64 = n.to(tl.int64)
        kv_mask = col_ok[:, None] & n_ok[None, :]
        kt = tl.load(k_base[:, None] + n64[None, :] * stride_kn, mask=kv_mask, other=0.0)  # [BLOCK_C, BLOCK_N]
        if ATTN_MASK == "none" or (SCORES_ONLY and ATTN_MASK == "bool"):
            s = tl.dot(q, dot_operand(kt), input_precision=PRECISION)
        else:
            # the full mask enters as the dot's accumulator (in units of q.k, i.e. divided by the scale): the tile
            # is converted to the MMA layout once and the softmax below stays in that layout (added to s after the
            # dot, the compiler duplicated the softmax in the load's layout and spilled)
            am_n = (AM_OFF + n).to(tl.int64)
            if ATTN_MASK == "additive":
                am = tl.load(am_base[:, None] + am_n[None, :] * stride_amn, mask=n_ok[None, :], other=0.0)
                bias = _mask_bias(am.to(tl.float32), am_base.dtype.element_ty == tl.float16) * inv_scale
            else:
                ak = tl.load(am_base[:, None] + am_n[None, :] * stride_amn, mask=n_ok[None, :], other=0)
                bias = tl.where(ak != 0, 0.0, float("-inf"))
            s = tl.dot(q, dot_operand(kt), bias, input_precision=PRECISION)
        s = s * qk_scale  # log2 units
        # per-key bias [BLOCK_N] (log2 units): -inf past LKS and for padded keys, or the additive bias
        kbias = tl.where(n_ok, 0.0, float("-inf"))
        if KEY_MASK == "additive":
            km = tl.load(km_base + n64 * stride_kmn, mask=n_ok, other=0.0)
            kbias += _mask_bias(km.to(tl.float32), km_base.dtype.element_ty == tl.float16) * _LOG2E
        elif KEY_MASK == "bool" and not SCORES_ONLY:
            kk = tl.load(km_base + n64 * stride_kmn, mask=n_ok, other=0)
            kbias = tl.where(kk != 0, kbias, float("-inf"))
        s += kbias[None, :]

        if NORM_P:  # the final statistics: p = exp2(s - m) / l, rounded to V's dtype like eager's softmax output
            m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
            l_use = tl.where(l_i > 0.0, l_i, 1.0)  # (rows with l = 0 or NaN are not stored by that pass)
            p = tl.math.exp2(s - m_use[:, None]) / l_use[:, None]
            # the probabilities that round to 0 in V's dtype, made 0 before the cast (the interpreter's bf16 cast
            # mishandles subnormals): at or below half the smallest subnormal, 2^-25 (fp16), 2^-134 (bf16)
            if v_base.dtype.element_ty == tl.float16:
                p = tl.where(p <= 2.9802322387695312e-08, 0.0, p)
            elif v_base.dtype.element_ty == tl.bfloat16:  # (scaled by 2^100: the threshold is an fp32 subnormal)
                p = tl.where(p * 1.2676506002282294e30 <= 5.820766091346741e-11, 0.0, p)
            vt = tl.load(v_base[None, :] + n64[:, None] * stride_vn, mask=n_ok[:, None] & col_ok[None, :],
                         other=0.0)  # [BLOCK_N, BLOCK_C]
            acc = tl.dot(dot_operand(p.to(vt.dtype)), dot_operand(vt), acc, input_precision=PRECISION)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf) = 0, no NaN
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if not (SCORES_ONLY or NO_V):  # (NO_V: the statistics with every mask, for the NORM_P pass)
                vt = tl.load(v_base[None, :] + n64[:, None] * stride_vn, mask=n_ok[:, None] & col_ok[None, :],
                             other=0.0)  # [BLOCK_N, BLOCK_C]
                acc = acc * alpha[:, None]
                acc = tl.dot(dot_operand(p.to(vt.dtype)), dot_operand(vt), acc, input_precision=PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend(q, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, b, ckv64, cd64, col_ok, am_base, LK, LK2, qk_scale, inv_scale,
            stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
            stride_k2b, stride_k2h, stride_k2n, stride_k2d, stride_v2b, stride_v2h, stride_v2n, stride_v2d,
            stride_kmb, stride_kmn, stride_amn,
            KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr, HAS_K2: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, FIXUP: tl.constexpr,
            SCORES_ONLY: tl.constexpr = False, NORM_P: tl.constexpr = False, m_fin=None, l_fin=None,
            NO_V: tl.constexpr = False):
    """(acc, m_i, l_i) of the online softmax over every key: the first source, then the second (HAS_K2).
    SCORES_ONLY: m_i and l_i of the scores before the keep-flags (see ``_attend_source``). NORM_P: acc = P @ V with
    P normalised by the given final statistics ``m_fin``, ``l_fin`` and rounded to V's dtype (eager's rounding)."""
    if NORM_P:
        m_i = m_fin
        l_i = l_fin
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc, m_i, l_i = _attend_source(
        acc, m_i, l_i, q, k_ptr + b * stride_kb + ckv64 * stride_kh + cd64 * stride_kd,
        v_ptr + b * stride_vb + ckv64 * stride_vh + cd64 * stride_vd, stride_kn, stride_vn, LK, col_ok,
        km_ptr + b * stride_kmb, stride_kmn, am_base, stride_amn, 0, qk_scale, inv_scale,
        KEY_MASK, ATTN_MASK, PRECISION, BLOCK_N, FIXUP, SCORES_ONLY, NORM_P, NO_V)
    if HAS_K2:  # the second source, read in place: the concatenation is never materialised
        acc, m_i, l_i = _attend_source(
            acc, m_i, l_i, q, k2_ptr + b * stride_k2b + ckv64 * stride_k2h + cd64 * stride_k2d,
            v2_ptr + b * stride_v2b + ckv64 * stride_v2h + cd64 * stride_v2d, stride_k2n, stride_v2n, LK2, col_ok,
            km_ptr, 0, am_base, stride_amn, LK, qk_scale, inv_scale,
            "none", ATTN_MASK, PRECISION, BLOCK_N, FIXUP, SCORES_ONLY, NORM_P, NO_V)
    return acc, m_i, l_i


@triton.jit
def _rows_with_a_key(km_base, stride_kmn, am_base, stride_amn, LK, LK2, KEY_MASK: tl.constexpr,
                     ATTN_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M] int32, nonzero where a row keeps at least one key under the keep-flag masks (additive biases keep
    every key: a -inf bias is a score, not a mask)."""
    if ATTN_MASK == "bool":
        kept = tl.zeros((BLOCK_M,), dtype=tl.int32)
    else:
        kept_n = tl.zeros((BLOCK_N,), dtype=tl.int32)  # the key mask is the same for every row
    for n0 in range(0, LK + LK2, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = n < LK + LK2
        if KEY_MASK == "bool":  # the key mask covers the first source; the second source's keys are always kept
            kk = tl.load(km_base + n.to(tl.int64) * stride_kmn, mask=n < LK, other=1)
            ok = ok & (kk != 0)
        if ATTN_MASK == "bool":
            ak = tl.load(am_base[:, None] + n.to(tl.int64)[None, :] * stride_amn, mask=ok[None, :], other=0)
            kept = tl.maximum(kept, tl.max((ak != 0).to(tl.int32), axis=1))
        else:
            kept_n = tl.maximum(kept_n, ok.to(tl.int32))
    if ATTN_MASK != "bool":
        kept = tl.zeros((BLOCK_M,), dtype=tl.int32) + tl.max(kept_n, axis=0)
    return kept


@triton.jit
def attend_tile(b, h0, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ, LK, LK2, D,
                GROUP, qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
                stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n,
                stride_k2d, stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amb,
                stride_amh, stride_amm, stride_amn, stride_ob, stride_om, stride_oh, stride_od, stride_lb, stride_lh,
                stride_lm, KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr, HAS_K2: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, FIXUP: tl.constexpr, UNSCORED: tl.constexpr = False,
                EAGER_P: tl.constexpr = False):
    """Attention for the HEADS packed heads h0 .. h0 + HEADS - 1 x BLOCK_Q queries (block ``pid_q``) of batch row b:
    stores O and LSE and returns (whether a stored row is NaN, whether a row was stored as O = 0). FIXUP: the
    head-isolation pass (one head, HEADS = 1). UNSCORED (with FIXUP): the rare pass over rows whose keep-flags keep
    no key, which rewrites as NaN those whose every score before the keep-flags is -inf (``_nan_unscored_rows``).
    EAGER_P (with FIXUP): the rare pass over tiles with a non-finite output row, which rewrites those rows with P
    normalised before it is rounded to V's dtype, as eager attention computes P @ V (``_store_eager_rounded``).
    Returns a third flag: whether the stored tile may hold a non-finite value (then the EAGER_P pass runs)."""
    BLOCK_M: tl.constexpr = BLOCK_Q * HEADS
    BLOCK_C: tl.constexpr = HEADS * BLOCK_D

    # rows: (packed head, query); columns: (packed head, channel)
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    row_head = h0 + r // BLOCK_Q
    row_q = pid_q * BLOCK_Q + r % BLOCK_Q
    col_head = h0 + c // BLOCK_D
    col_d = c % BLOCK_D
    row_ok = (row_head < H) & (row_q < LQ)
    col_ok = (col_head < H) & (col_d < D)  # col_d < D: BLOCK_D pads a head dim that is not a power of 2 (96 -> 128)
    diag = (r // BLOCK_Q)[:, None] == (c // BLOCK_D)[None, :]
    rh64 = row_head.to(tl.int64)
    rq64 = row_q.to(tl.int64)
    ch64 = col_head.to(tl.int64)
    ckv64 = (col_head // GROUP).to(tl.int64)  # grouped-query attention: query head h reads kv head h // GROUP
    cd64 = col_d.to(tl.int64)

    # block-diagonal Q: row (h, q) holds Q[b, h, q, :] in its own head's column block, zeros elsewhere
    qmask = row_ok[:, None] & col_ok[None, :] & diag
    q = tl.load(q_ptr + b * stride_qb + rh64[:, None] * stride_qh + rq64[:, None] * stride_qm
                + cd64[None, :] * stride_qd, mask=qmask, other=0.0)
    q = dot_operand(q)

    # padded rows read a real row of the mask (clamped indices): the mask tile needs only the key predicate
    am_base = (am_ptr + b * stride_amb + tl.minimum(row_head, H - 1).to(tl.int64) * stride_amh
               + tl.minimum(row_q, LQ - 1).to(tl.int64) * stride_amm)  # [BLOCK_M]

    acc, m_i, l_i = _attend(q, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, b, ckv64, cd64, col_ok, am_base, LK, LK2,
                            qk_scale, inv_scale, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh,
                            stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n, stride_k2d, stride_v2b,
                            stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amn, KEY_MASK,
                            ATTN_MASK, HAS_K2, PRECISION, BLOCK_M, BLOCK_C, BLOCK_N, FIXUP, UNSCORED,
                            NO_V=EAGER_P)
    if UNSCORED:
        _nan_unscored_rows(m_i, l_i, row_ok, col_ok, diag, b, rq64, rh64, ch64, cd64, o_ptr, lse_ptr, km_ptr, am_base,
                           LK, LK2, stride_kmb, stride_kmn, stride_amn, stride_ob, stride_om, stride_oh, stride_od,
                           stride_lb, stride_lh, stride_lm, KEY_MASK, ATTN_MASK, BLOCK_M, BLOCK_N)
        zero_rows = row_ok != row_ok  # (none)
        odd = False
    elif EAGER_P:
        _store_eager_rounded(acc, m_i, l_i, q, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, b, ckv64, cd64, col_ok, am_base,
                             LK, LK2, qk_scale, inv_scale, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                             stride_vh, stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n, stride_k2d,
                             stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amn,
                             row_ok, diag, rq64, ch64, o_ptr, stride_ob, stride_om, stride_oh, stride_od, KEY_MASK,
                             ATTN_MASK, HAS_K2, PRECISION, BLOCK_M, BLOCK_C, BLOCK_N)
        zero_rows = row_ok != row_ok  # (none)
        odd = False
    else:
        zero_rows, odd = _finish(acc, m_i, l_i, row_ok, col_ok, diag, b, rq64, rh64, ch64, cd64, o_ptr, lse_ptr,
                                 km_ptr, am_base, LK, LK2, stride_kmb, stride_kmn, stride_amn, stride_ob, stride_om,
                                 stride_oh, stride_od, stride_lb, stride_lh, stride_lm, KEY_MASK, ATTN_MASK, BLOCK_M,
                                 BLOCK_N)
    return (tl.max(((l_i != l_i) & row_ok).to(tl.int32), axis=0) > 0,
            tl.max(zero_rows.to(tl.int32), axis=0) > 0, odd)


@triton.jit
def _store_eager_rounded(acc, m_i, l_i, q, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, b, ckv64, cd64, col_ok, am_base, LK,
                         LK2, qk_scale, inv_scale, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh,
                         stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n, stride_k2d, stride_v2b, stride_v2h,
                         stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amn, row_sel, diag, rq64, ch64, o_ptr,
                         stride_ob, stride_om, stride_oh, stride_od, KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr,
                         HAS_K2: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """One head's tile (HEADS = 1) whose scores gave the statistics (m_i, l_i; ``acc`` is not formed): its rows with
    finite statistics are recomputed with P normalised by the final statistics before it is rounded to V's dtype, and
    stored (a finite row changes by a rounding only). That is where eager attention rounds its softmax output:
    a probability that rounds to 0 there meets an Inf value as 0 * Inf = NaN, which the unnormalised P of the online
    softmax (larger by the factor l) can miss. Other rows (no key, NaN) keep what ``_finish`` stored."""
    rows = row_sel & (l_i > 0.0) & (l_i < float("inf"))  # (a NaN l fails both)
    acc2, m_i, l_i = _attend(q, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, b, ckv64, cd64, col_ok, am_base, LK, LK2,
                             qk_scale, inv_scale, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh,
                             stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n, stride_k2d, stride_v2b,
                             stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amn, KEY_MASK,
                             ATTN_MASK, HAS_K2, PRECISION, BLOCK_M, BLOCK_C, BLOCK_N, True, False, True, m_i, l_i)
    omask = rows[:, None] & col_ok[None, :] & diag
    tl.store(o_ptr + b * stride_ob + rq64[:, None] * stride_om + ch64[None, :] * stride_oh + cd64[None, :] * stride_od,
             acc2.to(o_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _finish(acc, m_i, l_i, row_sel, col_sel, diag, b, rq64, rh64, ch64, cd64, o_ptr, lse_ptr, km_ptr, am_base, LK,
            LK2, stride_kmb, stride_kmn, stride_amn, stride_ob, stride_om, stride_oh, stride_od, stride_lb, stride_lh,
            stride_lm, KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Normalise and store the rows ``row_sel`` (their own head's columns).

    l_i == 0: no key with a finite score. O = 0 and LSE = -inf where the keep-flag masks (or Lk + Lk2 = 0) leave the
    row no key at all, as SDPA gives; NaN where the row kept keys that all score -inf (softmax over -inf, as eager
    gives). The rows are stored first (0 / -inf) and the rare NaN rows rewritten after, so the accumulator is dead
    while their masks are read. Returns the rows stored as O = 0 ([BLOCK_M] bool) and whether the tile holds a
    non-finite value (an Inf or NaN in V, or a NaN row; ``_store_eager_rounded`` rewrites the rows with finite
    statistics among them)."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    # only the diagonal block of each row is its head's output (there col_head == row_head)
    omask = row_sel[:, None] & col_sel[None, :] & diag
    o_ptrs = o_ptr + b * stride_ob + rq64[:, None] * stride_om + ch64[None, :] * stride_oh + cd64[None, :] * stride_od
    lse_ptrs = lse_ptr + b * stride_lb + rh64 * stride_lh + rq64 * stride_lm
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=omask)
    tl.store(lse_ptrs, lse, mask=row_sel)
    # one sum over the tile, non-finite when a value is (or, harmlessly, when the sum overflows): a cheap trigger of
    # the rare pass, which looks at each row's own head's values
    total = tl.sum(tl.sum(o, axis=1), axis=0)
    odd = (total != total) | (tl.abs(total) == float("inf"))
    empty = empty & row_sel
    if tl.max(empty.to(tl.int32), axis=0) > 0:
        if KEY_MASK == "bool" or ATTN_MASK == "bool":
            nan_rows = empty & (_rows_with_a_key(km_ptr + b * stride_kmb, stride_kmn, am_base, stride_amn, LK, LK2,
                                                 KEY_MASK, ATTN_MASK, BLOCK_M, BLOCK_N) != 0)
        else:
            nan_rows = empty & (LK + LK2 > 0)
        # (an fp32 NaN tile, cast: the interpreter cannot build a bf16 constant tile)
        tl.store(o_ptrs, tl.full(omask.shape, float("nan"), tl.float32).to(o_ptr.dtype.element_ty),
                 mask=omask & nan_rows[:, None])
        tl.store(lse_ptrs, tl.full(nan_rows.shape, float("nan"), tl.float32), mask=nan_rows)
        empty = empty & ~nan_rows
    return empty, odd


@triton.jit
def _nan_unscored_rows(m_i, l_i, row_sel, col_sel, diag, b, rq64, rh64, ch64, cd64, o_ptr, lse_ptr, km_ptr, am_base,
                       LK, LK2, stride_kmb, stride_kmn, stride_amn, stride_ob, stride_om, stride_oh, stride_od,
                       stride_lb, stride_lh, stride_lm, KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """From (m_i, l_i) of the scores before the keep-flags (``_attend`` SCORES_ONLY): store NaN in the rows
    ``row_sel`` whose keep-flags keep no key and whose every score is -inf (m_i = -inf, no NaN), as eager attention
    gives (-inf + finfo.min is -inf; softmax over -inf is NaN). ``_finish`` stored these rows as O = 0."""
    keyless = _rows_with_a_key(km_ptr + b * stride_kmb, stride_kmn, am_base, stride_amn, LK, LK2, KEY_MASK, ATTN_MASK,
                               BLOCK_M, BLOCK_N) == 0
    rows = row_sel & keyless & (m_i == float("-inf")) & (l_i == l_i) & (LK + LK2 > 0)
    omask = rows[:, None] & col_sel[None, :] & diag
    tl.store(o_ptr + b * stride_ob + rq64[:, None] * stride_om + ch64[None, :] * stride_oh + cd64[None, :] * stride_od,
             tl.full(omask.shape, float("nan"), tl.float32).to(o_ptr.dtype.element_ty), mask=omask)
    tl.store(lse_ptr + b * stride_lb + rh64 * stride_lh + rq64 * stride_lm, tl.full(rows.shape, float("nan"),
                                                                                  tl.float32), mask=rows)


@triton.jit(noinline=True)
def nan_unscored_rows(b, h0, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ, LK,
                      LK2, D, GROUP, qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb,
                      stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b,
                      stride_k2h, stride_k2n, stride_k2d, stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb,
                      stride_kmn, stride_amb, stride_amh, stride_amm, stride_amn, stride_ob, stride_om, stride_oh,
                      stride_od, stride_lb, stride_lh, stride_lm, KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr,
                      HAS_K2: tl.constexpr, PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, HEADS: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rare pass (a called function, not inlined: the main tile's registers stay as they were): each of the
    HEADS heads at a time, NaN in the rows without a kept key whose every score before the keep-flags is -inf."""
    for hh in tl.range(0, HEADS, disable_licm=True):
        attend_tile(
            b, h0 + hh, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ, LK, LK2, D,
            GROUP, qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
            stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n, stride_k2d,
            stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amb, stride_amh,
            stride_amm, stride_amn, stride_ob, stride_om, stride_oh, stride_od, stride_lb, stride_lh, stride_lm,
            KEY_MASK, ATTN_MASK, HAS_K2, PRECISION, BLOCK_Q, 1, BLOCK_D, BLOCK_N, True, True)


@triton.jit(noinline=True)
def eager_rounded_rows(b, h0, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ, LK,
                       LK2, D, GROUP, qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb,
                       stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b,
                       stride_k2h, stride_k2n, stride_k2d, stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb,
                       stride_kmn, stride_amb, stride_amh, stride_amm, stride_amn, stride_ob, stride_om, stride_oh,
                       stride_od, stride_lb, stride_lh, stride_lm, KEY_MASK: tl.constexpr, ATTN_MASK: tl.constexpr,
                       HAS_K2: tl.constexpr, PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, HEADS: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rare pass over a tile that stored a non-finite value in a row with finite statistics (a called function,
    not inlined, as ``nan_unscored_rows``): each of the HEADS heads at a time, those rows again with P normalised
    before it is rounded to V's dtype, as eager attention computes P @ V (``_store_eager_rounded``)."""
    for hh in tl.range(0, HEADS, disable_licm=True):
        attend_tile(
            b, h0 + hh, pid_q, q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, km_ptr, am_ptr, o_ptr, lse_ptr, H, LQ, LK, LK2, D,
            GROUP, qk_scale, inv_scale, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
            stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_k2b, stride_k2h, stride_k2n, stride_k2d,
            stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_kmb, stride_kmn, stride_amb, stride_amh,
            stride_amm, stride_amn, stride_ob, stride_om, stride_oh, stride_od, stride_lb, stride_lh, stride_lm,
            KEY_MASK, ATTN_MASK, HAS_K2, PRECISION, BLOCK_Q, 1, BLOCK_D, BLOCK_N, True, False, True)
