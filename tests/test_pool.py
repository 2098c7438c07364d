"""Token pooling (LLaVA-NeXT-Video's pooler): average, max and conv windows over the token grid."""
import copy

import pytest
import torch

import fastvlm
from fastvlm.ops.layout import pool_rows
from fastvlm.ops.pool import pool_tokens
from fastvlm.testing import randomize_
from helpers import assert_close


pytestmark = pytest.mark.usefixtures("quiet_fallbacks")  # fallback warnings are asserted through trace()


def _pooler(mode, stride=2):
    import transformers
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

    cfg = transformers.LlavaNextVideoConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=32, num_attention_heads=4,
                           num_hidden_layers=1, image_size=84, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=1, vocab_size=100),
        spatial_pool_mode=mode, spatial_pool_stride=stride)
    return randomize_(LlavaNextVideoPooler(cfg))


@pytest.mark.parametrize("mode", ["average", "max", "conv"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("stride", [2, 3])
def test_pooler_vs_original(mode, backend, stride, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m = _pooler(mode, stride)
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(3, 36, 24)  # 6 x 6 grid
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(x)
        ref = m.double()(x.double())
    assert {r.backend for r in t.records} == {backend} and t.records, str(t)
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, 24 * stride * stride, roundings=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mean", "max"])
def test_pool_kernel_dtypes_and_grad(dtype, mode, triton_backend):
    x = torch.randn(2 * 36, 40).to(dtype).requires_grad_()
    rows = pool_rows(2, 6, 6, 3)
    out = pool_tokens(x, rows, mode)
    x64 = x.detach().double().requires_grad_()
    ref = x64[rows].mean(1) if mode == "mean" else x64[rows].amax(1)
    assert_close(out, ref, dtype, 9)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(ref, x64, g.double())
    assert_close(gx, gr, dtype, 9, what="gradient")


def test_opcheck_and_fallback(torch_backend):
    x = torch.randn(36, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvlm.pool_tokens.default, (x, pool_rows(1, 6, 6, 2), "max"))
    m = _pooler("average", 2)
    fused = fastvlm.nn.from_module(m)
    with fastvlm.trace() as t, pytest.raises(RuntimeError):
        fused(torch.randn(1, 35, 24))  # not a square grid: the original runs and raises its own error
    assert "not a square grid" in str(t)
    with pytest.raises(ValueError, match="mode must be"):
        pool_tokens(torch.randn(4, 2), pool_rows(1, 2, 2, 2), "median")


def test_tiny_video_model_patches_its_pooler(torch_backend):
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model("llava_next_video")
    report = fastvlm.patch(model, verify=True)
    assert any(e.path == "model.vision_resampler" and e.status == "patched" and "ok" in e.detail
               for e in report.entries), str(report)


def _pool_projector(mode, stride=2):
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoMultiModalProjector

    pooler = _pooler(mode, stride)
    import transformers

    cfg = transformers.LlavaNextVideoConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=32, num_attention_heads=4,
                           num_hidden_layers=1, image_size=84, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=1, vocab_size=100))
    return pooler, randomize_(LlavaNextVideoMultiModalProjector(cfg))


@pytest.mark.parametrize("mode", ["average", "max"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("stride", [2, 3])
def test_pool_projector_one_call(mode, backend, stride, monkeypatch):
    """Pooling inside the projector's loads equals the pooler then the projector (get_video_features' two lines)."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    pooler, proj = _pool_projector(mode, stride)
    fused = fastvlm.nn.LlavaNextVideoPoolProjector(pooler, proj)
    assert set(fused.state_dict()) == {f"pooler.{k}" for k in pooler.state_dict()} | \
        {f"projector.{k}" for k in proj.state_dict()}
    x = torch.randn(3, 36, 24, requires_grad=True)  # 3 frames of a 6 x 6 grid
    with fastvlm.trace() as t:
        out = fused(x)
    assert [(r.op, r.backend) for r in t.records] == [("fastvlm::mlp_projector", backend)], str(t)
    x64 = x.detach().double().requires_grad_()
    ref = copy.deepcopy(proj).double()(copy.deepcopy(pooler).double()(x64))
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, 32, roundings=3)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    assert_close(x.grad, x64.grad, torch.float32, 32 * stride * stride, roundings=4, what="gradient")


def test_pool_projector_conv_mode_runs_the_two_fused_modules(torch_backend):
    pooler, proj = _pool_projector("conv")
    fused = fastvlm.nn.LlavaNextVideoPoolProjector(pooler, proj)
    x = torch.randn(2, 36, 24)
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(x)
        ref = proj(pooler(x))
    assert any("learned conv" in " ".join(r.reasons) for r in t.records), str(t)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="pooler must be a LlavaNextVideoPooler"):
        fastvlm.nn.LlavaNextVideoPoolProjector(proj, proj)
