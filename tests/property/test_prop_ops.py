"""Property tests of the token-level public ops against their originals, on both paths:
``fastvlm.feature_map_projector`` (avg_pool2d + flatten + Linear/act/Linear), ``fastvlm.linear_residual_layernorm``
(BERT SelfOutput: LayerNorm(dense(x) + residual)), ``fastvlm.scatter_image_features`` (transformers' count check +
masked_scatter) and ``fastvlm.ops.pool.pool_tokens`` (avg_pool2d / max_pool2d over the token grid, or a gather)."""
import math

import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import fastvlm
from conftest import budget, known
from fastvlm.ops.layout import gather_ref, pool_rows
from fastvlm.ops.pool import pool_tokens
from fastvlm.reference.activations import ACTIVATIONS
from fastvlm.reference.feature_map import feature_map_projector_ref
from fastvlm.reference.linear_norm import linear_norm_eager
from prop_rule import check, check_grads
from prop_strategies import ROWS, SMALL, WIDTH, dtypes, f64, has_specials, laid_out, values, weight

MAP_LAYOUTS = ("contiguous", "channels_last", "sliced", "strided_rows", "expanded", "transposed")


# ------------------------------------------------------------------------------------------- feature_map_projector


@st.composite
def feature_map_case(draw, path, grads=False):
    dtype = draw(dtypes(path))
    B, C = draw(st.integers(0, 3)), draw(WIDTH)
    H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    act = draw(st.sampled_from(ACTIVATIONS))
    two = draw(st.booleans())
    act2 = draw(st.sampled_from(ACTIVATIONS)) if two else "none"
    kinds = ("normal",) if grads else ("normal", "normal", "specials", "large")
    x = draw(laid_out(draw(values((B, C, H, W), dtype, kinds=kinds, scale=2.0)), MAP_LAYOUTS))
    if path == "triton" and known("nan_relu_maxpool") and "relu" in (act, act2) and has_specials(x):
        x = torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-2.0)
    hidden, out = draw(WIDTH), draw(WIDTH)
    w1 = weight(draw, (hidden, C), dtype)
    b1 = draw(values((hidden,), dtype, kinds=("normal",))) if draw(st.booleans()) else None
    w2 = weight(draw, (out, hidden), dtype) if two else None
    b2 = draw(values((out,), dtype, kinds=("normal",))) if two and draw(st.booleans()) else None
    pool = (ph, pw) if (ph, pw) != (1, 1) or draw(st.booleans()) else 1
    return dict(args=(x, w1, b1, w2, b2), kw=dict(act=act, act2=act2, pool=pool), dtype=dtype,
                k=C + hidden, roundings=2 + two + (ph * pw > 1))


def _fm_ref(x, w1, b1=None, w2=None, b2=None, *, act="none", act2="none", pool=1):
    return feature_map_projector_ref(x, w1, b1, w2, b2, act, act2, pool if isinstance(pool, tuple) else (pool, pool))


def test_feature_map_projector(path):
    @budget(path, torch=60, triton=6)
    @given(c=feature_map_case(path))
    def run(c):
        check(fastvlm.feature_map_projector, _fm_ref, c["args"], kwargs=c["kw"], original64=_fm_ref,
              args64=f64(c["args"]), names=("map", "pool", "linear_1", "linear_2"), dtype=c["dtype"], k=c["k"],
              roundings=c["roundings"])

    run()


def test_feature_map_projector_gradients(path):
    @budget(path, torch=25, triton=3)
    @given(c=feature_map_case(path, grads=True), seed=st.integers(0, 2 ** 31 - 1))
    def run(c, seed):
        x, w1, b1, w2, b2 = c["args"]
        leaves = {n: t for n, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)) if t is not None}

        def call(fn):
            return lambda d: fn(d["x"], d["w1"], d.get("b1"), d.get("w2"), d.get("b2"), **c["kw"])

        pool = c["kw"]["pool"]
        ph, pw = pool if isinstance(pool, tuple) else (pool, pool)
        assume(x.shape[0] > 0 and ph <= x.shape[2] and pw <= x.shape[3])
        check_grads(call(fastvlm.feature_map_projector), call(_fm_ref), leaves, dtype=c["dtype"],
                    k=c["k"] + x.shape[0] * x.shape[2] * x.shape[3], roundings=c["roundings"] + 2, gy_seed=seed)

    run()


# ------------------------------------------------------------------------------------- linear_residual_layernorm


@st.composite
def linear_norm_case(draw, path, grads=False):
    dtype = draw(dtypes(path))
    lead = draw(st.sampled_from([(), (1,), (2,), (2, 3)]))
    M, K, N = draw(ROWS), draw(WIDTH), draw(WIDTH)
    kinds = ("normal",) if grads else ("normal", "normal", "specials", "large")
    x = draw(laid_out(draw(values((*lead, M, K), dtype, kinds=kinds)), ("contiguous", "transposed", "sliced",
                                                                       "strided_rows", "expanded")))
    w = weight(draw, (N, K), dtype)
    b = draw(values((N,), dtype, kinds=("normal",))) if draw(st.booleans()) else None
    res = draw(laid_out(draw(values((*lead, M, N), dtype, kinds=kinds)))) if draw(st.booleans()) else None
    lw = draw(values((N,), dtype, kinds=("normal",), offset=1.0))
    lb = draw(values((N,), dtype, kinds=("normal",))) if draw(st.booleans()) else None
    eps = draw(st.sampled_from([1e-12, 1e-6, 1e-5]))
    return dict(args=(x, w, b, res, lw, lb, eps), dtype=dtype, k=K + N)


def test_linear_residual_layernorm(path):
    @budget(path, torch=60, triton=6)
    @given(c=linear_norm_case(path))
    def run(c):
        check(fastvlm.linear_residual_layernorm, linear_norm_eager, c["args"], original64=linear_norm_eager,
              args64=f64(c["args"]), names=("weight", "bias", "residual", "ln_weight", "ln_bias", "x"),
              dtype=c["dtype"], k=c["k"], roundings=3)

    run()


def test_linear_residual_layernorm_gradients(path):
    @budget(path, torch=25, triton=3)
    @given(c=linear_norm_case(path, grads=True), seed=st.integers(0, 2 ** 31 - 1))
    def run(c, seed):
        x, w, b, res, lw, lb, eps = c["args"]
        assume(w.shape[0] > 1)  # a LayerNorm over one element: constant output, gradients are rounding noise
        leaves = {n: t for n, t in (("x", x), ("w", w), ("b", b), ("res", res), ("lw", lw), ("lb", lb))
                  if t is not None}

        def call(fn):
            return lambda d: fn(d["x"], d["w"], d.get("b"), d.get("res"), d["lw"], d.get("lb"), eps)

        check_grads(call(fastvlm.linear_residual_layernorm), call(linear_norm_eager), leaves, dtype=c["dtype"],
                    k=c["k"] + x.numel() // max(x.shape[-1], 1), roundings=5, gy_seed=seed)

    run()


# ------------------------------------------------------------------------------------------ scatter_image_features


def _hf_scatter(inputs_embeds, image_mask, image_features):
    """transformers' hand-off (get_placeholder_mask + masked_scatter), as LLaVA's model code runs it."""
    if image_mask.dim() == inputs_embeds.dim():
        image_mask = image_mask[..., 0]
    mask = image_mask.to(torch.bool).unsqueeze(-1).expand_as(inputs_embeds)
    n_tokens = int(image_mask.to(torch.bool).sum())
    feats = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
    if inputs_embeds[mask].numel() != feats.numel():
        raise ValueError(f"Image features and image tokens do not match, tokens: {n_tokens}, features: "
                         f"{feats.reshape(-1, feats.shape[-1]).shape[0]}")
    return inputs_embeds.masked_scatter(mask, feats)


@st.composite
def scatter_case(draw, path, grads=False):
    dtype = draw(dtypes(path))
    fdtype = draw(st.sampled_from([dtype, dtype, torch.float32]))
    B, S, D = draw(st.integers(0, 3)), draw(SMALL), draw(WIDTH)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    mask = torch.rand(B, S, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    n = int(mask.sum()) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))  # sometimes the wrong count
    assume(n >= 0)
    kinds = ("normal",) if grads else ("normal", "normal", "specials", "large")
    embeds = draw(laid_out(draw(values((B, S, D), dtype, kinds=kinds))))
    fshape = draw(st.sampled_from([(n, D), (1, n, D)]))
    feats = draw(laid_out(draw(values(fshape, fdtype, kinds=kinds))))
    if draw(st.booleans()):
        mask = mask[..., None]
    mask = mask.to(draw(st.sampled_from([torch.bool, torch.bool, torch.int64])))
    return dict(args=(embeds, mask, feats), dtype=dtype)


def test_scatter_image_features(path):
    @budget(path, torch=60, triton=8)
    @given(c=scatter_case(path))
    def run(c):
        check(fastvlm.scatter_image_features, _hf_scatter, c["args"], original64=None,
              names=("image_features", "image_mask"), dtype=c["dtype"], k=1, roundings=1, same_error_only=True)

    run()


def test_scatter_image_features_gradients(path):
    @budget(path, torch=20, triton=3)
    @given(c=scatter_case(path, grads=True), seed=st.integers(0, 2 ** 31 - 1))
    def run(c, seed):
        embeds, mask, feats = c["args"]
        assume(int(mask.to(torch.bool).sum()) == feats.numel() // max(feats.shape[-1], 1))

        def call(fn):
            return lambda d: fn(d["embeds"], mask, d["feats"])

        check_grads(call(fastvlm.scatter_image_features), call(_hf_scatter), {"embeds": embeds, "feats": feats},
                    dtype=c["dtype"], k=1, roundings=1, gy_seed=seed)

    run()


# --------------------------------------------------------------------------------------------------- pool_tokens


@st.composite
def pool_case(draw, path, grads=False):
    dtype = draw(dtypes(path))
    mode = draw(st.sampled_from(("mean", "max")))
    D = draw(WIDTH)
    kinds = ("normal",) if grads else ("normal", "normal", "specials", "large")
    if draw(st.booleans()):  # a k x k window table over B grids: the original is avg_pool2d / max_pool2d
        k = draw(st.integers(1, 3))
        B, gh, gw = draw(st.integers(0, 2)), k * draw(st.integers(1, 3)), k * draw(st.integers(1, 3))
        rows, grid = pool_rows(B, gh, gw, k).clone(), (B, gh, gw, k)
        T = B * gh * gw
    else:  # any table of valid indices: the original is the gather + reduction
        T, M, Q = max(draw(ROWS), 1), draw(ROWS), draw(st.integers(1, 5))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        rows, grid = torch.randint(0, T, (M, Q), generator=g), None
    x = draw(laid_out(draw(values((T, D), dtype, kinds=kinds)), ("contiguous", "transposed", "sliced",
                                                                 "strided_rows", "expanded")))
    if path == "triton" and known("nan_relu_maxpool") and mode == "max" and has_specials(x):
        x = torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-2.0)
    return dict(args=(x, rows, mode), grid=grid, dtype=dtype)


def _pool_original(grid):
    def original(x, rows, mode):
        if grid is None:
            return gather_ref(x, rows, mode)
        B, gh, gw, k = grid
        m = x.reshape(B, gh, gw, x.shape[-1]).permute(0, 3, 1, 2)
        y = F.avg_pool2d(m, k) if mode == "mean" else F.max_pool2d(m, k)
        return y.flatten(2).transpose(1, 2).reshape(y.shape[0] * y.shape[2] * y.shape[3], x.shape[-1])

    return original


def test_pool_tokens(path):
    @budget(path, torch=60, triton=8)
    @given(c=pool_case(path))
    def run(c):
        orig = _pool_original(c["grid"])
        check(pool_tokens, orig, c["args"], original64=orig, args64=f64(c["args"]), names=("x", "rows"),
              dtype=c["dtype"], k=1 + 8 * (c["args"][2] == "mean"), roundings=2)

    run()


def test_pool_tokens_gradients(path):
    @budget(path, torch=25, triton=3)
    @given(c=pool_case(path, grads=True), seed=st.integers(0, 2 ** 31 - 1))
    def run(c, seed):
        x, rows, mode = c["args"]
        if known("pool_backward_zero_rows"):
            assume(rows.shape[0] > 0)
        orig = _pool_original(c["grid"])
        if mode == "max":  # ties make the subgradient a choice: keep the values distinct
            assume(x.numel() == 0 or x.double().unique().numel() == x.numel())
        check_grads(lambda d: pool_tokens(d["x"], rows, mode), lambda d: orig(d["x"], rows, mode), {"x": x},
                    dtype=c["dtype"], k=max(rows.shape[0], 1) * rows.shape[1], roundings=2, gy_seed=seed)

    run()
