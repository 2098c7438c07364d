"""Idefics2's Perceiver resampler: the attention kernel's grouped-query, two-source form under the interpreter (ragged
shapes, every dtype, padded-patch masks, poisoned margins) against float64 references; its backward; the fused
``FusedIdefics2PerceiverResampler`` / ``FusedIdefics2Connector`` against transformers' modules (PyTorch path and
interpreter, with and without patch masks, gradients of the input and every parameter); opcheck, torch.compile,
fallback reasons, and the full-size Idefics2-8B perceiver on the PyTorch path."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastvlm import _dispatch
from fastvlm.kernels.attention import attention_fwd
from fastvlm.ops.attention import attention
from fastvlm.reference.attention import attention_ref, eager_attention_ref
from fastvlm.reference.projector import norm_ref
from fastvlm.testing import randomize_
from helpers import Guarded, assert_close, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, Hkv, Lq, Lctx, Llat, D): queries are the latents (Lq == Llat in Idefics2; one case differs to keep the two
# lengths apart), contexts with padded patches; D = 24 and 48 are not powers of 2 (BLOCK_D pads with masks)
KSHAPES = {
    "gqa4_d24": (2, 8, 2, 16, 50, 16, 24),
    "gqa2_d48": (2, 4, 2, 12, 130, 12, 48),
    "mha_d32": (1, 3, 3, 20, 300, 20, 32),  # group 1, H = 3 leaves a padding head in packed tiles
    "gqa4_d96": (1, 4, 1, 8, 77, 9, 96),  # Idefics2's head dim, a 4-head group
}


def _patch_mask(B, L, device):
    """Idefics2's patch_attention_mask flattened: the last batch row has a padded tail, another row a hole."""
    m = torch.ones(B, L, dtype=torch.bool, device=device)
    m[-1, L - L // 3:] = False
    m[0, 1] = False
    return m


def _heads(B, L, H, D, dtype, device, guarded=False):
    """``linear(x).view(B, L, H, D).transpose(1, 2)`` as the perceiver builds it (a non-contiguous view)."""
    t = torch.randn(B, L, H, D, device=device).to(dtype)
    if not guarded:
        return None, t.transpose(1, 2)
    g = Guarded((B, L, H, D), dtype, device, fill=t)
    return g, g.tensor.transpose(1, 2)


def _inputs(case, dtype, device, guarded=False):
    B, H, Hkv, Lq, Lc, Ll, D = KSHAPES[case]
    q = _heads(B, Lq, H, D, dtype, device, guarded)
    kv = [_heads(B, L, Hkv, D, dtype, device, guarded) for L in (Lc, Lc, Ll, Ll)]
    return q, kv, _patch_mask(B, Lc, device)


def _ref64(q, k, v, k2, v2, key, attn=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return attention_ref(d(q), d(k), d(v), key, d(attn), None, d(k2), d(v2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(KSHAPES))
def test_two_source_gqa_kernel_parity(case, dtype, device):
    (gq, q), kv, key = _inputs(case, dtype, device, guarded=True)
    (gk, k), (gv, v), (gk2, k2), (gv2, v2) = kv
    B, H, Hkv, Lq, Lc, Ll, D = KSHAPES[case]
    out = Guarded((B, Lq, H, D), dtype, device)
    lse = Guarded((B, H, Lq), torch.float32, device)
    attention_fwd(q, k, v, key_mask=key, k2=k2, v2=v2, out=out.tensor, lse=lse.tensor)
    o64, lse64 = _ref64(q, k, v, k2, v2, key)
    assert_close(out.tensor, o64, dtype, max(D, Lc + Ll), roundings=2, what="output")
    assert_close(lse.tensor, lse64, torch.float32, D, what="lse")
    for g, name in ((gq, "q"), (gk, "k"), (gv, "v"), (gk2, "k2"), (gv2, "v2"), (out, "out"), (lse, "lse")):
        g.check(name)


@pytest.mark.parametrize("config", [(16, 4, 32, 4, 1), (32, 2, 16, 4, 1), (64, 1, 64, 4, 1)])
def test_two_source_explicit_tiles_and_full_mask(config, device):
    """Packed tiles whose heads straddle kv groups, and a full additive mask indexed across both sources."""
    B, H, Hkv, Lq, Lc, Ll, D = 2, 6, 3, 10, 45, 10, 24
    dtype = torch.float16
    _, q = _heads(B, Lq, H, D, dtype, device)
    (_, k), (_, v), (_, k2), (_, v2) = [_heads(B, L, Hkv, D, dtype, device) for L in (Lc, Lc, Ll, Ll)]
    key = _patch_mask(B, Lc, device)
    attn = torch.randn(1, H, 1, Lc + Ll, device=device).to(dtype)
    attn[..., -3:] = torch.finfo(dtype).min  # masks the last latent keys: the second source reads the full mask
    o, lse = attention_fwd(q, k, v, key_mask=key, attn_mask=attn, k2=k2, v2=v2, config=config)
    o64, lse64 = _ref64(q, k, v, k2, v2, key, attn)
    assert_close(o, o64, dtype, Lc + Ll, roundings=2)
    assert_close(lse, lse64, torch.float32, D, what="lse")


def test_two_source_equals_concatenation(torch_backend):
    """The reference's two-source/GQA form is the attention over concat(k, k2) with repeated kv heads (what
    transformers' eager_attention_forward computes after repeat_kv)."""
    B, H, Hkv, Lq, Lc, Ll, D = 2, 4, 2, 5, 11, 5, 16
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k, v, = torch.randn(B, Hkv, Lc, D, dtype=torch.float64), torch.randn(B, Hkv, Lc, D, dtype=torch.float64)
    k2, v2 = torch.randn(B, Hkv, Ll, D, dtype=torch.float64), torch.randn(B, Hkv, Ll, D, dtype=torch.float64)
    key = _patch_mask(B, Lc, "cpu")
    kf = torch.cat([k, k2], 2).repeat_interleave(2, 1)
    vf = torch.cat([v, v2], 2).repeat_interleave(2, 1)
    kmf = torch.cat([key, torch.ones(B, Ll, dtype=torch.bool)], 1)
    ref = eager_attention_ref(q, kf, vf, kmf)
    assert rel_err(attention(q, k, v, key_mask=key, k2=k2, v2=v2), ref) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_source_gqa_backward(backend, monkeypatch):
    """Gradients of q, k, v, k2, v2 (summed over each kv head's group) and of a float key mask, against autograd
    through the float64 concatenated reference."""
    if backend == "triton":
        if torch.cuda.is_available():
            pytest.skip("interpreter test")
        monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    else:
        monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    B, H, Hkv, Lq, Lc, Ll, D = 2, 4, 2, 6, 40, 6, 24
    dtype = torch.float32
    ts = [torch.randn(B, h, L, D, dtype=dtype, requires_grad=True)
          for h, L in ((H, Lq), (Hkv, Lc), (Hkv, Lc), (Hkv, Ll), (Hkv, Ll))]
    bias = torch.randn(B, Lc, dtype=dtype, requires_grad=True)
    go = torch.randn(B, Lq, H, D, dtype=dtype)
    q, k, v, k2, v2 = ts
    attention(q, k, v, key_mask=bias, k2=k2, v2=v2).backward(go)
    ref_in = [t.detach().double().requires_grad_() for t in (*ts, bias)]
    o64, _ = attention_ref(ref_in[0], ref_in[1], ref_in[2], ref_in[5], None, None, ref_in[3], ref_in[4])
    o64.backward(go.double())
    for name, t, r in zip(("q", "k", "v", "k2", "v2", "key_mask"), (*ts, bias), ref_in):
        assert_close(t.grad, r.grad, dtype, Lc + Ll, roundings=2, what=f"grad {name}")


def test_gradcheck_float64_two_source(torch_backend):
    B, H, Hkv, Lq, Lc, Ll, D = 1, 4, 2, 3, 5, 3, 4
    ts = [torch.randn(B, h, L, D, dtype=torch.float64, requires_grad=True)
          for h, L in ((H, Lq), (Hkv, Lc), (Hkv, Lc), (Hkv, Ll), (Hkv, Ll))]
    key = _patch_mask(B + 1, Lc, "cpu")[-1:]

    def f(q, k, v, k2, v2):
        return attention(q, k, v, key_mask=key, k2=k2, v2=v2)

    assert torch.autograd.gradcheck(f, ts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_two_source(backend, monkeypatch):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter test")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    B, H, Hkv, Lq, Lc, Ll, D = 2, 4, 2, 5, 20, 5, 16
    q = torch.randn(B, H, Lq, D, requires_grad=True)
    k, v = (torch.randn(B, Hkv, Lc, D, requires_grad=True) for _ in range(2))
    k2, v2 = (torch.randn(B, Hkv, Ll, D, requires_grad=True) for _ in range(2))
    key = _patch_mask(B, Lc, "cpu")
    torch.library.opcheck(torch.ops.fastvlm.attention.default, (q, k, v, key, None, 0.25, k2, v2))
    # the original six-argument call (Q-Former) keeps working
    kf, vf = (torch.randn(B, H, Lc, D, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.fastvlm.attention.default, (q, kf, vf, key, None, 0.25))


def test_bad_two_source_inputs():
    q = torch.randn(1, 4, 3, 16)
    k = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="k2 and v2"):
        attention(q, k, k, k2=torch.randn(1, 2, 3, 16))
    with pytest.raises(ValueError, match="k2 must be"):
        attention(q, k, k, k2=torch.randn(1, 1, 3, 16), v2=torch.randn(1, 1, 3, 16))
    with pytest.raises(ValueError, match="kv_heads dividing"):
        attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16))
    with pytest.raises(ValueError, match="attn_mask must be"):
        attention(q, k, k, attn_mask=torch.zeros(1, 1, 1, 5), k2=torch.randn(1, 2, 3, 16), v2=torch.randn(1, 2, 3, 16))


# ------------------------------------------------------------------------------------------------ the fused modules

M = pytest.importorskip("transformers.models.idefics2.modeling_idefics2")


def _config(hidden=64, latents=8, depth=2, heads=4, head_dim=24, kv_heads=2, vision=32, text_inter=96):
    from transformers import Idefics2Config

    return Idefics2Config(
        perceiver_config=dict(hidden_size=hidden, resampler_n_latents=latents, resampler_depth=depth,
                              resampler_n_heads=heads, resampler_head_dim=head_dim, num_key_value_heads=kv_heads),
        text_config=dict(model_type="mistral", hidden_size=hidden, intermediate_size=text_inter),
        vision_config=dict(hidden_size=vision))


def _connector(dtype=torch.float32, **kw):
    conn = M.Idefics2Connector(_config(**kw)).eval()
    randomize_(conn, 0.3)
    return conn.to(dtype)


def _pmask(B, P, padded):
    return _patch_mask(B, P, "cpu") if padded else torch.ones(B, P, dtype=torch.bool)


def _fused(mod):
    import fastvlm.nn

    return fastvlm.nn.from_module(mod)


@pytest.fixture
def quiet(quiet_fallbacks):
    yield


def _k_total(conn):
    return max(conn.perceiver_resampler.config.hidden_size * 4, 30)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_connector_matches_transformers(backend, padded, monkeypatch, quiet):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter test")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    conn = _connector()
    fused = _fused(conn)
    assert isinstance(fused, M.Idefics2Connector) and type(fused).__name__ == "FusedIdefics2Connector"
    x = torch.randn(2, 30, 32)
    mask = _pmask(2, 30, padded)
    with torch.no_grad(), _dispatch.trace() as t:
        out = fused(x, mask)
        ref = conn(x, mask)
    ops = {r.op for r in t.records}
    assert {"fastvlm::attention", "fastvlm::norm_linear", "fastvlm::mlp_projector"} <= ops, str(t)
    assert all(r.backend == backend for r in t.records if r.op.startswith("fastvlm::")), str(t)
    assert out.shape == ref.shape == (2, 8, 64)
    assert_close(out, ref, torch.float32, _k_total(conn), roundings=4)
    # the resampler alone, from_module'd from the connector's child
    res = _fused(conn.perceiver_resampler)
    ctx = torch.randn(2, 30, 64)
    with torch.no_grad():
        assert_close(res(ctx, mask), conn.perceiver_resampler(ctx, mask), torch.float32, _k_total(conn), roundings=4)


def test_fused_resampler_no_mask_and_int_mask(torch_backend, quiet):
    conn = _connector(depth=1)
    res = _fused(conn.perceiver_resampler)
    ctx = torch.randn(2, 11, 64)
    ones = torch.ones(2, 11, dtype=torch.long)
    with torch.no_grad():
        ref = conn.perceiver_resampler(ctx, ones)
        assert_close(res(ctx, ones), ref, torch.float32, 256, roundings=4)
        assert_close(res(ctx, None), ref, torch.float32, 256, roundings=4)  # transformers needs a mask; we accept None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_connector_16bit(dtype, torch_backend, quiet):
    """16-bit: the fused module's error against a float64 copy of the original is within the dtype's derived bound,
    or no worse than twice transformers' own 16-bit error (the fused path rounds at fewer points)."""
    conn = _connector()
    c64 = _connector().double()
    c64.load_state_dict(conn.state_dict())
    conn = conn.to(dtype)
    x = torch.randn(2, 30, 32)
    mask = _pmask(2, 30, True)
    with torch.no_grad():
        ref64 = c64(x.double(), mask)
        hf = conn(x.to(dtype), mask)
        out = _fused(conn)(x.to(dtype), mask)
    bound = max(2 * rel_err(hf, ref64), 4 * torch.finfo(dtype).eps)
    assert rel_err(out, ref64) <= bound, (rel_err(out, ref64), rel_err(hf, ref64))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_connector_backward(backend, monkeypatch, quiet):
    """Gradients of the input and of every parameter (latents included) against transformers' module in training
    mode (attention dropout 0, as Idefics2 ships)."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter test")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    conn = _connector(latents=4, depth=2, hidden=32, heads=2, head_dim=16, kv_heads=1, text_inter=48).train()
    fused = _fused(conn)
    x = torch.randn(2, 12, 32)
    mask = _pmask(2, 12, True)
    go = torch.randn(2, 4, 32)

    def grads(mod):
        conn.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        mod(xi, mask).backward(go)
        return xi.grad, {n: p.grad.clone() for n, p in conn.named_parameters()}

    gx_ref, gp_ref = grads(conn)
    with _dispatch.trace() as t:
        gx, gp = grads(fused)
    assert "fastvlm::norm_linear" in {r.op for r in t.records}, str(t)
    assert set(gp) == set(gp_ref) and "perceiver_resampler.latents" in gp
    assert_close(gx, gx_ref, torch.float32, 256, roundings=4, what="grad x")
    for n in gp_ref:
        assert_close(gp[n], gp_ref[n], torch.float32, 256, roundings=4, what=f"grad {n}")


def test_norm_linear_opcheck_and_gradcheck(torch_backend):
    from fastvlm.ops.perceiver import norm_linear

    x = torch.randn(5, 16, requires_grad=True)
    w, wu = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    nw = torch.randn(16, requires_grad=True)
    res = torch.randn(5, 8, requires_grad=True)
    op = torch.ops.fastvlm.norm_linear.default
    torch.library.opcheck(op, (x, w, wu, nw, res, 1e-6, "silu", True))
    torch.library.opcheck(op, (x, w, None, nw, None, 1e-6, "none", True))
    torch.library.opcheck(op, (x, w, None, None, res, 1e-6, "none", False))
    from fastvlm.ops.perceiver import rms_rstd

    rstd = rms_rstd(x.detach(), 1e-6)
    torch.library.opcheck(op, (x, w, wu, nw, res, 1e-6, "silu", True, rstd))
    # shared statistics give the same result and gradients as statistics computed in the op
    outs = []
    for r in (None, rstd):
        xi = x.detach().clone().requires_grad_()
        y = norm_linear(xi, w, w_up=wu, norm_weight=nw, act="silu", rstd=r)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xi.grad))
    assert rel_err(outs[1][0], outs[0][0]) < 1e-6 and rel_err(outs[1][1], outs[0][1]) < 1e-6
    # transformers' RMSNorm (and so the op) computes its statistics in fp32 even for fp64 inputs, so x's gradient
    # through the norm is checked against autograd through the reference; everything else by gradcheck
    d = [t.detach().double() for t in (x, w, wu, nw, res)]
    x64, rest = d[0], [t.requires_grad_() for t in d[1:]]
    assert torch.autograd.gradcheck(
        lambda w, wu, nw, res: norm_linear(x64, w, w_up=wu, norm_weight=nw, residual=res, act="silu"), rest)
    assert torch.autograd.gradcheck(lambda x, w, wu: norm_linear(x, w, w_up=wu, act="silu"),
                                    [x64.clone().requires_grad_(), *rest[:2]])
    xa, xb = x64.clone().requires_grad_(), x64.clone().requires_grad_()
    go = torch.randn(5, 8, dtype=torch.float64)
    norm_linear(xa, w.double(), w_up=wu.double(), norm_weight=nw.double(), act="silu").backward(go)
    a = norm_ref(xb, "rmsnorm", nw.double(), None, 16, 1e-6)
    (F.silu(F.linear(a, w.double())) * F.linear(a, wu.double())).backward(go)
    assert rel_err(xa.grad, xb.grad) < 1e-5


def test_norm_linear_opcheck_interpreter(triton_backend):
    x = torch.randn(5, 16, requires_grad=True)
    w, wu = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    nw = torch.randn(16, requires_grad=True)
    res = torch.randn(5, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvlm.norm_linear.default, (x, w, wu, nw, res, 1e-6, "silu", True))
    from fastvlm.ops.perceiver import rms_rstd

    torch.library.opcheck(torch.ops.fastvlm.norm_linear.default,
                          (x, w, wu, nw, res, 1e-6, "silu", True, rms_rstd(x.detach(), 1e-6)))


def test_compile_fullgraph(torch_backend, quiet):
    conn = _connector(latents=4, depth=2, hidden=32, heads=2, head_dim=16, kv_heads=1, text_inter=48)
    fused = _fused(conn)
    x = torch.randn(2, 12, 32)
    mask = _pmask(2, 12, True)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x, mask), conn(x, mask), torch.float32, 128, roundings=4)
    xg = x.clone().requires_grad_()
    compiled(xg, mask).square().sum().backward()
    xr = x.clone().requires_grad_()
    conn(xr, mask).square().sum().backward()
    assert_close(xg.grad, xr.grad, torch.float32, 128, roundings=4, what="grad x")


def test_fallback_reasons(torch_backend, monkeypatch):
    conn = _connector(latents=4, depth=1, hidden=32, heads=2, head_dim=16, kv_heads=1, text_inter=48)
    fused = _fused(conn)
    x = torch.randn(2, 12, 32)
    mask = _pmask(2, 12, True)
    _dispatch.reset_warnings()
    # dropout in training
    for layer in conn.perceiver_resampler.layers:
        layer.self_attn.attention_dropout = 0.1
    fused.train()
    conn.train()
    with pytest.warns(_dispatch.FastVLMFallbackWarning, match="attention dropout 0.1 is active"):
        fused(x, mask)
    fused.eval()
    conn.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _dispatch.FastVLMFallbackWarning)
        with torch.no_grad():
            assert_close(fused(x, mask), conn(x, mask), torch.float32, 128, roundings=4)  # eval: fused again
    # an unsupported mask form: the resampler falls back, with the reason
    res = _fused(conn.perceiver_resampler)
    ctx = torch.randn(2, 12, 32)
    mask4 = torch.ones(2, 1, 4, 16, dtype=torch.bool)
    with pytest.warns(_dispatch.FastVLMFallbackWarning, match="is not a \\[batch, patches\\]"):
        with pytest.raises(Exception):
            res(ctx, mask4)  # transformers itself rejects a 4-D mask here; the fused module defers to it
    # strict mode turns a fallback into an error listing the reason; a hooked child is a reason
    h = conn.perceiver_resampler.layers[0].mlp.down_proj.register_forward_hook(lambda *a: None)
    monkeypatch.setenv("FASTVLM_STRICT", "1")
    with pytest.raises(_dispatch.FastVLMFallbackError, match="has forward hooks"):
        _fused(conn)(x, mask)
    h.remove()


def test_patch_report_lists_the_connector(torch_backend, quiet):
    import fastvlm
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model("idefics2")
    report = fastvlm.patch(model, verify=True)
    entry = [e for e in report.entries if e.path == "model.connector"]
    assert entry and entry[0].status == "patched" and "ok" in entry[0].detail, str(report)
    assert type(model.model.connector).__name__ == "FusedIdefics2Connector"
    # the fused connector runs its (original) resampler child through the fused Perceiver ops: patch does not visit
    # the descendants of a module it swapped
    x = torch.randn(1, 12, model.model.connector.modality_projection.gate_proj.in_features)
    with torch.no_grad(), fastvlm.trace() as t:
        model.model.connector(x, attention_mask=torch.ones(1, 12, dtype=torch.bool))
    assert any(r.op == "fastvlm::norm_linear" for r in t.records), str(t)


@pytest.mark.parametrize("context", [729, 4900])
def test_idefics2_8b_perceiver_full_size(context, torch_backend, quiet):
    """The real Idefics2-8B perceiver (hidden 4096, 64 latents, depth 3, 16 heads x 96, 4 kv heads, MLP 16384) on
    the PyTorch path, fp32, one image with padded patches."""
    from transformers import Idefics2Config

    cfg = Idefics2Config(perceiver_config=dict(hidden_size=4096, resampler_n_latents=64, resampler_depth=3,
                                               resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4),
                         text_config=dict(model_type="mistral", hidden_size=4096))
    torch.manual_seed(0)
    with torch.device("meta"):
        res = M.Idefics2PerceiverResampler._from_config(cfg.perceiver_config)
    res = res.to_empty(device="cpu").eval()
    with torch.no_grad():
        for n, p in res.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            elif n == "latents":
                p.normal_()
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    ctx = torch.randn(1, context, 4096)
    mask = _pmask(1, context, True)
    with torch.no_grad():
        ref = res(ctx, mask)
        out = _fused(res)(ctx, mask)
    assert out.shape == (1, 64, 4096)
    assert_close(out, ref, torch.float32, 16384, roundings=4)


def test_fused_classes_are_drop_in(torch_backend, quiet):
    """``Fused<Original>(config)`` takes the original constructor's arguments, is an instance of the original, and
    loads the original's state_dict strictly; ``from_module`` shares the tensors (no copy)."""
    import fastvlm.nn

    conn = _connector(depth=1)
    cls = fastvlm.nn.FusedIdefics2Connector
    fresh = cls(_config(depth=1)).eval()
    assert isinstance(fresh, M.Idefics2Connector)
    fresh.load_state_dict(conn.state_dict(), strict=True)
    assert list(fresh.state_dict()) == list(conn.state_dict())
    x, mask = torch.randn(2, 9, 32), _pmask(2, 9, True)
    with torch.no_grad():
        assert_close(fresh(x, mask), conn(x, mask), torch.float32, 256, roundings=4)
    wrapped = fastvlm.nn.from_module(conn)
    assert {k: v.data_ptr() for k, v in wrapped.state_dict().items()} == \
        {k: v.data_ptr() for k, v in conn.state_dict().items()}
    res_cls = fastvlm.nn.FusedIdefics2PerceiverResampler
    assert issubclass(res_cls, M.Idefics2PerceiverResampler)
    assert res_cls.from_module(conn.perceiver_resampler).latents is conn.perceiver_resampler.latents
