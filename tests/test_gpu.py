"""GPU-only checks (skipped without CUDA): the kernels at real connector sizes, bf16 and fp16, odd views, backward."""
import pytest
import torch

import fastvlm
from fastvlm.bench.projector import build
from helpers import assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", ["llava-1.5-7b@1", "llava-1.5-7b@8", "qwen2-vl-7b@1024", "internvl@7x256"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_sizes_vs_float64(shape, dtype):
    m, x, *_ = build(shape, "cuda", dtype)
    with torch.no_grad():
        ref = m.double()(x.double())
        m.to(dtype)
        with fastvlm.trace() as t:
            out = fastvlm.nn.from_module(m)(x)
    assert set(t.backends()) == {"triton"}, str(t)
    assert_close(out, ref, dtype, x.shape[-1], roundings=3)


@pytest.mark.parametrize("precision", ["", "ieee"], ids=["tf32x3", "ieee"])
def test_fp32_vs_float64(precision, monkeypatch):
    """fp32 GEMMs: tf32x3 by default (about fp32-accurate), "ieee" on request: both within the fp32 tolerance."""
    if precision:
        monkeypatch.setenv("FASTVLM_FP32_PRECISION", precision)
    else:
        monkeypatch.delenv("FASTVLM_FP32_PRECISION", raising=False)
    m, x, *_ = build("qwen2-vl-7b@1024", "cuda", torch.float32)
    with torch.no_grad():
        out = fastvlm.nn.from_module(m)(x)
        ref = m.double()(x.double())
    assert_close(out, ref, torch.float32, 5120, roundings=3)


def test_offset_and_strided_inputs():
    m, x, *_ = build("llava-1.5-7b@1", "cuda", torch.bfloat16)
    big = torch.randn(1, 577, 2048, device="cuda", dtype=torch.bfloat16)
    xs = big[:, 1:, 5:1029]  # CLS dropped, misaligned column offset, row stride 2048
    with torch.no_grad():
        out = fastvlm.nn.from_module(m)(xs)
        ref = m.double()(xs.double())
    assert_close(out, ref, torch.bfloat16, 1024, roundings=3)


def test_backward_real_size():
    m, x, *_ = build("llava-1.5-7b@1", "cuda", torch.bfloat16)
    fused = fastvlm.nn.from_module(m)
    for p in m.parameters():
        p.requires_grad_(True)
    gy = torch.randn(1, 576, 4096, device="cuda", dtype=torch.bfloat16)
    fused(x).backward(gy)
    got = [p.grad.clone() for p in m.parameters()]
    m64 = m.double()
    for p in m64.parameters():
        p.grad = None
    m64(x.double()).backward(gy.double())
    for g, p in zip(got, m64.parameters()):
        assert_close(g, p.grad, torch.bfloat16, 576, roundings=4, what="gradient")


def _merge_case(device, dtype):
    """Idefics3-8B-like pixel-shuffle connector (scale 2, 26 x 26 grid of 1152) at real width, and Gemma 3's pool."""
    from fastvlm.ops.layout import gather_ref, pool_rows, space_to_depth_rows
    from fastvlm.ops.projector import mlp_projector

    torch.manual_seed(0)
    x = torch.randn(2 * 26 * 26, 1152, device=device).to(dtype)
    rows = space_to_depth_rows(2, 26, 26, 2, device)
    w = (torch.randn(4096, 4 * 1152, device=device) * 0.01).to(dtype)
    out = mlp_projector(x, w, act="none", rows=rows, a_mode="concat")
    ref = gather_ref(x.double(), rows, "concat") @ w.double().T
    assert_close(out, ref, dtype, 4 * 1152, roundings=2)
    xg = torch.randn(2 * 64 * 64, 1152, device=device).to(dtype)
    prow = pool_rows(2, 64, 64, 4, device)
    nw = torch.randn(1152, device=device).to(dtype) * 0.1
    wg = (torch.randn(2560, 1152, device=device) * 0.02).to(dtype)
    out = mlp_projector(xg, wg, act="none", norm="rmsnorm_1p", norm_weight=nw, eps=1e-6, rows=prow, a_mode="mean")
    pooled = gather_ref(xg.double(), prow, "mean")
    normed = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + nw.double())
    assert_close(out, normed @ wg.double().T, dtype, 1152 * 16, roundings=3)


def _patch_embed_case(device, dtype):
    """CLIP-L/14-336 patch embedding with class token and positions, float and uint8 pixels."""
    from fastvlm.ops.patch_embed import im2col_ref, patch_embed

    torch.manual_seed(0)
    x = torch.randn(8, 3, 336, 336, device=device)
    w = (torch.randn(1024, 3, 14, 14, device=device) * 0.02).to(dtype)
    pos, cls = torch.randn(577, 1024, device=device).to(dtype), torch.randn(1024, device=device).to(dtype)
    rows = torch.arange(1, 577, device=device)
    out = patch_embed(x, w, pos=pos, pos_rows=rows, cls=cls)
    a = im2col_ref(x.to(dtype).double(), 14)
    ref = (a @ w.double().reshape(1024, -1).T).view(8, 576, 1024) + pos.double()[1:]
    assert_close(out[:, 1:], ref, dtype, 588, roundings=2)
    assert_close(out[:, 0], (cls.double() + pos.double()[0]).expand(8, -1), dtype, 1, what="class-token rows")


def test_merge_and_pool_real_width():
    for dtype in (torch.bfloat16, torch.float16):
        _merge_case("cuda", dtype)


def test_patch_embed_real_size():
    for dtype in (torch.bfloat16, torch.float16):
        _patch_embed_case("cuda", dtype)
