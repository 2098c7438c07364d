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


def test_fp32_ieee_vs_float64():
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
