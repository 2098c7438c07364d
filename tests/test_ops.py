"""fastvlm::mlp_projector as an op: autograd, opcheck, torch.compile, saved memory, dispatch and input errors."""
import warnings

import pytest
import torch

import fastvlm
from fastvlm import _dispatch
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.projector import mlp_projector_ref
from fastvlm.testing import FAMILIES
from helpers import assert_close, rel_err

CASES = {  # name: (norm, group-of-4 merge?, act, two linears?)
    "llava": ("none", False, "gelu", True),
    "internvl": ("layernorm", False, "gelu", True),
    "qwen2_merger": ("layernorm", True, "gelu", True),
    "qwen25_merger": ("rmsnorm", True, "gelu", True),
    "single_linear": ("none", False, "none", False),
    "linear_silu": ("none", False, "silu", False),
}


def make(case, dtype=torch.float32, device="cpu", M=10, C=12, I=40, O=24, requires_grad=True):
    norm, merged, act, two = CASES[case]
    K = 4 * C if merged else 2 * C
    g = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_(requires_grad)  # noqa: E731
    x = g(M, K, scale=2.0)
    kw = dict(act=act, norm=norm, eps=1e-6)
    if norm != "none":
        kw["norm_group"] = C if merged else K
        kw["norm_weight"] = g(kw["norm_group"])
        if norm == "layernorm":
            kw["norm_bias"] = g(kw["norm_group"])
    w1, b1 = g(I, K, scale=K ** -0.5), g(I)
    w2, b2 = (g(O, I, scale=I ** -0.5), g(O)) if two else (None, None)
    return x, (w1, b1, w2, b2), kw


def _grads(fn, x, ws, kw, gy):
    inputs = [t for t in (x, *ws, kw.get("norm_weight"), kw.get("norm_bias")) if t is not None]
    y = fn(x, *ws, **kw)
    return y, torch.autograd.grad(y, inputs, gy)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_pytorch_path_float64(case, torch_backend):
    """Our hand-written backward equals autograd through the reference, to float64 rounding."""
    x, ws, kw = make(case, torch.float64)
    y = mlp_projector(x, *ws, **kw)
    gy = torch.randn_like(y)
    _, g_ours = _grads(mlp_projector, x, ws, kw, gy)
    y_ref, g_ref = _grads(mlp_projector_ref, x, ws, kw, gy)
    assert rel_err(y, y_ref) < 1e-14
    for a, b in zip(g_ours, g_ref):
        assert rel_err(a, b) < (1e-6 if kw["norm"] == "rmsnorm" else 1e-12)  # RMSNorm upcasts to fp32 like HF


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_triton_path(case, dtype, triton_backend):
    x, ws, kw = make(case, dtype)
    y = mlp_projector(x, *ws, **kw)
    gy = torch.randn_like(y)
    _, g_ours = _grads(mlp_projector, x, ws, kw, gy)
    # float64 oracle from the same (rounded) values
    up = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    x64, ws64 = up(x), [up(w) for w in ws]
    kw64 = {k: (up(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y64, g_ref = _grads(mlp_projector_ref, x64, ws64, kw64, gy.double())
    assert_close(y, y64, dtype, x.shape[1], roundings=3, what="output")
    for a, b in zip(g_ours, g_ref):
        assert_close(a, b, dtype, max(x.shape[0], x.shape[1]), roundings=4, what="gradient")


def test_gradcheck_float64(torch_backend):
    x, ws, kw = make("internvl", torch.float64, M=3, C=3, I=5, O=4)
    args = (x, *ws, kw["norm_weight"], kw["norm_bias"])

    def f(x, w1, b1, w2, b2, nw, nb):
        return mlp_projector(x, w1, b1, w2, b2, act="gelu", norm="layernorm", norm_weight=nw, norm_bias=nb, eps=1e-6)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("case", ["llava", "qwen2_merger", "qwen25_merger", "single_linear"])
def test_opcheck(case):
    x, (w1, b1, w2, b2), kw = make(case, requires_grad=True)
    args = (x, w1, b1, w2, b2, kw.get("norm_weight"), kw.get("norm_bias"), None, None, None, kw["norm"],
            kw.get("norm_group", x.shape[1]), kw["eps"], kw["act"], "none", "strided", False, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        torch.library.opcheck(torch.ops.fastvlm.mlp_projector.default, args)


def test_compile_fullgraph_no_recompile(torch_backend):
    import torch._dynamo

    from fastvlm.testing import build, input_for

    m = build("qwen2_5_vl")
    fused = fastvlm.nn.from_module(m)
    x = input_for("qwen2_5_vl", m)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), m(x), torch.float32, x.shape[-1])
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        compiled(torch.randn_like(x))
    # training: forward + backward through the compiled graph
    xg = x.clone().requires_grad_()
    compiled(xg).sum().backward()
    xr = x.clone().requires_grad_()
    m(xr).sum().backward()
    assert rel_err(xg.grad, xr.grad) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_every_module_compiles_fullgraph(family, torch_backend):
    import torch._dynamo

    from fastvlm.testing import args_for, build

    m = build(family)
    fused = fastvlm.nn.from_module(m)
    args = args_for(family, m)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=family != "mistral3", backend="aot_eager")  # image_sizes.tolist()
    with torch.no_grad():
        assert_close(compiled(*args), m(*args), torch.float32, args[0].shape[-1] * 4)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(torch.randn_like(args[0]), *args[1:])


def test_compile_inductor_fullgraph(torch_backend):
    from fastvlm.testing import build, input_for

    m = build("llava")
    fused = fastvlm.nn.from_module(m)
    x = input_for("llava", m)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), m(x), torch.float32, x.shape[-1])


def test_saved_activation_memory(torch_backend):
    """Backward keeps x, fp32 stats and the pre-activation only; eager transformers also keeps norm(x) and act(h)."""
    from fastvlm.testing import build, input_for

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return seen

    m = build("internvl")  # stage-1 alignment: every projector parameter trains, the vision features do not
    fused = fastvlm.nn.from_module(m)
    x = input_for("internvl", m, tokens=64)
    params = {p.data_ptr() for p in m.parameters()}
    ours = {k: v for k, v in saved_bytes(lambda: fused(x)).items() if k[0] not in params}
    eager = {k: v for k, v in saved_bytes(lambda: m(x)).items() if k[0] not in params}
    rows = x.numel() // x.shape[-1]
    hidden = m.linear_1.out_features
    expected = x.numel() * 4 + rows * hidden * 4 + 2 * rows * 4  # x, h, mean + rstd
    assert sum(ours.values()) == expected, ours
    # eager additionally keeps norm(x) [rows, K] and act(h) [rows, hidden]
    assert sum(eager.values()) >= sum(ours.values()) + x.numel() * 4 + rows * hidden * 4 - 2 * rows * 4, eager


def test_trace_and_fallback_warning(monkeypatch):
    monkeypatch.delenv("FASTVLM_BACKEND", raising=False)
    _dispatch.reset_warnings()
    x, ws, kw = make("llava", requires_grad=False)
    with pytest.warns(fastvlm.FastVLMFallbackWarning, match="tensors are on cpu"):
        with fastvlm.trace() as t:
            mlp_projector(x, *ws, **kw)
    assert t.records[0].backend == "torch" and "cpu" in t.records[0].reasons[0]
    assert "fastvlm::mlp_projector" in str(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once only
        mlp_projector(x, *ws, **kw)


def test_fallback_warning_says_what_ran():
    """An op's fallback runs its PyTorch path; a fused module's runs the original implementation."""
    _dispatch.reset_warnings()
    with pytest.warns(fastvlm.FastVLMFallbackWarning, match="fastvlm::x ran its PyTorch path: why"):
        _dispatch.report_fallback("fastvlm::x", ["why"])
    with pytest.warns(fastvlm.FastVLMFallbackWarning, match="FusedX ran the original implementation: why"):
        _dispatch.report_fallback("FusedX", ["why"])
    _dispatch.reset_warnings()


def test_strict_and_explicit_triton_raise(monkeypatch):
    x, ws, kw = make("llava", torch.float64, requires_grad=False)
    monkeypatch.setenv("FASTVLM_STRICT", "1")
    with pytest.raises(fastvlm.FastVLMFallbackError, match="cpu"):
        mlp_projector(x, *ws, **kw)
    monkeypatch.delenv("FASTVLM_STRICT")
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with pytest.raises(fastvlm.FastVLMFallbackError, match="float64 is not one of"):
        mlp_projector(x, *ws, **kw)


def test_dtype_mismatch_is_a_reason_not_a_crash(triton_backend, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", "auto")
    x, (w1, b1, w2, b2), kw = make("llava", requires_grad=False)
    with fastvlm.trace() as t, pytest.raises(RuntimeError):  # the PyTorch path raises what F.linear raises
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlp_projector(x, w1.half(), b1, w2, b2, **kw)
    assert any("linear_1.weight is torch.float16 but x is torch.float32" in r for r in t.records[0].reasons)


def test_bad_inputs_name_the_tensor():
    x, (w1, b1, w2, b2), kw = make("internvl", requires_grad=False)
    with pytest.raises(ValueError, match=r"linear_1.weight must be \[out, 24\]"):
        mlp_projector(x, w1[:, :-1], b1, w2, b2, **kw)
    with pytest.raises(ValueError, match=r"linear_2.weight must be"):
        mlp_projector(x, w1, b1, w2[:, :-1], b2, **kw)
    with pytest.raises(ValueError, match="norm weight must be"):
        mlp_projector(x, w1, b1, w2, b2, **{**kw, "norm_weight": kw["norm_weight"][:-1]})
    with pytest.raises(ValueError, match="act must be one of"):
        mlp_projector(x, w1, b1, w2, b2, **{**kw, "act": "mish"})


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32),
                                           ("triton", torch.bfloat16)])
def test_gated_pair_with_separate_up_weight(backend, dtype, monkeypatch):
    """Idefics2's MLP: down(act(gate(x)) * up(x)) with gate_proj and up_proj as separate weights (no copy)."""
    import torch.nn.functional as F

    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    g = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float64) * scale).to(dtype).requires_grad_()  # noqa: E731
    x, wg, wu, w2 = g(9, 24), g(40, 24, scale=0.2), g(40, 24, scale=0.2), g(16, 40, scale=0.15)
    y = mlp_projector(x, wg, None, w2, act="silu", w_up=wu)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, wg, wu, w2), gy)
    t64 = [t.detach().double().requires_grad_() for t in (x, wg, wu, w2)]
    ref = F.linear(F.silu(F.linear(t64[0], t64[1])) * F.linear(t64[0], t64[2]), t64[3])
    want = torch.autograd.grad(ref, t64, gy.double())
    assert_close(y, ref, dtype, 24, roundings=3)
    for a, b in zip(got, want):
        assert_close(a, b, dtype, 40, roundings=4, what="gradient")
