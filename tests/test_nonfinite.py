"""Regression tests for silent wrong results on special inputs (issue 14 §3), on both paths: the PyTorch path and the
Triton kernels under the interpreter. Each compares against the original computation (PyTorch's modules and
functionals, transformers' eager attention) with NaN and +-Inf in the same places and the finite values within the
derived tolerance."""
import pytest
import torch
import torch.nn.functional as F

import fastvlm
from fastvlm.ops.attention import attention
from fastvlm.ops.feature_map import feature_map_projector
from fastvlm.ops.layout import pool_rows, space_to_depth_rows
from fastvlm.ops.pool import pool_tokens
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.activations import ACTIVATIONS, act_ref
from fastvlm.testing import build, rel_err
from helpers import tol

# the interpreter's numpy ops warn on inf - inf and 0 * inf, which these tests feed on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ["torch", "triton"]
NAN, INF = float("nan"), float("inf")
# every class of special value an activation meets: NaN, +-Inf, overflow of x**3 / 1.702 x, exp under/overflow
SPECIAL = [NAN, INF, -INF, 3e38, -3e38, 1e30, -1e30, 1e13, -1e13, 100.0, -100.0, 88.0, -88.0, 20.0, -20.0, 1.5, -1.5,
           0.0]


def _use(backend, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)


def assert_same(out, ref, dtype, k, roundings=1, what="output"):
    """NaN, +Inf and -Inf in the same places; the finite values within the derived relative-error bound."""
    out, ref = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    assert out.shape == ref.shape, what
    for name, pred in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        bad = (pred(out) != pred(ref)).sum().item()
        assert bad == 0, f"{what}: {bad} element(s) differ in {name} ({pred(out).sum()} vs {pred(ref).sum()})"
    fin = torch.isfinite(ref)
    err, bound = rel_err(out[fin], ref[fin]), tol(dtype, k, roundings)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"


def _ran(t, backend):
    """The op ran on the requested backend (no silent fallback makes the test vacuous)."""
    assert t.records and {r.backend for r in t.records} == {backend}, str(t)


# ------------------------------------------------------------------------------------------------ norm statistics


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_cm_norm_over_the_merged_row(norm, backend, monkeypatch):
    """Channel-major space-to-depth (F.unfold order) with a norm over the merged row: output and gradient of x."""
    _use(backend, monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(2 * 16, 8, requires_grad=True)
    w = torch.randn(5, 32)
    nw = torch.randn(32)
    rows = space_to_depth_rows(2, 4, 4, 2)
    with fastvlm.trace() as t:
        y = mlp_projector(x, w, act="none", norm=norm, norm_weight=nw, rows=rows, a_mode="concat_cm")
    _ran(t, backend)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)

    x64 = x.detach().double().requires_grad_()
    a = x64[rows].transpose(1, 2).reshape(rows.shape[0], 32)  # A[m, d * Q + q] = x[rows[m, q], d]
    if norm == "rmsnorm":
        a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5)
    else:
        a = F.layer_norm(a, (32,), eps=1e-5)
    ref = (a * nw.double()) @ w.double().t()
    (gref,) = torch.autograd.grad(ref, x64, gy.double())
    assert_same(y, ref, torch.float32, 32, roundings=2)
    assert_same(gx, gref, torch.float32, 32 * 5, roundings=2, what="grad x")


# ------------------------------------------------------------------------------------------------ activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_activation_on_special_values(dtype, backend, monkeypatch):
    """act(bias) through the GEMM epilogue (x = 0, W = 0) against the PyTorch activation, and its gradient against
    PyTorch's autograd."""
    _use(backend, monkeypatch)
    n = len(SPECIAL)
    b = torch.tensor(SPECIAL).to(dtype)
    for act in ACTIVATIONS:
        b1 = b.clone().requires_grad_()
        with fastvlm.trace() as t:
            y = mlp_projector(torch.zeros(3, 16, dtype=dtype), torch.zeros(n, 16, dtype=dtype), b1, act=act)
        _ran(t, backend)
        (g,) = torch.autograd.grad(y[0], b1, torch.ones(n, dtype=dtype))
        r1 = b.clone().requires_grad_()
        ref = act_ref(r1, act)
        (gref,) = torch.autograd.grad(ref, r1, torch.ones(n, dtype=dtype))
        assert_same(y, ref.expand(3, n), dtype, 1, roundings=3, what=act)
        assert_same(g, gref, dtype, 1, roundings=3, what=f"{act} gradient")


def _with_specials(x):
    x = x.clone()
    flat = x.view(-1)
    flat[5] = NAN
    flat[x.shape[-1] * 3 + 1] = INF
    flat[-2] = -INF
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_keeps_nan_functional(backend, monkeypatch):
    _use(backend, monkeypatch)
    torch.manual_seed(1)
    x = _with_specials(torch.randn(10, 24))
    w1, b1, w2, b2 = torch.randn(40, 24), torch.randn(40), torch.randn(12, 40), torch.randn(12)
    with fastvlm.trace() as t:
        y = mlp_projector(x, w1, b1, w2, b2, act="relu")
    _ran(t, backend)
    ref = F.linear(F.relu(F.linear(x.double(), w1.double(), b1.double())), w2.double(), b2.double())
    assert torch.isnan(ref).any()
    assert_same(y, ref, torch.float32, 40, roundings=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_keeps_nan_llava_module(backend, monkeypatch):
    _use(backend, monkeypatch)
    m = build("llava", act="relu")
    fused = fastvlm.nn.from_module(m)
    torch.manual_seed(2)
    x = _with_specials(torch.randn(2, 7, m.linear_1.in_features))
    with torch.no_grad(), fastvlm.trace() as t:
        y = fused(x)
        ref = m.double()(x.double())
    _ran(t, backend)
    assert torch.isnan(ref).any()
    assert_same(y, ref, torch.float32, m.linear_1.out_features, roundings=2)


@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_keeps_nan_feature_map_projector(pool, backend, monkeypatch):
    _use(backend, monkeypatch)
    torch.manual_seed(3)
    x = _with_specials(torch.randn(2, 16, 4, 6))
    w1, b1, w2, b2 = torch.randn(24, 16), torch.randn(24), torch.randn(8, 24), torch.randn(8)
    with fastvlm.trace() as t:
        y = feature_map_projector(x, w1, b1, w2, b2, act="relu", pool=pool)
    _ran(t, backend)
    tokens = F.avg_pool2d(x.double(), pool).flatten(2).transpose(1, 2)
    ref = F.linear(F.relu(F.linear(tokens, w1.double(), b1.double())), w2.double(), b2.double())
    assert torch.isnan(ref).any()
    assert_same(y, ref, torch.float32, 24, roundings=2)


# ------------------------------------------------------------------------------------------------ max pooling


def _max_pool_ref(x, B, H, W, k):
    """nn.MaxPool2d over the token grid (LLaVA-NeXT-Video's pooler), as [B * H/k * W/k, D] tokens."""
    D = x.shape[-1]
    g = x.view(B, H, W, D).permute(0, 3, 1, 2)
    return F.max_pool2d(g, k).flatten(2).transpose(1, 2).reshape(-1, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pooling_keeps_nan(dtype, backend, monkeypatch):
    """A NaN that is not the largest value of its window wins, as in PyTorch's max pooling: pool_tokens and the
    GEMM's pooled A-load."""
    _use(backend, monkeypatch)
    torch.manual_seed(4)
    B, H, W, D = 2, 4, 6, 20
    x = torch.randn(B * H * W, D).to(dtype)
    x[0, 3] = NAN  # window 0: its other values are larger than nothing, NaN must still win
    x[1, 3] = 50.0
    x[7, 0] = -INF
    x[W * 2 + 3, 5] = INF
    rows = pool_rows(B, H, W, 2)
    ref = _max_pool_ref(x.double(), B, H, W, 2)
    with fastvlm.trace() as t:
        y = pool_tokens(x, rows, "max")
    _ran(t, backend)
    assert_same(y, ref, dtype, 1)
    w = torch.randn(9, D).to(dtype)
    with fastvlm.trace() as t:
        z = mlp_projector(x, w, act="none", rows=rows, a_mode="max")
    _ran(t, backend)
    assert_same(z, ref @ w.double().t(), dtype, D, roundings=2)


# ------------------------------------------------------------------------------------------------ attention


def _eager(q, k, v, mask=None, scale=None):
    """transformers' eager attention (the BLIP-2 Q-Former's), O [B, Lq, H, D]."""
    from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return eager_attention_forward(torch.nn.Module().eval(), q, k, v, mask, scaling=scale)[0]


def _qkv(B, H, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2) for L in (Lq, Lk, Lk)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_bias_makes_its_rows_nan(backend, monkeypatch):
    """A NaN in an additive mask is not a masked key: eager attention's rows that meet it are NaN."""
    _use(backend, monkeypatch)
    B, H, Lq, Lk, D = 2, 2, 8, 20, 16
    q, k, v = _qkv(B, H, Lq, Lk, D)
    key = torch.zeros(B, Lk)
    key[0, 3] = NAN
    key[1, 4:9] = torch.finfo(torch.float32).min
    full = torch.zeros(B, 1, Lq, Lk)
    full[1, 0, 2, 5] = NAN
    with fastvlm.trace() as t:
        o1 = attention(q, k, v, key_mask=key)
        o2 = attention(q, k, v, attn_mask=full)
    _ran(t, backend)
    assert_same(o1, _eager(q, k, v, key[:, None, None, :]), torch.float32, Lk, roundings=3)
    assert_same(o2, _eager(q, k, v, full), torch.float32, Lk, roundings=3)
    assert torch.isnan(o1[0]).all() and torch.isnan(o2[1, 2]).all() and torch.isfinite(o2[1, 3]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nonfinite_keys_stay_in_their_head(dtype, backend, monkeypatch):
    """4 heads of 8 queries share one 64-row tile (block-diagonal Q): an Inf or NaN key of one head must leave the
    other heads' outputs finite and exact; the heads that own them match eager attention's NaN/Inf."""
    _use(backend, monkeypatch)
    B, H, Lq, Lk, D = 2, 4, 8, 70, 16
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, seed=1)
    k, v = k.clone(), v.clone()
    k[0, 1, 5, 2] = INF
    k[0, 2, 66, 0] = NAN
    k[1, 3, 9, 1] = -INF
    v[1, 0, 12, 3] = INF
    with fastvlm.trace() as t:
        o = attention(q, k, v)
    _ran(t, backend)
    ref = _eager(q.double(), k.double(), v.double())
    assert torch.isfinite(o[0, :, 0]).all() and torch.isfinite(o[0, :, 3]).all()
    assert_same(o, ref, dtype, Lk, roundings=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_rows_scored_all_neg_inf_are_nan(backend, monkeypatch):
    """softmax over scores that are all -inf is NaN in eager attention: a single key with a -inf bias, a -inf
    product q.k, a row of -inf biases. Keep-flags that keep no key give 0, as SDPA does."""
    _use(backend, monkeypatch)
    B, H, Lq, D = 2, 2, 4, 16
    q, k, v = _qkv(B, H, Lq, 1, D, seed=2)
    key = torch.zeros(B, 1)
    key[0, 0] = -INF
    k2 = k.clone()
    k2[1, 0, 0, 0] = INF
    q2 = q.clone()
    q2[1, 0, :, 0] = -1.0  # q.k = -inf for every query of batch 1, head 0
    _, kl, vl = _qkv(B, H, Lq, 9, D, seed=3)
    full = torch.zeros(B, H, Lq, 9)
    full[0, 1, 2] = -INF
    full[1, 0, 0, 3:] = -INF
    keep = torch.ones(B, 9, dtype=torch.bool)
    keep[1] = False
    with fastvlm.trace() as t:
        o1 = attention(q, k, v, key_mask=key)
        o2 = attention(q2, k2, v)
        o3 = attention(q, kl, vl, attn_mask=full)
        o4 = attention(q, kl, vl, key_mask=keep)
    _ran(t, backend)
    assert_same(o1, _eager(q, k, v, key[:, None, None, :]), torch.float32, 1)
    assert_same(o2, _eager(q2, k2, v), torch.float32, 1)
    assert_same(o3, _eager(q, kl, vl, full), torch.float32, 9, roundings=3)
    assert torch.isnan(o1[0]).all() and torch.isnan(o2[1, :, 0]).all() and torch.isnan(o3[0, 2, 1]).all()
    sdpa = F.scaled_dot_product_attention(q, kl, vl, attn_mask=keep[:, None, None, :]).transpose(1, 2)
    assert_same(o4, sdpa, torch.float32, 9, roundings=3)
    assert torch.equal(o4[1], torch.zeros_like(o4[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_row_masked_by_finfo_min_averages_like_eager(dtype, backend, monkeypatch):
    """transformers' finite finfo(dtype).min bias over every key of a row: eager attention averages the values
    (the bias absorbs the scores); so must both paths, in every dtype, for the key mask and the full mask. fp32 also
    checks the gradients."""
    _use(backend, monkeypatch)
    B, H, Lq, Lk, D = 2, 2, 8, 20, 16
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, seed=4)
    lo = torch.finfo(dtype).min
    key = torch.zeros(B, Lk, dtype=dtype)
    key[1] = lo
    key[0, 3:7] = lo
    full = key[:, None, None, :].expand(B, 1, Lq, Lk)
    grads = dtype == torch.float32
    if grads:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with fastvlm.trace() as t:
        o1 = attention(q, k, v, key_mask=key)
        o2 = attention(q, k, v, attn_mask=full)
    _ran(t, backend)
    ref = _eager(q, k, v, full)
    # eager runs in ``dtype`` too: the two results differ by at most the sum of their errors against exact
    bound = dict(roundings=12)  # 2 x tol(3 roundings) == tol(12 roundings) in its dtype term
    assert_same(o1, ref, dtype, 4 * Lk, **bound)
    assert_same(o2, ref, dtype, 4 * Lk, **bound)
    assert_same(o1[1], v[1].mean(dim=1, keepdim=True).transpose(0, 1).expand(Lq, H, D), dtype, 4 * Lk, **bound)
    if grads:
        go = torch.randn_like(o1)
        for o in (o1, o2):
            got = torch.autograd.grad(o, (q, k, v), go, retain_graph=True)
            want = torch.autograd.grad(ref, (q, k, v), go, retain_graph=True)
            for name, a, b in zip("qkv", got, want):
                assert_same(a, b, dtype, 4 * Lk, **bound, what=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_register_attention_qformer_with_an_all_zero_encoder_mask(dtype, backend, monkeypatch):
    """A BLIP-2 Q-Former switched to fastvlm's attention (register_attention) matches the same Q-Former with eager
    attention when an image's encoder_attention_mask is all zeros."""
    tf = pytest.importorskip("transformers")
    from fastvlm.testing import randomize_

    _use(backend, monkeypatch)
    torch.manual_seed(5)
    cfg = tf.Blip2QFormerConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=24,
                                num_hidden_layers=1)
    cfg._attn_implementation = "eager"
    m = randomize_(tf.Blip2QFormerModel(cfg).eval(), std=0.3).to(dtype)
    queries = torch.randn(2, 8, 32).to(dtype)
    enc = torch.randn(2, 10, 24).to(dtype)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1] = 0
    mask[0, 7:] = 0
    with torch.no_grad():
        ref = m(query_embeds=queries, encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
        m.set_attn_implementation(fastvlm.register_attention())
        with fastvlm.trace() as t:
            out = m(query_embeds=queries, encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
    _ran(t, backend)
    assert_same(out, ref, dtype, 10 * 64, roundings=12)


def _eager_keyless_zero(q, k, v, keep):
    """Eager attention with keep-flags ``keep`` [B, 1|H, Lq|1, Lk] (as transformers' 0 / finfo.min mask), with the
    documented zeros (0 * O: NaN stays NaN) on rows whose flags keep no key."""
    out = _eager(q, k, v, torch.where(keep, 0.0, torch.finfo(q.dtype).min).to(q.dtype))
    dead = ~keep.any(-1).expand(q.shape[:3])  # [B, H, Lq]
    return torch.where(dead.transpose(1, 2)[..., None], out * 0, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_row_without_a_kept_key_meets_a_nonfinite_score(backend, monkeypatch):
    """Rows whose keep-flags keep no key: eager attention adds finfo.min to every score, so a NaN or +Inf score
    makes the row NaN, and so do scores that are all -inf (-inf + finfo.min is -inf; softmax over -inf is NaN);
    otherwise the documented zeros. Both paths, key mask and 4-D mask, 4 packed heads (the kernel's head isolation
    pass meets the rows too)."""
    _use(backend, monkeypatch)
    B, H, Lq, Lk, D = 2, 4, 8, 6, 16
    q, k, v = (t.clone() for t in _qkv(B, H, Lq, Lk, D, seed=7))
    q[1, :3, :, 0] = 1.0
    k[1, 0, 2, 5] = NAN  # head 0: a NaN score
    k[1, 1, 3, 0] = INF  # head 1: a +Inf score
    k[1, 2, :, 0] = -INF  # head 2: every score -inf
    k[1, 3, 4, 1] = -INF if float(q[1, 3, 0, 1]) > 0 else INF  # head 3 (query 0): one -inf score among finite ones
    k[0, 1, 5, 0] = INF  # batch 0: a masked key's +Inf score in rows that keep other keys
    q[0, 1, :, 0] = 1.0
    keep = torch.ones(B, Lk, dtype=torch.bool)
    keep[1] = False
    keep[0, 5] = False
    full = keep[:, None, None, :].expand(B, 1, Lq, Lk).clone()
    full[0, 0, 5:] = False  # batch 0: three rows without a key (scores finite except head 1's +Inf)
    with fastvlm.trace() as t:
        o1 = attention(q, k, v, key_mask=keep)
        o2 = attention(q, k, v, attn_mask=full)
    _ran(t, backend)
    ref1 = _eager_keyless_zero(q, k, v, keep[:, None, None, :])
    ref2 = _eager_keyless_zero(q, k, v, full)
    assert torch.isnan(ref1[1, :, :3]).all() and torch.isfinite(ref1[1, 0, 3]).all() and not ref1[1, 0, 3].any()
    assert torch.isnan(ref2[0, :, 1]).all() and not ref2[0, 5:, 0].any()
    assert_same(o1, ref1, torch.float32, Lk, roundings=3)
    assert_same(o2, ref2, torch.float32, Lk, roundings=3)
