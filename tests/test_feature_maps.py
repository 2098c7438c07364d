"""Convolutional feature-map connectors: the NCHW flatten / k x k average-pool reads of the fused GEMM
(a_mode "separable" / "separable_mean"), ``fastvlm.ops.feature_map_projector``, transformers' fast_vlm projector
reading the tower's map in place, and the C-Abstractor / LDPv2 fast modules against their references.

Interpreter cases are small and ragged (H, W not multiples of the tiles, non-square, pool 2, 3 and 2x3, maps whose
edge the pool drops), with float64 references, derived tolerances and NaN-poisoned margins around the map and the
output. Real sizes run on the PyTorch path.
"""

import pytest
import torch
import torch.nn.functional as F

import fastvlm
from fastvlm.kernels.gemm import fused_linear
from fastvlm.ops.feature_map import (feature_map_projector, map_tokens_adjoint, map_tokens_ref, offset_tables,
                                     tokens_as_map)
from fastvlm.reference.feature_map import CAbstractor, LDPv2Projector, feature_map_projector_ref
from fastvlm.testing import randomize_
from helpers import Guarded, assert_close, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("quiet_fallbacks")  # fallback warnings are asserted through trace()


def _weights(C, hidden, N, dtype, tail=True):
    w1 = (torch.randn(hidden, C) * C ** -0.5).to(dtype)
    b1 = torch.randn(hidden).to(dtype)
    if not tail:
        return w1, b1, None, None
    return w1, b1, (torch.randn(N, hidden) * hidden ** -0.5).to(dtype), (torch.randn(N) * 0.1).to(dtype)


def _ref64(x, w1, b1, w2, b2, act, pool):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return feature_map_projector_ref(x.double(), d(w1), d(b1), d(w2), d(b2), act=act, pool=pool)


# ------------------------------------------------------------------------------------------------ kernel


def test_tables_and_adjoint_match_torch():
    """The offset tables read exactly avg_pool2d(x).flatten(2).transpose(1, 2); the adjoint is avg_pool2d's grad."""
    x = torch.randn(2, 5, 7, 8).to(memory_format=torch.channels_last)
    for pool in [(1, 1), (2, 2), (3, 3), (2, 3)]:
        rows, cols = offset_tables(x, *pool)
        flat = x.as_strided((x.numel(),), (1,))  # the storage in memory order
        got = flat[rows[..., None] + cols] if rows.dim() == 1 else flat[rows[:, :, None] + cols].mean(1)
        assert torch.allclose(got.reshape(-1, 5), map_tokens_ref(x, *pool), atol=1e-6)
        xr = x.detach().clone().requires_grad_()
        g = torch.randn(2 * (7 // pool[0]) * (8 // pool[1]), 5)
        (map_tokens_ref(xr, *pool) * g).sum().backward()
        assert torch.allclose(map_tokens_adjoint(g, x.shape, *pool), xr.grad, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,pool", [((2, 20, 7, 5), (1, 1)), ((2, 20, 7, 5), (2, 2)), ((1, 24, 10, 7), (3, 3)),
                                        ((2, 12, 6, 9), (2, 3))])
def test_kernel_vs_float64(dtype, shape, pool, triton_backend):
    """One GEMM reads the NCHW map in place (flatten or pooled): poisoned margins around the map and the output."""
    B, C, H, W = shape
    N = 40
    x = Guarded(shape, dtype, "cpu", fill=(torch.randn(shape) * 2 + 0.5).to(dtype))
    w1, b1, _, _ = _weights(C, N, N, dtype, tail=False)
    rows, cols = offset_tables(x.tensor, *pool)
    M = rows.shape[0]
    out = Guarded((M, N), dtype, "cpu")
    pre = Guarded((M, N), dtype, "cpu")
    mode = "separable" if pool == (1, 1) else "separable_mean"
    fused_linear(x.tensor, w1, b1, act="gelu", a_mode=mode, a_rows=rows, a_cols=cols, out=out.tensor, pre=pre.tensor,
                 store_pre=True)
    out.check("out")
    pre.check("pre")
    a = map_tokens_ref(x.tensor.double(), *pool)
    if pool != (1, 1):
        a = a.to(dtype).double()  # avg_pool2d rounds the pooled value to the map's dtype
    h = a @ w1.double().T + b1.double()
    assert_close(pre.tensor, h, dtype, C, roundings=2, what="pre-activation")
    assert_close(out.tensor, F.gelu(h), dtype, C, roundings=2)


@pytest.mark.parametrize("config", [(16, 32, 32, 4, 1), (32, 16, 16, 4, 1), (64, 64, 64, 4, 1)])
def test_pooled_read_every_tile_shape(config, triton_backend):
    """Explicit tiles (the interpreter runs only the first autotune config): ragged M, N, K at each tile shape."""
    x = Guarded((3, 37, 7, 11), torch.float16, "cpu", fill=torch.randn(3, 37, 7, 11).half())
    w = (torch.randn(29, 37) * 37 ** -0.5).half()
    rows, cols = offset_tables(x.tensor, 2, 2)
    out = Guarded((rows.shape[0], 29), torch.float16, "cpu")
    fused_linear(x.tensor, w, None, a_mode="separable_mean", a_rows=rows, a_cols=cols, out=out.tensor, config=config)
    out.check("out")
    ref = map_tokens_ref(x.tensor.double(), 2, 2).half().double() @ w.double().T
    assert_close(out.tensor, ref, torch.float16, 37, roundings=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", [1, 2, (2, 3)])
def test_op_with_mlp_tail_vs_float64(dtype, pool, triton_backend):
    """Map -> [pool] -> Linear-GELU-Linear: the fused op against a float64 eager reference."""
    B, C, H, W, I, N = 2, 24, 7, 9, 48, 20
    x = (torch.randn(B, C, H, W) + 0.3).to(dtype)
    w1, b1, w2, b2 = _weights(C, I, N, dtype)
    with fastvlm.trace() as t:
        y = feature_map_projector(x, w1, b1, w2, b2, act="gelu", pool=pool)
    assert t.backends() == ["triton"]
    p = (pool, pool) if isinstance(pool, int) else pool
    assert y.shape == (B, (H // p[0]) * (W // p[1]), N) and y.dtype == dtype
    assert_close(y, _ref64(x, w1, b1, w2, b2, "gelu", p), dtype, C + I, roundings=4)


def test_token_matrix_view_choice():
    """Which maps the plain strided A load can read (affine token rows) and which need the gathered load."""
    from fastvlm.ops.feature_map import token_matrix_view

    x = torch.randn(2, 5, 3, 4)
    assert token_matrix_view(x) is None  # a batch of NCHW images: rows are not affine across images
    for m in (x[:1], x.to(memory_format=torch.channels_last), x[1:, :, :, :1], x[:, :, :1, :1]):
        v = token_matrix_view(m)
        assert v is not None and torch.equal(v, map_tokens_ref(m)), tuple(m.shape)
    assert token_matrix_view(x[:1, :, :, 1:3]) is None  # a sliced width: h and w do not merge


def test_any_strides_read_in_place(triton_backend):
    """Channels-last maps, offset/sliced views and fast_vlm's permuted token view are read without a copy."""
    C, N = 16, 24
    w1, b1, _, _ = _weights(C, N, N, torch.float32, tail=False)
    base = torch.randn(2, C, 9, 8)
    cases = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "sliced": base[:, :, 1:, 1:7],  # offset view, row stride != width
        "batch_slice": torch.randn(3, C, 9, 8)[1:],
        "one_nchw_image": torch.randn(1, C, 5, 7),  # strided A load of X[0].view(C, T).T
        "token_view": tokens_as_map(base.flatten(2).permute(0, 2, 1)),  # [B, T, C] view -> [B, C, T, 1]
    }
    for name, x in cases.items():
        for pool in (1, 2) if name != "token_view" else (1,):
            y = feature_map_projector(x, w1, b1, act="silu", pool=pool)
            assert_close(y, _ref64(x, w1, b1, None, None, "silu", (pool, pool)), torch.float32, C, roundings=2,
                         what=f"{name} pool {pool}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pool", [1, 3])
def test_gradients(backend, pool, monkeypatch):
    """Gradients of the map and every parameter against autograd through the eager reference (float64)."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = torch.randn(2, 12, 7, 8, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    w1, b1, w2, b2 = [t.requires_grad_() for t in _weights(12, 20, 16, dtype)]
    g = torch.randn(2, (7 // pool) * (8 // pool), 16, dtype=dtype)
    got = torch.autograd.grad(feature_map_projector(x, w1, b1, w2, b2, act="gelu", act2="silu", pool=pool),
                              (x, w1, b1, w2, b2), g)
    args = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    ref = torch.autograd.grad(feature_map_projector_ref(*args, act="gelu", act2="silu", pool=(pool, pool)), args,
                              g.double())
    for name, a, b in zip(("map", "w1", "b1", "w2", "b2"), got, ref):
        assert a.shape == b.shape and a.dtype == dtype, name
        bound = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel_err(a, b) < bound, f"{name}: {rel_err(a, b):.2e}"


def test_opcheck_and_compile(torch_backend):
    x = torch.randn(2, 8, 5, 6)
    w1, b1, w2, b2 = _weights(8, 12, 10, torch.float32)
    for save, pool, act2 in ((False, (1, 1), "none"), (True, (2, 3), "silu"), (True, (1, 1), "none")):
        torch.library.opcheck(torch.ops.fastvlm.feature_map_projector.default,
                              (x, w1, b1, w2, b2, "gelu", act2, *pool, save))
    torch.library.opcheck(torch.ops.fastvlm.feature_map_projector.default,
                          (x, w1, None, None, None, "none", "none", 1, 1, False))

    proj = fastvlm.nn.feature_map.FeatureMapProjector(8, 10, hidden=12, act="gelu", pool=2)
    compiled = torch.compile(proj, fullgraph=True, backend="aot_eager")
    xr = x.clone().requires_grad_()
    y = compiled(xr)
    y.sum().backward()
    ref = feature_map_projector_ref(x, proj.linear_1.weight, proj.linear_1.bias, proj.linear_2.weight,
                                    proj.linear_2.bias, act="gelu", pool=(2, 2))
    assert_close(y, ref, torch.float32, 20)
    assert xr.grad is not None and proj.linear_1.weight.grad is not None


def test_bad_inputs_and_fallbacks(monkeypatch):
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        feature_map_projector(torch.randn(2, 4, 9), w)
    with pytest.raises(ValueError, match=r"linear_1.weight must be \[out, 5\]"):
        feature_map_projector(torch.randn(1, 5, 4, 4), w)
    with pytest.raises(ValueError, match="does not fit"):
        feature_map_projector(torch.randn(1, 4, 2, 4), w, pool=3)
    x = torch.randn(1, 4, 4, 4)
    rows, cols = offset_tables(x, 2, 2)
    with pytest.raises(ValueError, match="'separable_mean' needs a contiguous int64 a_rows"):
        fused_linear(x, w, a_mode="separable_mean", a_rows=rows[:, 0], a_cols=cols)
    with pytest.raises(ValueError, match="'separable_mean' takes no norm"):
        fused_linear(x, w, a_mode="separable_mean", a_rows=rows, a_cols=cols, norm="rmsnorm", norm_group=4,
                     rstd=torch.ones(4), norm_weight=torch.ones(4))
    # mixed dtypes: the Triton path refuses and names why (an error under FASTVLM_BACKEND=triton)
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with pytest.raises(fastvlm.FastVLMFallbackError, match="linear_1.weight is torch.float32 but the map is"):
        feature_map_projector(torch.randn(1, 4, 4, 4).half(), w)


# ------------------------------------------------------------------------------------------------ modules


def _cabs(depth):
    return randomize_(CAbstractor(12, 16, 20, num_input_tokens=36, num_queries=9, depth=depth), std=0.3).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["cabs1", "cabs0", "ldp"])
def test_fast_modules_vs_reference(kind, backend, monkeypatch):
    """Same state_dict (a reference checkpoint loads strictly), shared tensors, same output; on the Triton path the
    pool and projections run fastvlm kernels (traced)."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    ref = _cabs(int(kind[-1])) if kind.startswith("cabs") else randomize_(LDPv2Projector(12, 20, 9), std=0.3).eval()
    fast = fastvlm.nn.from_module(ref)
    assert type(fast).__name__ == ("FusedCAbstractor" if kind.startswith("cabs") else "FusedLDPv2Projector")
    assert isinstance(fast, type(ref))
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(fast.state_dict().values(), ref.state_dict().values()))
    fresh = type(fast)(12, 16, 20, num_input_tokens=36, num_queries=9, depth=int(kind[-1])) \
        if kind.startswith("cabs") else type(fast)(12, 20, 9)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 36, 12)
    with torch.no_grad(), fastvlm.trace() as t:
        y = fresh.eval()(x)
        r = ref(x)
    assert y.shape == r.shape == (2, 9, 20)
    assert rel_err(y, r) < 1e-5
    if backend == "triton":
        ops = {rec.op for rec in t.records}
        want = {"cabs1": {"fastvlm::pool_tokens", "fastvlm::feature_map_projector"},
                "cabs0": {"fastvlm::feature_map_projector"}, "ldp": {"fastvlm::mlp_projector"}}[kind]
        assert ops == want and set(t.backends()) == {"triton"}, str(t)


@pytest.mark.parametrize("kind", ["cabs1", "ldp"])
def test_fast_modules_gradients(kind, torch_backend):
    ref = _cabs(1).double() if kind == "cabs1" else randomize_(LDPv2Projector(12, 20, 9), std=0.3).double()
    fast = fastvlm.nn.from_module(ref)
    x = torch.randn(2, 36, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 9, 20, dtype=torch.float64)
    params = [x] + list(ref.parameters())
    want = torch.autograd.grad(ref(x), params, g)
    got = torch.autograd.grad(fast(x), params, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-10


def test_fast_modules_fall_back_and_say_why(monkeypatch):
    ref = randomize_(LDPv2Projector(12, 20, 9), std=0.3).eval()
    ref.mlp[1] = torch.nn.Tanh()
    fast = fastvlm.nn.from_module(ref)
    x = torch.randn(1, 36, 12)
    monkeypatch.setenv("FASTVLM_STRICT", "1")
    with pytest.raises(fastvlm.FastVLMFallbackError, match="activation Tanh has no fused kernel"):
        fast(x)
    monkeypatch.delenv("FASTVLM_STRICT")
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    cabs = fastvlm.nn.from_module(CAbstractor(8, 8, 8, num_input_tokens=25, num_queries=4, depth=1).eval())
    with torch.no_grad(), fastvlm.trace() as t:
        cabs(torch.randn(1, 25, 8))  # 5x5 -> 2x2 adaptive windows are uneven: the reference forward runs
    assert "uneven windows" in str(t)


def test_compile_fast_modules(torch_backend):
    fast = fastvlm.nn.from_module(randomize_(LDPv2Projector(12, 20, 9), std=0.3).eval())
    x = torch.randn(2, 36, 12)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(x), fast(x)) < 1e-6
    # fast_vlm's projector on the permuted map view, compiled whole (the custom op is one graph node)
    import transformers
    from transformers.models.fast_vlm.modeling_fast_vlm import FastVlmMultiModalProjector

    cfg = transformers.FastVlmConfig(text_config=dict(model_type="qwen2", hidden_size=24, num_attention_heads=4,
                                                      num_key_value_heads=4, intermediate_size=48))
    cfg.vision_config.hidden_size = 20
    proj = FastVlmMultiModalProjector(cfg).eval()
    fused = fastvlm.nn.from_module(proj)
    fn = torch.compile(lambda m: fused(m.flatten(2).permute(0, 2, 1)), fullgraph=True, backend="aot_eager")
    fmap = torch.randn(2, 20, 3, 5)
    with torch.no_grad(), fastvlm.trace() as t:
        got = fn(fmap)
    assert "fastvlm::feature_map_projector" in {r.op for r in t.records}
    with torch.no_grad():
        assert rel_err(got, proj(fmap.flatten(2).permute(0, 2, 1))) < 1e-6


# ------------------------------------------------------------------------------------------------ integrations


def test_fast_vlm_tiny_model_patched(triton_backend):
    """transformers' fast_vlm: the projector reads the FastViT map's token view in place; logits unchanged."""
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model("fast_vlm")
    with torch.no_grad():
        ref = model(**inputs).logits
    report = fastvlm.patch(model, verify=True)
    entry = next(e for e in report.patched if e.fused == "FusedFastVlmMultiModalProjector")
    assert "ok" in entry.detail
    proj = model.model.multi_modal_projector
    assert isinstance(proj, fastvlm.nn.FusedFastVlmMultiModalProjector)
    with torch.no_grad(), fastvlm.trace() as t:
        out = model(**inputs).logits
    ops = [r.op for r in t.records]
    assert "fastvlm::feature_map_projector" in ops and "fastvlm::mlp_projector" not in ops, str(t)
    assert rel_err(out, ref) < 1e-5
    fastvlm.unpatch(model)


def test_timm_convnext_map(triton_backend):
    """A real timm ConvNeXt map (random weights) through a LLaVA-style projector taken over by FeatureMapProjector."""
    timm = pytest.importorskip("timm")
    tower = timm.create_model("convnext_atto", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        fmap = tower.forward_features(torch.randn(1, 3, 96, 96))  # [1, 320, 3, 3]
    proj = torch.nn.Module()
    proj.linear_1, proj.act, proj.linear_2 = torch.nn.Linear(320, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)
    fm = fastvlm.nn.feature_map.FeatureMapProjector.from_projector(proj, pool=1)
    with torch.no_grad():
        y = fm(fmap)
        ref = proj.linear_2(proj.act(proj.linear_1(fmap.flatten(2).transpose(1, 2))))
    assert_close(y, ref, torch.float32, 320 + 48, roundings=2)


@pytest.mark.parametrize("name,shape,hidden,out,pool", [
    ("convnext_l_stage4", (1, 1536, 24, 24), 4096, 4096, 1),
    ("convnext_l_stage4_pool2", (2, 1536, 24, 24), 4096, 4096, 2),
    ("fastvlm_0.5b_fastvithd", (1, 3072, 16, 16), 896, 896, 1),
])
def test_real_sizes_pytorch_path(name, shape, hidden, out, pool, torch_backend):
    x = torch.randn(shape)
    w1, b1, w2, b2 = _weights(shape[1], hidden, out, torch.float32)
    y = feature_map_projector(x, w1, b1, w2, b2, act="gelu", pool=pool)
    ref = F.linear(F.gelu(F.linear(F.avg_pool2d(x, pool).flatten(2).transpose(1, 2), w1, b1)), w2, b2)
    assert y.shape == ref.shape == (shape[0], (shape[2] // pool) * (shape[3] // pool), out)
    assert rel_err(y, ref) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fast_vlm_projector_gradients_through_the_view(backend, monkeypatch):
    """Stage-1 training through fast_vlm's permuted view: map and parameter gradients match the original module."""
    import transformers
    from transformers.models.fast_vlm.modeling_fast_vlm import FastVlmMultiModalProjector

    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    cfg = transformers.FastVlmConfig(text_config=dict(model_type="qwen2", hidden_size=24, num_attention_heads=4,
                                                      num_key_value_heads=4, intermediate_size=48))
    cfg.vision_config.hidden_size = 20
    proj = randomize_(FastVlmMultiModalProjector(cfg), std=0.2)
    fused = fastvlm.nn.from_module(proj)
    dtype = torch.float64 if backend == "torch" else torch.float32
    proj.to(dtype)
    fmap = torch.randn(2, 20, 3, 5, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 15, 24, dtype=dtype)
    params = [fmap] + list(proj.parameters())
    with fastvlm.trace() as t:
        got = torch.autograd.grad(fused(fmap.flatten(2).permute(0, 2, 1)), params, g)
    assert t.records[0].op == "fastvlm::feature_map_projector"
    want = torch.autograd.grad(proj(fmap.flatten(2).permute(0, 2, 1)), params, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < (1e-12 if backend == "torch" else 1e-5)


def test_fast_vlm_class_level(torch_backend):
    from transformers.models.fast_vlm import modeling_fast_vlm

    before = modeling_fast_vlm.FastVlmMultiModalProjector
    try:
        assert "FastVlmMultiModalProjector" in fastvlm.apply_to_transformers()
        assert modeling_fast_vlm.FastVlmMultiModalProjector is fastvlm.nn.FusedFastVlmMultiModalProjector
        assert issubclass(fastvlm.nn.FusedFastVlmMultiModalProjector, before)
    finally:
        fastvlm.revert_transformers()
    assert modeling_fast_vlm.FastVlmMultiModalProjector is before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["cabs0", "ldp"])
def test_fast_modules_half_precision(kind, dtype, triton_backend):
    """fp16/bf16 fast modules (kernels in the interpreter) against the reference evaluated in float64."""
    ref = _cabs(0) if kind == "cabs0" else randomize_(LDPv2Projector(12, 20, 9), std=0.3).eval()
    x = torch.randn(2, 36, 12)
    with torch.no_grad():
        want = ref.double()(x.double())
        got = fastvlm.nn.from_module(ref.to(dtype))(x.to(dtype))
    # roundings: input, (pos-emb add | GELU output), pooled value, hidden activation, output (+ the conv for LDPv2)
    assert_close(got, want, dtype, 12 + 20 + 9, roundings=6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ldpv2_empty_batch_raises_the_originals_error(backend, monkeypatch, request):
    """MobileVLM's LDPv2 reshapes to (B, -1, side, side), which rejects B = 0; the fast module raises the same error
    (it used to return an empty result). The C-Abstractor accepts an empty batch on every path."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    else:
        monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    ref = randomize_(LDPv2Projector(12, 20, 9), std=0.3).eval()
    x = torch.randn(0, 36, 12)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        fastvlm.nn.from_module(ref)(x)
    assert str(got.value) == str(want.value)
    cabs = _cabs(0)
    assert fastvlm.nn.from_module(cabs)(x).shape == cabs(x).shape
