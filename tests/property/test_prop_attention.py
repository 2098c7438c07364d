"""Property tests of ``fastvlm.attention`` against transformers' eager attention (fastvlm.reference.attention
``eager_attention_ref``), on both paths: GQA, a second key/value source, key masks (bool, integer, float bias),
4-D masks (bool, float, broadcast), head-split views, NaN/Inf, gradients.

The one documented difference from eager: a row whose every key is masked by keep-flags gives zeros (eager with its
finfo.min float mask averages V; SDPA gives zeros too) - zero times V, so a NaN or Inf among those values gives NaN,
as eager's average does, and where eager's row is NaN (a NaN or +Inf score, or every score -inf) it stays NaN."""
import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import fastvlm
from conftest import budget, known
from fastvlm.reference.attention import eager_attention_ref, keep_flags
from prop_rule import check, check_grads
from prop_strategies import dtypes, f64, values

HEAD_DIMS_KERNEL = (16, 17, 24, 31, 33, 48)


def _heads(draw, B, H, L, D, dtype, kinds):
    """[B, H, L, D] as a model builds it: ``linear(x).view(B, L, H, D).transpose(1, 2)``, or contiguous, or sliced."""
    how = draw(st.sampled_from(("view", "view", "contiguous", "sliced")))
    if how == "view":
        return draw(values((B, L, H, D), dtype, kinds=kinds)).transpose(1, 2)
    t = draw(values((B, H, L, D), dtype, kinds=kinds))
    if how == "sliced":
        buf = torch.full((B, H, L, D + 3), math.nan, dtype=dtype)
        buf[..., 2:2 + D] = t
        return buf[..., 2:2 + D]
    return t


def _keep(key_mask, attn_mask, B, H, Lq, Lk, Lk2):
    """[B, H, Lq, Lk + Lk2] keep-flags from the boolean/integer masks (float masks keep everything)."""
    keep = torch.ones(B, H, Lq, Lk + Lk2, dtype=torch.bool)
    km = keep_flags(key_mask)
    if km is not None and km.dtype == torch.bool:
        keep[..., :Lk] &= km[:, None, None, :]
    am = keep_flags(attn_mask)
    if am is not None and am.dtype == torch.bool:
        keep &= am.expand(B, H, Lq, Lk + Lk2)
    return keep


def _extreme_bias(draw, shape, dtype):
    """A float bias with some finfo.min / -inf entries (masked keys, as transformers builds them)."""
    t = draw(values(shape, dtype, kinds=("normal",)))
    if draw(st.booleans()) and t.numel():
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        hole = torch.rand(shape, generator=g) < 0.3
        t = t.masked_fill(hole, draw(st.sampled_from([torch.finfo(dtype).min, -math.inf])))
    return t


@st.composite
def attention_case(draw, path, grads=False):
    dtype = draw(dtypes(path))
    B, Hkv, group = draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H = Hkv * group
    Lq, Lk = draw(st.integers(0, 9)), draw(st.integers(0, 12))
    D = draw(st.sampled_from(HEAD_DIMS_KERNEL)) if path == "triton" else draw(st.integers(1, 40))
    kinds = ("normal",) if grads else ("normal", "normal", "normal", "specials")
    # (the PyTorch path too: an Inf key scores a whole row -inf, the "all -inf row" item)
    kinds_qk = ("normal",) if known("attention_nan") else kinds
    q = _heads(draw, B, H, Lq, D, dtype, kinds_qk)
    k = _heads(draw, B, Hkv, Lk, D, dtype, kinds_qk)
    kinds_v = ("normal",) if known("attention_lowp_v_inf") and dtype in (torch.float16, torch.bfloat16) else kinds
    v = _heads(draw, B, Hkv, Lk, D, dtype, kinds_v)
    kw = {}
    Lk2 = 0
    if draw(st.booleans()):
        Lk2 = draw(st.integers(1, 5))
        kw["k2"] = _heads(draw, B, Hkv, Lk2, D, dtype, kinds_qk)
        kw["v2"] = _heads(draw, B, Hkv, Lk2, D, dtype, kinds_v)
    kind = draw(st.sampled_from(("none", "bool", "int", "float")))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    if kind in ("bool", "int"):
        km = torch.rand(B, Lk, generator=g) < draw(st.sampled_from([0.5, 0.8, 1.0]))
        kw["key_mask"] = km if kind == "bool" else km.to(draw(st.sampled_from([torch.int64, torch.int32])))
    elif kind == "float":
        kw["key_mask"] = _extreme_bias(draw, (B, Lk), dtype)
    akind = draw(st.sampled_from(("none", "none", "bool", "float")))
    if akind != "none":
        shape = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H])), draw(st.sampled_from([1, Lq])),
                 Lk + Lk2)
        if akind == "bool":
            kw["attn_mask"] = torch.rand(shape, generator=g) < 0.7
        else:
            kw["attn_mask"] = _extreme_bias(draw, shape, dtype)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.01, 2.0))
    if grads or known("attention_nan") or known("attention_finite_min"):
        # no row whose keys are all removed by extreme float biases (finfo.min / -inf), unless keep-flags already
        # remove them all (the documented zeros); with grads, no removed key at all
        _drop_extreme_rows(kw, B, H, Lq, Lk, Lk2, strict=grads)
    return dict(args=(q, k, v), kw=kw, dtype=dtype, k=Lk + Lk2 + D, B=B, H=H, Lq=Lq, Lk=Lk, Lk2=Lk2)


def _extreme(t):
    return t is not None and t.is_floating_point() and bool((t <= torch.finfo(t.dtype).min).any())


def _drop_extreme_rows(kw, B, H, Lq, Lk, Lk2, strict):
    km, am = kw.get("key_mask"), kw.get("attn_mask")
    if not (_extreme(km) or _extreme(am)):
        return
    keep = _keep(km, am, B, H, Lq, Lk, Lk2)
    alive = keep.clone()
    if _extreme(km):
        alive[..., :Lk] &= (km > torch.finfo(km.dtype).min)[:, None, None, :]
    if _extreme(am):
        alive &= (am > torch.finfo(am.dtype).min).expand(B, H, Lq, Lk + Lk2)
    dead = (~alive.any(-1)) & keep.any(-1)  # rows killed by the extreme biases, not by keep-flags alone
    if strict or dead.any():
        for name in ("key_mask", "attn_mask"):
            t = kw.get(name)
            if _extreme(t):
                kw[name] = torch.where(t <= torch.finfo(t.dtype).min, torch.zeros((), dtype=t.dtype), t)


def _original(q, k, v, key_mask=None, attn_mask=None, scale=None, k2=None, v2=None):
    """transformers' eager attention, with the documented zeros on rows whose every key is masked by keep-flags."""
    out = eager_attention_ref(q, k, v, key_mask, attn_mask, scale, k2, v2)
    B, H, Lq = q.shape[:3]
    Lk, Lk2 = k.shape[2], 0 if k2 is None else k2.shape[2]
    dead = ~_keep(key_mask, attn_mask, B, H, Lq, Lk, Lk2).any(-1)  # [B, H, Lq]
    return torch.where(dead.transpose(1, 2)[..., None], out * 0, out)  # 0 * V: a NaN/Inf value stays NaN


def test_attention_matches_eager(path):
    @budget(path, torch=80, triton=12)
    @given(c=attention_case(path))
    def run(c):
        check(fastvlm.attention, _original, c["args"], kwargs=c["kw"], original64=_original, args64=f64(c["args"]),
              names=("q", "k", "v", "mask"), dtype=c["dtype"], k=c["k"], roundings=3)

    run()


def test_attention_gradients(path):
    @budget(path, torch=30, triton=4)
    @given(c=attention_case(path, grads=True), seed=st.integers(0, 2 ** 31 - 1))
    def run(c, seed):
        # one key: dq is a structural zero (softmax is shift-invariant) that any LSE rounding turns into noise with
        # no scale to judge it by; two or more keys give dq a magnitude
        assume(c["B"] * c["Lq"] > 0 and c["Lk"] + c["Lk2"] >= 2)
        keep = _keep(c["kw"].get("key_mask"), c["kw"].get("attn_mask"), c["B"], c["H"], c["Lq"], c["Lk"], c["Lk2"])
        assume(keep.any(-1).all())  # eager's gradient through a fully masked row is not the documented one
        q, k, v = c["args"]
        leaves = dict(q=q, k=k, v=v, **{n: t for n, t in c["kw"].items()
                                        if isinstance(t, torch.Tensor) and t.is_floating_point()})
        rest = {n: t for n, t in c["kw"].items() if n not in leaves}

        def call(fn):
            return lambda d: fn(d["q"], d["k"], d["v"], **{n: d[n] for n in d if n not in ("q", "k", "v")}, **rest)

        check_grads(call(fastvlm.attention), call(_original), leaves, dtype=c["dtype"], k=c["k"], roundings=4,
                    gy_seed=seed)

    run()
