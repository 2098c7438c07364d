"""Pixtral's ``patch_conv`` + ``ln_pre`` paired by ``fastvlm.patch``: the conv as the patch GEMM with the RMSNorm as
its in-place row-norm pass (kernels/row_norm.py, RMS mode), the parent's crop / concatenation unchanged.

Covers the RMS row norm under the interpreter (poisoned margins, ragged widths), a patched PixtralVisionModel on a
ragged batch (two image sizes padded to one tensor) against the original on both paths, hooks, hidden-state
capture, gradients, the unarmed conv and unpatch.
"""
import pytest
import torch

import fastvlm
from fastvlm.ops.patch_embed import im2col_ref, patch_embed
from fastvlm.testing import rel_err
from helpers import Guarded, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [40, 72])
def test_rms_row_norm_kernel(dtype, D, triton_backend):
    from fastvlm.kernels.row_norm import row_norm_

    R = 19
    x = torch.randn(R, D).to(dtype)
    w = (1 + 0.1 * torch.randn(D)).to(dtype)
    g = Guarded((R, D), dtype, x.device, fill=x)
    row_norm_(g.tensor, w, None, 1e-5, rms=True, block_r=4)
    g.check("rows")
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert_close(g.tensor, ref, dtype, D)
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        row_norm_(g.tensor, w, w, 1e-5, rms=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patch_embed_rmsnorm(dtype, triton_backend):
    """Odd grid (3 x 5 patches of 6), K = 108, D = 40: GEMM then the RMS row norm, vs float64."""
    x = torch.randn(2, 3, 18, 30).to(dtype)
    w = (torch.randn(40, 3, 6, 6) / 108 ** 0.5).to(dtype)
    nw = (1 + 0.1 * torch.randn(40)).to(dtype)
    out = patch_embed(x, w, None, norm_weight=nw, eps=1e-5, norm_rms=True)
    y = (im2col_ref(x.double(), 6) @ w.double().reshape(40, -1).T).view(2, 15, 40)
    ref = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    assert_close(out, ref, dtype, 108, roundings=2)
    with pytest.raises(ValueError, match="norm_rms needs norm_weight and takes no norm_bias"):
        patch_embed(x, w, None, norm_weight=nw, norm_bias=nw, norm_rms=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_embed_keep_rows(backend, monkeypatch):
    """``keep_rows``: only the listed patches are computed (the rest are zero before the norm, with no gradient)."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    x = torch.randn(2, 3, 18, 30)
    w = torch.randn(40, 3, 6, 6) / 108 ** 0.5
    nw = 1 + 0.1 * torch.randn(40)
    keep = torch.tensor([0, 1, 2, 5, 6, 7, 15, 16, 20])  # image 0: a 2 x 3 crop; image 1: a 2 x 2 crop
    out = patch_embed(x, w, None, norm_weight=nw, eps=1e-5, norm_rms=True, keep_rows=keep)
    y = (im2col_ref(x.double(), 6) @ w.double().reshape(40, -1).T)
    ref = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    flat = out.reshape(30, 40)
    assert_close(flat[keep], ref[keep], torch.float32, 108, roundings=2)
    dropped = torch.ones(30, dtype=torch.bool)
    dropped[keep] = False
    assert torch.equal(flat[dropped], torch.zeros(int(dropped.sum()), 40))
    with pytest.raises(IndexError, match="keep_rows must index the 30 patches"):
        patch_embed(x, w, keep_rows=torch.tensor([0, 30]))


def test_keep_rows_gradients(torch_backend):
    x = torch.randn(1, 3, 12, 18, dtype=torch.float64)
    w = torch.randn(8, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([0, 1, 3])
    g = torch.randn(1, 6, 8, dtype=torch.float64)
    got, = torch.autograd.grad(patch_embed(x, w, keep_rows=keep), w, g)
    a = im2col_ref(x, 6)[keep]
    ref, = torch.autograd.grad(a @ w.reshape(8, -1).T, w, g[0, keep])
    assert rel_err(got, ref) < 1e-12


def _pixtral(dtype=torch.float32):
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

    from fastvlm.testing import randomize_

    cfg = PixtralVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              head_dim=12, patch_size=14, image_size=112)
    m = PixtralVisionModel(cfg).eval()
    randomize_(m, std=0.05)
    with torch.no_grad():
        m.ln_pre.weight.copy_(1 + 0.1 * torch.randn(48))
    return m.to(dtype)


def _ragged_batch(dtype=torch.float32):
    x = torch.randn(2, 3, 84, 112, dtype=dtype)
    x[1, :, 56:] = 0  # the second image is 56 x 70, padded as the processor does
    x[1, :, :, 70:] = 0
    return x, torch.tensor([[84, 112], [56, 70]])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_pixtral_matches_original(backend, monkeypatch, quiet_fallbacks):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m = _pixtral()
    x, sizes = _ragged_batch()
    with torch.no_grad():
        ref = m(x, image_sizes=sizes).last_hidden_state
    keys = list(m.state_dict())
    report = fastvlm.patch(m, verify=True)
    row = [e for e in report.entries if e.path == "patch_conv"]
    assert row and row[0].status == "patched" and "ok" in row[0].detail, str(report)
    assert list(m.state_dict()) == keys
    with torch.no_grad(), fastvlm.trace() as t:
        out = m(x, image_sizes=sizes).last_hidden_state
    rec = [r for r in t.records if r.op == "fastvlm::patch_embed"]
    # the padded second image's patches outside its 4 x 5 crop are skipped: 48 + 20 of the 2 x 6 x 8 patches
    assert len(rec) == 1 and "+rmsnorm keep 68/96" in rec[0].detail and rec[0].backend == backend, str(t)
    assert out.shape == ref.shape == (1, 48 + 20, 48)
    assert_close(out, ref, torch.float32, 588, roundings=4)
    # the conv called on its own is the original convolution; hidden states are still captured
    with torch.no_grad():
        assert torch.equal(m.patch_conv(x), torch.nn.functional.conv2d(x, m.patch_conv.weight, None, 14))
        hs = m(x, image_sizes=sizes, output_hidden_states=True).hidden_states
    assert len(hs) == 3
    import copy

    for twin in (copy.deepcopy(m),):  # the pairing's objects are rebound to the copy
        with torch.no_grad(), fastvlm.trace() as t:
            assert_close(twin(x, image_sizes=sizes).last_hidden_state, ref, torch.float32, 588, roundings=4)
        assert any("+rmsnorm" in r.detail for r in t.records), str(t)
    assert fastvlm.unpatch(m) >= 2
    assert type(m.patch_conv) is torch.nn.Conv2d and type(m.ln_pre).__name__ == "PixtralRMSNorm"
    assert "forward" not in m.__dict__
    with torch.no_grad():
        assert torch.equal(m(x, image_sizes=sizes).last_hidden_state, ref)


def test_hooks_and_gradients(torch_backend, quiet_fallbacks):
    m = _pixtral(torch.float64)
    x, sizes = _ragged_batch(torch.float64)
    g = torch.randn(1, 68, 48, dtype=torch.float64)
    params = [m.patch_conv.weight, m.ln_pre.weight]
    ref = torch.autograd.grad(m(x, image_sizes=sizes).last_hidden_state, params, g)
    fastvlm.patch(m)
    params = [m.patch_conv.weight, m.ln_pre.weight]  # the same Parameter objects
    got = torch.autograd.grad(m(x, image_sizes=sizes).last_hidden_state, params, g)
    for a, b in zip(got, ref):  # PixtralRMSNorm computes in fp32 even for a float64 model: fp32's bound
        assert_close(a, b, torch.float32, 68, roundings=3, what="gradient")
    seen = []
    h = m.ln_pre.register_forward_hook(lambda mod, i, o: seen.append(float(i[0].abs().max())))
    with torch.no_grad(), fastvlm.trace() as t:
        out = m(x, image_sizes=sizes).last_hidden_state
    h.remove()
    assert seen and not any("+rmsnorm" in r.detail for r in t.records), str(t)  # the hook saw the unnormalised rows
    fastvlm.unpatch(m)
    with torch.no_grad():
        assert rel_err(out, m(x, image_sizes=sizes).last_hidden_state) < 1e-12


@pytest.mark.slow  # Inductor compiles two whole models (a minute or more cold): .ci/run runs it as its own step
@pytest.mark.parametrize("family", ["mistral3", "qwen3_vl"])
def test_compiled_patched_model(family, torch_backend, quiet_fallbacks):
    """torch.compile of a whole patched model whose patch embedding is paired (Pixtral's ln_pre, Qwen3-VL's
    positions). Not fullgraph: transformers' own vision attention splits by ``tolist()`` in both models."""
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model(family)
    with torch.no_grad():
        ref = model(**inputs).logits
    fastvlm.patch(model)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(**inputs).logits, ref, torch.float32, 1536, roundings=4)


def test_unexpected_ln_pre_call_raises(torch_backend):
    """If a transformers version called ln_pre on something else after the fused conv normalised its rows, running
    the RMSNorm again would be silently wrong: the paired ln_pre raises instead."""
    m = _pixtral()
    fastvlm.patch(m)
    pair = m.ln_pre.__dict__["_fastvlm_pair"]
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        with pair.arm() as call:
            m.patch_conv(x)  # armed: normalised rows handed over
            assert call.out is not None
            with pytest.raises(RuntimeError, match="PixtralVisionModel.forward differs"):
                m.ln_pre(torch.randn(2, 4, 48))
        ref = m.ln_pre(torch.ones(1, 4, 48))  # unarmed: the original RMSNorm
    assert torch.allclose(ref, m.ln_pre.weight.expand(1, 4, 48))


def test_opcheck_rms_and_keep_rows(torch_backend):
    x = torch.randn(2, 3, 12, 18)
    w, nw = torch.randn(8, 3, 6, 6), 1 + 0.1 * torch.randn(8)
    args = (x, w, None, None, None, None, 0, None, None, 6, True, nw, None, 1e-5, True, None, torch.tensor([0, 1, 4]))
    torch.library.opcheck(torch.ops.fastvlm.patch_embed.default, args)
