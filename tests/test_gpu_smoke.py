"""GPU smoke subset: every kernel family once, compiled for the device, against a float64 reference on the device.

The first step of benchmarks/gpu_session.sh (``pytest -m gpu_smoke``, under two minutes on an H200): compiled kernels
can fail where the interpreter passed (layouts, masks, races), so each family runs once at a connector's real width
before any benchmark: the dense GEMM with its norm prologue, GELU epilogue and backward, and its TMA core's split
tail at LLaVA B=1; the gather A-modes (pixel
shuffle concat, pooled mean with Gemma's RMSNorm, max); the im2col patch embedding with class token, positions and the
row-norm pass, and its uint8 masked load; Qwen-VL rows with position taps and still frames; the NCHW feature-map
load; the Q-Former's linear + residual + LayerNorm; cross-attention with a key mask and the Perceiver's two-source
grouped-query form; the Perceiver's RMSNorm-gated GEMM; token pooling; the image-token scatter; a patched tiny
model; and the connector path under torch.compile(mode="reduce-overhead"), its kernels launched by Inductor in a CUDA
graph.
``FASTVLM_BACKEND=triton``: a fallback is an error, and each test checks that its ops ran on "triton".

Without CUDA these tests are skipped, unless ``FASTVLM_SMOKE_CPU=1`` (the session's ``--dry-run``): then they run at
tiny sizes with the kernels in the Triton interpreter, so the subset itself cannot rot.
"""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastvlm
from helpers import assert_close

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.gpu_smoke, pytest.mark.skipif(
    not CUDA and os.environ.get("FASTVLM_SMOKE_CPU") != "1",
    reason="GPU smoke subset: needs CUDA (FASTVLM_SMOKE_CPU=1 runs it tiny in the Triton interpreter)")]


def size(real, tiny):
    """A connector's real size on the GPU, a tiny one in the interpreter."""
    return real if CUDA else tiny


@pytest.fixture(autouse=True)
def _triton_only(monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        yield


def _only_triton(t):
    """Every fastvlm op in the trace ran its Triton kernel (markers such as the hand-off's are not ops)."""
    backends = {r.backend for r in t.records if r.op.startswith("fastvlm::")}
    assert backends == {"triton"}, str(t)


def _r(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def test_dense_gemm_norm_prologue_gelu_and_backward():
    """InternVL's projector shape: LayerNorm prologue (row statistics pass), GEMM + GELU, second GEMM; backward."""
    from fastvlm.ops.projector import mlp_projector
    from fastvlm.reference.projector import mlp_projector_ref

    M, K, I, O = size((576, 1024, 4096, 4096), (37, 48, 64, 40))
    dt = torch.bfloat16
    x = _r(M, K, dtype=dt) * 2 + 1
    w1, b1 = _r(I, K, dtype=dt, scale=K ** -0.5), _r(I, dtype=dt, scale=0.1)
    w2, b2 = _r(O, I, dtype=dt, scale=I ** -0.5), _r(O, dtype=dt, scale=0.1)
    nw, nb = 1 + _r(K, dtype=dt, scale=0.1), _r(K, dtype=dt, scale=0.1)
    params = [w1, b1, w2, b2, nw, nb]
    for p in params:
        p.requires_grad_(True)
    kw = dict(act="gelu", norm="layernorm", eps=1e-5)
    with fastvlm.trace() as t:
        y = mlp_projector(x, w1, b1, w2, b2, norm_weight=nw, norm_bias=nb, **kw)
    _only_triton(t)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    ref = mlp_projector_ref(x.double(), p64[0], p64[1], p64[2], p64[3], norm_weight=p64[4], norm_bias=p64[5], **kw)
    assert_close(y, ref, dt, I, roundings=3)
    gy = _r(M, O, dtype=dt)
    y.backward(gy)
    ref.backward(gy.double())
    for p, q, name in zip(params, p64, ("w1", "b1", "w2", "b2", "norm weight", "norm bias")):
        assert_close(p.grad, q.grad, dt, M, roundings=4, what=f"gradient of {name}")


def test_dense_gemm_tma_core_split_tail(monkeypatch):
    """LLaVA-1.5 at B=1 (576 x 1024 -> 4096 -> 4096): on sm_90 the TMA core (kernels/gemm_tma.py) runs both GEMMs
    with their last wave split over K. Against float64, and the same bits on every call (the split tail sums its
    partials in index order whatever order they arrive in; a missing or stale partial would change the result)."""
    from fastvlm.kernels import gemm
    from fastvlm.ops.projector import mlp_projector
    from fastvlm.reference.projector import mlp_projector_ref

    if CUDA and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA core is for sm_90")
    monkeypatch.setenv("FASTVLM_GEMM_CORE", "tma")  # (on sm_90 the default too; the interpreter runs it tiny)
    gemm._CALLS.clear()
    M, K, I = size((576, 1024, 4096), (70, 256, 100))
    dt = torch.bfloat16
    x = _r(M, K, dtype=dt)
    w1, b1 = _r(I, K, dtype=dt, scale=K ** -0.5), _r(I, dtype=dt, scale=0.1)
    w2, b2 = _r(I, I, dtype=dt, scale=I ** -0.5), _r(I, dtype=dt, scale=0.1)
    with torch.no_grad(), fastvlm.trace() as t:
        ys = [mlp_projector(x, w1, b1, w2, b2, act="gelu") for _ in range(4)]
    gemm._CALLS.clear()
    _only_triton(t)
    assert all("gemm core: TMA" in r.note for r in t.records if r.op.startswith("fastvlm::")), str(t)
    if CUDA:
        assert "split 4-way" in t.records[0].note, str(t)  # 160 tiles: 132 whole, 28 split over K
    ref = mlp_projector_ref(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), act="gelu")
    assert_close(ys[0], ref, dt, I, roundings=2)
    assert all(torch.equal(y, ys[0]) for y in ys[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gather_concat_pixel_shuffle(dtype):
    """Idefics3-8B's pixel shuffle (scale 2 of a 26 x 26 grid of 1152): the merged rows gathered in the A-load."""
    from fastvlm.ops.layout import gather_ref, space_to_depth_rows
    from fastvlm.ops.projector import mlp_projector

    C, N, side = size((1152, 4096, 26), (24, 40, 6))
    x = _r(2 * side * side, C, dtype=dtype)
    rows = space_to_depth_rows(2, side, side, 2, DEV)
    w = _r(N, 4 * C, dtype=dtype, scale=0.01)
    with fastvlm.trace() as t:
        out = mlp_projector(x, w, act="none", rows=rows, a_mode="concat")
    _only_triton(t)
    assert_close(out, gather_ref(x.double(), rows, "concat") @ w.double().T, dtype, 4 * C, roundings=2)


def _pool_case(dtype):
    from fastvlm.ops.layout import pool_rows

    C, N, g = size((1152, 2560, 64), (24, 24, 8))
    xg = _r(2 * g * g, C, dtype=dtype)
    return xg, pool_rows(2, g, g, 4, DEV), _r(N, C, dtype=dtype, scale=0.02), C


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gather_mean_pool_rmsnorm(dtype):
    """Gemma 3's 4 x 4 average pool of a 64 x 64 grid read in the A-load, RMSNorm(1 + w) in fp32 (the pooled-rows
    statistics pass), then the matmul."""
    from fastvlm.ops.layout import gather_ref
    from fastvlm.ops.projector import mlp_projector

    xg, prow, wg, C = _pool_case(dtype)
    nw = _r(C, dtype=dtype, scale=0.1)
    with fastvlm.trace() as t:
        out = mlp_projector(xg, wg, act="none", norm="rmsnorm_1p", norm_weight=nw, eps=1e-6, rows=prow, a_mode="mean")
    _only_triton(t)
    pooled = gather_ref(xg.double(), prow, "mean")
    normed = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + nw.double())
    assert_close(out, normed @ wg.double().T, dtype, C * 16, roundings=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gather_max_pool_gelu(dtype):
    """Max over 4 x 4 windows in the A-load, with a GELU epilogue."""
    from fastvlm.ops.layout import gather_ref
    from fastvlm.ops.projector import mlp_projector

    xg, prow, wg, C = _pool_case(dtype)
    with fastvlm.trace() as t:
        mx = mlp_projector(xg, wg, act="gelu", rows=prow, a_mode="max")
    _only_triton(t)
    assert_close(mx, F.gelu(gather_ref(xg.double(), prow, "max") @ wg.double().T), dtype, C, roundings=2)


def test_patch_embed_class_token_positions_prenorm_and_uint8():
    """CLIP-L/14-336's embeddings with the pre-LayerNorm (the row-norm pass), and uint8 pixels of padded images."""
    from fastvlm.ops.patch_embed import im2col_ref, patch_embed

    B, img, D = size((8, 336, 1024), (2, 42, 32))
    p, dt = 14, torch.bfloat16
    T = (img // p) ** 2
    x = torch.randn(B, 3, img, img, device=DEV)
    w, b = _r(D, 3, p, p, dtype=dt, scale=0.02), _r(D, dtype=dt, scale=0.02)
    pos, cls = _r(T + 1, D, dtype=dt), _r(D, dtype=dt)
    lw, lb = 1 + _r(D, dtype=dt, scale=0.1), _r(D, dtype=dt, scale=0.1)
    with fastvlm.trace() as t:
        out = patch_embed(x.to(dt), w, b, pos=pos, pos_rows=torch.arange(1, T + 1, device=DEV), cls=cls,
                          norm_weight=lw, norm_bias=lb)
    _only_triton(t)
    y = (im2col_ref(x.to(dt).double(), p) @ w.double().reshape(D, -1).T + b.double()).view(B, T, D)
    y = torch.cat([(cls.double() + pos.double()[0]).expand(B, 1, D), y + pos.double()[1:]], 1)
    ref = F.layer_norm(y, (D,), lw.double(), lb.double(), 1e-5)
    assert_close(out, ref, dt, 3 * p * p, roundings=4)
    # uint8 pixels, each image padded at the bottom/right: pixels outside read as 0 after normalising
    img8 = torch.randint(0, 256, (B, 3, img, img), dtype=torch.uint8, device=DEV)
    hw = torch.tensor([[img, img]] + [[img // 2 + 3, img - 5]] * (B - 1), device=DEV)
    mean, std = torch.full((3,), 0.5, device=DEV), torch.full((3,), 0.5, device=DEV)
    keep = torch.zeros(B, 1, img, img, dtype=torch.bool, device=DEV)
    for i, (h, wd) in enumerate(hw.tolist()):
        keep[i, :, :h, :wd] = True
    norm = (img8.double() / 255 - 0.5) / 0.5 * keep
    rows = torch.arange(T, device=DEV)
    with fastvlm.trace() as t:
        got = patch_embed(img8, w, b, pos=pos[:T], pos_rows=rows, pixel_scale=1 / (255 * std), pixel_shift=-mean / std,
                          image_hw=hw)
    _only_triton(t)
    ref = (im2col_ref(norm, p) @ w.double().reshape(D, -1).T + b.double()).view(B, T, D) + pos.double()[:T]
    assert_close(got, ref, dt, 3 * p * p, roundings=2)


def test_rows_embed_position_taps_and_still_frames():
    """Qwen3-VL's rows (K = 1536 -> 1152, bias) with 4 bilinear position taps, and the still-image half-K kernel."""
    from fastvlm.ops.rows_embed import rows_embed

    N, D, q, L = size((4096, 1152, 256, 2304), (40, 48, 16, 64))
    dt = torch.bfloat16
    frame = torch.randn(N, 3, 1, q, device=DEV)
    x = frame.expand(N, 3, 2, q).reshape(N, -1).to(dt)
    w, b = _r(D, 3, 2, q, dtype=dt, scale=0.02), _r(D, dtype=dt, scale=0.02)
    pos = _r(L, D, dtype=dt, scale=0.02)
    idx = torch.randint(0, L, (N, 4), device=DEV)
    tw = torch.rand(N, 4, device=DEV)
    ref = x.double() @ w.reshape(D, -1).double().T + b.double() + (pos.double()[idx] * tw.double()[..., None]).sum(1)
    with fastvlm.trace() as t:
        out = rows_embed(x, w.reshape(D, -1), b, pos=pos, pos_idx=idx, pos_weights=tw)
        still = rows_embed(x, w.float().sum(2).to(dt).reshape(D, -1), b, pos=pos, pos_idx=idx, pos_weights=tw,
                           frames=2, chunk=q, full_weight=w.reshape(D, -1))
    _only_triton(t)
    assert_close(out, ref, dt, 6 * q + 4)
    assert_close(still, ref, dt, 6 * q + 4, roundings=2)


def test_feature_map_nchw_pooled_load():
    """ConvNeXt-L's stage-4 map read in place (NCHW), 2 x 2 average pool, Linear-GELU-Linear."""
    from fastvlm.ops.feature_map import feature_map_projector
    from fastvlm.reference.feature_map import feature_map_projector_ref

    B, C, side, I, O = size((2, 1536, 24, 4096, 4096), (2, 20, 6, 24, 16))
    dt = torch.bfloat16
    x = _r(B, C, side, side, dtype=dt)
    w1, b1 = _r(I, C, dtype=dt, scale=C ** -0.5), _r(I, dtype=dt, scale=0.1)
    w2, b2 = _r(O, I, dtype=dt, scale=I ** -0.5), _r(O, dtype=dt, scale=0.1)
    with fastvlm.trace() as t:
        out = feature_map_projector(x, w1, b1, w2, b2, act="gelu", pool=2)
    _only_triton(t)
    d = lambda v: v.double()  # noqa: E731
    ref = feature_map_projector_ref(d(x), d(w1), d(b1), d(w2), d(b2), act="gelu", pool=(2, 2))
    assert_close(out, ref, dt, I, roundings=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qformer_linear_residual_layernorm(dtype):
    """The Q-Former's SelfOutput at BLIP-2 width: x @ W^T + b + residual, LayerNorm, in fp32 (tf32x3) and bf16."""
    from fastvlm.ops.linear_norm import linear_residual_layernorm
    from fastvlm.reference.linear_norm import linear_norm_ref

    M, K, N = size((8 * 32, 3072, 768), (37, 48, 40))
    x, w, b = _r(M, K, dtype=dtype), _r(N, K, dtype=dtype, scale=K ** -0.5), _r(N, dtype=dtype, scale=0.1)
    res, lw, lb = _r(M, N, dtype=dtype), 1 + _r(N, dtype=dtype, scale=0.1), _r(N, dtype=dtype, scale=0.1)
    with fastvlm.trace() as t:
        out = linear_residual_layernorm(x, w, b, res, lw, lb, 1e-12)
    _only_triton(t)
    assert_close(out, linear_norm_ref(x, w, b, res, lw, lb, 1e-12), dtype, K, roundings=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_cross_and_two_source_gqa(dtype):
    """BLIP-2's cross-attention (32 queries x 257 keys, 12 heads of 64, a padded key mask), then Idefics2's perceiver
    attention (64 latents over context + latents, 16 heads of 96 on 4 kv heads)."""
    from fastvlm.ops.attention import attention
    from fastvlm.reference.attention import attention_ref

    B, H, Lq, Lk, D = size((8, 12, 32, 257, 64), (2, 3, 16, 40, 32))
    q = _r(B, Lq, H, D, dtype=dtype).transpose(1, 2)  # transformers' view(B, L, H, D).transpose(1, 2)
    k, v = _r(B, Lk, H, D, dtype=dtype).transpose(1, 2), _r(B, Lk, H, D, dtype=dtype).transpose(1, 2)
    key = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
    key[-1, Lk - Lk // 3:] = False
    with fastvlm.trace() as t:
        o = attention(q, k, v, key_mask=key)
    o64, _ = attention_ref(q.double(), k.double(), v.double(), key)
    assert_close(o, o64, dtype, max(D, Lk), roundings=2)
    B, H, Hkv, Lq, Lc, D = size((2, 16, 4, 64, 729, 96), (2, 4, 2, 8, 30, 24))
    q = _r(B, Lq, H, D, dtype=dtype).transpose(1, 2)
    k, v = (_r(B, Lc, Hkv, D, dtype=dtype).transpose(1, 2) for _ in range(2))
    k2, v2 = (_r(B, Lq, Hkv, D, dtype=dtype).transpose(1, 2) for _ in range(2))
    key = torch.ones(B, Lc, dtype=torch.bool, device=DEV)
    key[-1, Lc - Lc // 3:] = False
    with fastvlm.trace() as t2:
        o = attention(q, k, v, key_mask=key, k2=k2, v2=v2)
    d = lambda v: v.double()  # noqa: E731
    o64, _ = attention_ref(d(q), d(k), d(v), key, None, None, d(k2), d(v2))
    assert_close(o, o64, dtype, max(D, Lc + Lq), roundings=2)
    _only_triton(t)
    _only_triton(t2)


def test_perceiver_rmsnorm_gated_gemm_with_residual():
    """Idefics2's perceiver MLP: RMSNorm prologue, gate/up pair with SiLU, and a residual; then the plain norm GEMM."""
    from fastvlm.ops.perceiver import norm_linear

    M, K, N = size((8 * 64, 4096, 16384), (24, 48, 40))
    dt = torch.bfloat16
    x, nw = _r(M, K, dtype=dt), 1 + _r(K, dtype=dt, scale=0.1)
    w, wu, res = _r(N, K, dtype=dt, scale=K ** -0.5), _r(N, K, dtype=dt, scale=K ** -0.5), _r(M, N, dtype=dt)
    with fastvlm.trace() as t:
        y = norm_linear(x, w, w_up=wu, norm_weight=nw, residual=res, eps=1e-6, act="silu")
        y2 = norm_linear(x, w, norm_weight=nw, eps=1e-6)
    _only_triton(t)
    xf = x.double()
    xn = nw.double() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt).double()
    assert_close(y, res.double() + F.silu(xn @ w.double().T) * (xn @ wu.double().T), dt, K, roundings=3)
    assert_close(y2, xn @ w.double().T, dt, K, roundings=2)


def test_pool_tokens_and_scatter():
    """LLaVA-NeXT-Video's 2 x 2 token pooling (mean, max), and the image-token scatter into inputs_embeds."""
    from fastvlm.ops.layout import gather_ref, pool_rows
    from fastvlm.ops.pool import pool_tokens
    from fastvlm.ops.scatter import scatter_image_features

    n, side, D = size((8, 24, 1024), (2, 4, 24))
    x = _r(n * side * side, D)
    rows = pool_rows(n, side, side, 2, DEV)
    with fastvlm.trace() as t:
        mean, mx = pool_tokens(x, rows, "mean"), pool_tokens(x, rows, "max")
    assert_close(mean, gather_ref(x.double(), rows, "mean"), torch.bfloat16, 4)
    assert torch.equal(mx, gather_ref(x, rows, "max"))
    B, S, D, k = size((8, 640, 4096, 576), (2, 40, 24, 30))
    emb = _r(B, S, D)
    mask = torch.zeros(B, S, dtype=torch.bool, device=DEV)
    mask[:, 5:5 + k] = True
    feats = _r(B * k, D)
    with fastvlm.trace() as t2:
        out = scatter_image_features(emb, mask, feats)
    assert torch.equal(out, emb.masked_scatter(mask[..., None].expand_as(emb), feats))
    _only_triton(t)
    _only_triton(t2)


def test_patched_tiny_llava_logits(monkeypatch):
    """fastvlm.patch on a tiny random LLaVA (fp32): logits equal the unpatched model's, on the kernels."""
    from fastvlm.testing import rel_err
    from fastvlm.tiny_models import build_tiny_model

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the unpatched conv in IEEE fp32 too
    model, inputs = build_tiny_model("llava")
    model = model.to(DEV).eval()
    inputs = {k: v.to(DEV) for k, v in inputs.items()}
    with torch.no_grad():
        ref = model(**inputs).logits
        fastvlm.patch(model)
        with fastvlm.trace() as t:
            got = model(**inputs).logits
    _only_triton(t)
    assert rel_err(got, ref) < 1e-5


def test_per_shape_choice_times_the_candidates(monkeypatch, tmp_path):
    """FASTVLM_BACKEND=auto: the first call of a shape times the kernel and the eager ops (CUDA events on a GPU), the
    winner is written to the JSON cache and named in trace(); the result is right whichever won. In the dry run the
    choice is switched on for CPU tensors with a wall-clock timer, the kernel running in the interpreter."""
    from fastvlm import _dispatch, choice
    from fastvlm.bench import harness
    from fastvlm.ops.projector import mlp_projector
    from fastvlm.reference.projector import mlp_projector_ref

    monkeypatch.setenv("FASTVLM_BACKEND", "auto")
    monkeypatch.delenv("FASTVLM_CHOICE", raising=False)  # the GPU session turns it off for its benchmarks
    monkeypatch.setenv("FASTVLM_CACHE_DIR", str(tmp_path))
    if not CUDA:
        monkeypatch.setattr(choice, "applies", lambda device: choice.enabled())
        monkeypatch.setattr(_dispatch, "environment_reasons", lambda device: [])
        monkeypatch.setattr(choice, "timer", lambda fn, device: harness.measure(fn, warmup=1, reps=3, device="cpu")[0])
    choice.forget()
    M, K, I, O = size((576, 1024, 4096, 4096), (9, 32, 48, 16))
    dt = torch.bfloat16 if CUDA else torch.float32  # (the interpreter has no bf16 dots)
    x = _r(M, K, dtype=dt)
    w1, b1 = _r(I, K, dtype=dt, scale=K ** -0.5), _r(I, dtype=dt, scale=0.1)
    w2, b2 = _r(O, I, dtype=dt, scale=I ** -0.5), _r(O, dtype=dt, scale=0.1)
    with fastvlm.trace() as t:
        y = mlp_projector(x, w1, b1, w2, b2, act="gelu")
    choice.forget()
    assert "per-shape choice" in t.records[0].note, str(t)
    assert (tmp_path / "choices.json").exists()
    ref = mlp_projector_ref(*(a.double() for a in (x, w1, b1, w2, b2)), act="gelu")
    assert_close(y, ref, dt, I, roundings=2)


def test_compiled_connector_cuda_graph():
    """torch.compile(fullgraph=True, mode="reduce-overhead") on the connector path (LLaVA projector + hand-off): the
    code Inductor generates launches the fused kernels itself (no fastvlm custom op left), the graph is captured in
    a CUDA graph (no skip counted), and its replays match the original in float64. In the dry run: the same
    function through AOT autograd on CPU (the interpreter's kernels cannot be traced; the custom ops run)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from fastvlm.ops.scatter import scatter_image_features
    from fastvlm.testing import build

    dt = torch.bfloat16 if CUDA else torch.float32
    orig = build("llava").to(DEV)
    proj = fastvlm.nn.from_module(copy.deepcopy(orig)).to(dt)
    T = size(576, 9)
    D = proj.linear_2.out_features
    x = _r(1, T, proj.linear_1.in_features, dtype=dt)
    emb = _r(1, T + 8, D, dtype=dt)
    mask = torch.zeros(1, T + 8, dtype=torch.bool, device=DEV)
    mask[0, 4:4 + T] = True

    def connector(x, emb, mask):
        return scatter_image_features(emb, mask, proj(x).reshape(-1, D))

    with torch.no_grad():
        feats = orig.double()(x.double()).reshape(-1, D)
        ref = emb.double().masked_scatter(mask[..., None].expand(-1, -1, D), feats)
        torch._dynamo.reset()
        counters.clear()
        if CUDA:
            compiled = torch.compile(connector, fullgraph=True, mode="reduce-overhead")
            _, codes = run_and_get_code(compiled, x, emb, mask)
            code = "\n".join(codes)
            assert "_fused_linear_kernel" in code and "_scatter_rows_kernel" in code, code[-3000:]
            assert "torch.ops.fastvlm" not in code, code[-3000:]
        else:
            compiled = torch.compile(connector, fullgraph=True, backend="aot_eager")
        for _ in range(3):  # recorded, then replayed
            out = compiled(x, emb, mask).clone()
            assert_close(out, ref, dt, proj.linear_1.in_features + D, roundings=2)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
